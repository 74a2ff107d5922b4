"""The rlsys command.

rlsys train [CONFIG.yaml] [key=value ...]     GRPO; no CONFIG: the embedded default (rlsys/default.yaml)
rlsys eval --model M --dataset D [...]          R1-style pass@1 / cons@K on the generator actors
rlsys export RUN_DIR [--step N] OUT             an HF folder from a run's checkpoint
rlsys data prepare NAME --split S --out F       a registry dataset as parquet
rlsys report RUN_DIR                            a run's figures and plots
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlsys.config import DEFAULT_CONFIG, ConfigError, load_config
from rlsys.data.prompts import DataError


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    given = args[0] if args and "=" not in args[0] else None
    return given, (args[1:] if given else args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["data", "prepare"]:
        from rlsys.data.datasets import prepare_main

        return prepare_main(argv[2:])
    parser = argparse.ArgumentParser(prog="rlsys", description="R1-Zero-style GRPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run GRPO; no CONFIG runs the embedded default (tiny model, toy task)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p = sub.add_parser("eval", help="pass@1 and cons@K of a model or a run's checkpoint on a registry dataset")
    p.add_argument("--model", required=True, help="HF folder, named model (tiny, smollm2-135m-instruct) or RUN_DIR")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--step", type=int, help="checkpoint step when --model is a run folder (default: the latest)")
    p.add_argument("--out", type=Path, help="JSON with per-problem results (default runs/eval/...)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] for generation settings")
    p = sub.add_parser("export", help="write an HF folder from a run's checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--step", type=int)
    p = sub.add_parser("report", help="print a run's reward and step-time figures; write reward.png, timing.png")
    p.add_argument("run_dir", type=Path)
    sub.add_parser("data", help="data prepare NAME --split S --out FILE.parquet [--limit N]")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"rlsys {args.command}: {e}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    given, overrides = split_config_args(args.args)
    cfg = load_config(given or DEFAULT_CONFIG, overrides)
    from rlsys.observe.report import report
    from rlsys.loops.train import train

    print(report(train(cfg)))
    return 0


def cmd_eval(args) -> int:
    from rlsys.loops.evaluate import eval_command

    given, overrides = split_config_args(args.args)
    return eval_command(args.model, args.dataset, args.split, args.limit, args.k, args.step, args.out, given,
                        overrides)


def cmd_export(args) -> int:
    from rlsys.checkpoint import export

    print(f"[rlsys] wrote {export(args.run_dir, args.out, args.step)}")
    return 0


def cmd_report(args) -> int:
    from rlsys.observe.report import report

    print(report(args.run_dir))
    return 0


def cmd_data(args) -> int:
    print("usage: rlsys data prepare NAME --split S --out FILE.parquet [--limit N]", file=sys.stderr)
    return 2


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "report": cmd_report, "data": cmd_data}

if __name__ == "__main__":
    sys.exit(main())
