"""The rlsys command.

rlsys train [CONFIG.yaml] [key=value ...]     GRPO; no CONFIG: the embedded default (rlsys/default.yaml)
rlsys eval --model M --dataset D [...]          R1-style pass@1 / cons@K on the generator actors
rlsys export RUN_DIR [--step N] OUT             an HF folder from a run's checkpoint
rlsys data prepare NAME --split S --out F       a registry dataset as parquet
rlsys report RUN_DIR                            a run's figures and plots
rlsys submit [CONFIG.yaml] [key=value ...] --address http://HEAD:8265 [--follow]
                                                GRPO as a Ray job on a running cluster (rlsys/cluster/jobs.py)
rlsys jobs list | status ID | logs ID [--follow] | stop ID  [--address ...]
rlsys doctor [CONFIG.yaml] [key=value ...] [--address HEAD:6379]
                                                every node checked against the config before a long job
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlsys.cluster.jobs import JobError
from rlsys.config import DEFAULT_CONFIG, ConfigError, load_config, split_config_args
from rlsys.data.prompts import DataError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["data", "prepare"]:
        from rlsys.data.datasets import prepare_main

        return prepare_main(argv[2:])
    parser = argparse.ArgumentParser(prog="rlsys", description="R1-Zero-style GRPO on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run GRPO; no CONFIG runs the embedded default (tiny model, toy task)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--config-env", metavar="VAR",
                   help="read the whole config (YAML) from environment variable VAR: what `rlsys submit` ships")
    p = sub.add_parser("submit", help="validate a config here, then run it as a Ray job on a running cluster")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                                     "then $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's output until it ends; exit 1 unless "
                                                        "it SUCCEEDED")
    p.add_argument("--submission-id", "--job-id", dest="submission_id", help="the job's id (default: Ray picks one)")
    p.add_argument("--base-dir", type=Path, help="resolve a relative trainer.output_dir against this folder (the "
                                                 "job gets the absolute path); default: a relative one is refused")
    p = sub.add_parser("jobs", help="list, status, logs, stop of Ray jobs on a cluster")
    jobs = p.add_subparsers(dest="action", required=True)
    for action, text in (("list", "one line per job"), ("status", "PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED"),
                         ("logs", "the job driver's output"), ("stop", "stop a job and wait until it has ended")):
        q = jobs.add_parser(action, help=text)
        q.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                                         "then $RAY_ADDRESS)")
        if action != "list":
            q.add_argument("job_id")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends; exit 1 unless it "
                                                                "SUCCEEDED")
        if action == "stop":
            q.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the job to end")
    p = sub.add_parser("doctor", help="check every node of a running cluster against a config: devices, versions, "
                                      "reachability, disk, placement; exit 1 on a problem")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] (the job's config)")
    p.add_argument("--address", help="the cluster (GCS) address, HEAD_IP:6379 (default: cluster.address, then "
                                     "auto: the cluster this node belongs to)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds each node has to answer a probe")
    p = sub.add_parser("eval", help="pass@1 and cons@K of a model or a run's checkpoint on a dataset")
    p.add_argument("--model", required=True, help="HF folder, named model (tiny, smollm2-135m-instruct) or RUN_DIR")
    p.add_argument("--dataset", required=True, help="a registry dataset or a .jsonl/.parquet of questions and golds")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--step", type=int, help="checkpoint step when --model is a run folder (default: the latest)")
    p.add_argument("--out", type=Path, help="JSON with per-problem results (default runs/eval/...)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] for generation settings")
    p = sub.add_parser("sft", help="supervised fine-tuning on (prompt, response) pairs (data.path, sft.*)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p = sub.add_parser("sample", help="rejection sampling: K samples per prompt, the kept ones as an SFT dataset")
    p.add_argument("--model", required=True, help="HF folder, named model or RUN_DIR (its latest checkpoint)")
    p.add_argument("--dataset", required=True, help="a registry dataset or a .jsonl/.parquet of questions and golds")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, help="the first N questions")
    p.add_argument("--k", type=int, required=True, help="samples per prompt")
    p.add_argument("--keep", default="correct", choices=["correct", "all"],
                   help="correct: right answer, full R1 format, finished (default) | all")
    p.add_argument("--language", help="keep only answers whose reasoning is in this language (en, zh, ...)")
    p.add_argument("--min-language", type=float, default=0.95, help="its share of words at least (default 0.95)")
    p.add_argument("--near-duplicate", type=float, default=0.8,
                   help="word 3-gram Jaccard from which two answers to a prompt are one (default 0.8)")
    p.add_argument("--max-per-prompt", type=int, default=4)
    p.add_argument("--few-shot", help="a .jsonl of worked {prompt, response} examples shown before each question "
                                      "(the dataset written keeps the bare question)")
    p.add_argument("--step", type=int, help="checkpoint step when --model is a run folder (default: the latest)")
    p.add_argument("--out", type=Path, help="the dataset (default runs/sample/<dataset>-<model>-k<K>.parquet)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] for generation and reward settings")
    p = sub.add_parser("distill", help="the teacher's correct samples fine-tune the student (distill.*)")
    p.add_argument("args", nargs="*", help="CONFIG.yaml [key=value ...]")
    p = sub.add_parser("pipeline", help="R1's stages chained (configs/r1_pipeline.yaml); a re-run skips done stages")
    p.add_argument("file", help="the pipeline YAML")
    p.add_argument("args", nargs="*", help="key=value overrides of the pipeline file")
    p = sub.add_parser("export", help="write an HF folder from a run's checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--step", type=int)
    p = sub.add_parser("report", help="print a run's reward and step-time figures; write reward.png, timing.png")
    p.add_argument("run_dir", type=Path)
    sub.add_parser("data", help="data prepare NAME --split S --out FILE.parquet [--limit N]")
    # key=value overrides may also follow options (`submit CONFIG --address A k=v`), which a plain
    # parse leaves over once the positional list has ended.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("train", "submit", "sft", "sample", "distill", "pipeline", "doctor") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.args += extra
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, JobError) as e:
        print(f"rlsys {args.command}: {e}", file=sys.stderr)
        return 2


def cmd_train(args) -> int:
    given, overrides = split_config_args(args.args)
    if args.config_env:
        from rlsys.cluster.jobs import load_shipped_config

        if args.args:
            raise ConfigError(f"--config-env {args.config_env} is the whole config: no CONFIG or overrides beside it")
        cfg = load_shipped_config(args.config_env)
    else:
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


def cmd_sft(args) -> int:
    from rlsys.loops.sft import sft

    given, overrides = split_config_args(args.args)
    run_dir = sft(load_config(given or DEFAULT_CONFIG, overrides))
    print(f"[rlsys] sft run folder: {run_dir}")
    return 0


def cmd_sample(args) -> int:
    from rlsys.data.traces import Filters
    from rlsys.loops.sample import sample, summary

    given, overrides = split_config_args(args.args)
    cfg = load_config(given or DEFAULT_CONFIG, overrides)
    name = Path(args.model).name or args.model
    out = args.out or Path("runs") / "sample" / f"{Path(args.dataset).stem}-{name}-k{args.k}.parquet"
    filters = Filters(args.keep, args.language, args.min_language, args.near_duplicate, args.max_per_prompt)
    path, prov = sample(cfg, args.model, args.dataset, args.k, out, filters, args.split, args.limit, args.step,
                        few_shot=args.few_shot)
    print(summary(path, prov))
    return 0


def cmd_distill(args) -> int:
    from rlsys.loops.pipeline import distill_command

    given, overrides = split_config_args(args.args)
    if given is None:
        raise ConfigError("rlsys distill needs a CONFIG with a distill section (teacher, student)")
    return distill_command(given, overrides)


def cmd_pipeline(args) -> int:
    from rlsys.loops.pipeline import pipeline_command

    return pipeline_command(args.file, args.args)


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


def cmd_submit(args) -> int:
    from rlsys.cluster.jobs import submit_main

    return submit_main(args)


def cmd_doctor(args) -> int:
    from rlsys.cluster.doctor import doctor

    given, overrides = split_config_args(args.args)
    cfg = load_config(given or DEFAULT_CONFIG, overrides)
    try:
        return doctor(cfg, args.address, args.timeout)
    except ConnectionError as e:
        print(f"rlsys doctor: no Ray cluster to check at {args.address or cfg.cluster.address or 'auto'}: {e}. "
              f"Run it on a node of the cluster (`ray start` made it one), or pass --address HEAD_IP:6379",
              file=sys.stderr)
        return 2


def cmd_jobs(args) -> int:
    from rlsys.cluster.jobs import jobs_main

    return jobs_main(args)


COMMANDS = {"train": cmd_train, "sft": cmd_sft, "sample": cmd_sample, "distill": cmd_distill, "pipeline": cmd_pipeline, "submit": cmd_submit, "jobs": cmd_jobs, "doctor": cmd_doctor, "eval": cmd_eval, "export": cmd_export, "report": cmd_report, "data": cmd_data}

if __name__ == "__main__":
    sys.exit(main())
