"""rlsys train [CONFIG.yaml] [key=value ...] | rlsys report RUN_DIR"""

from __future__ import annotations

import argparse
import sys

from rlsys.config import DEFAULT_CONFIG, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsys", description="R1-Zero-style GRPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run GRPO; no CONFIG runs the embedded default (tiny model, toy task)")
    p_train.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p_report = sub.add_parser("report", help="print a run's reward and step-time figures; write reward.png, timing.png")
    p_report.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "report":
        from pathlib import Path

        from rlsys.report import report

        print(report(Path(args.run_dir)))
        return 0
    if args.command == "train":
        given = args.args[0] if args.args and "=" not in args.args[0] else None
        overrides = args.args[1:] if given else args.args
        path = given or DEFAULT_CONFIG
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            print(f"rlsys: {e}", file=sys.stderr)
            return 2
        from rlsys.trainer import train

        from rlsys.report import report

        run_dir = train(cfg)
        print(report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
