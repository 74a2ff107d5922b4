"""What TRL's GRPOTrainer learns on a learning config in the wall time rlsys had.

    python benchmarks/learning_trl.py configs/r1_zero_sums.yaml --minutes 55 --out runs/trl_sums \
        --also configs/data/sums_3x1_test.parquet [key=value ...]

TRL runs the config's workload (benchmarks/peer_trl.build_trainer: the same model, templated
prompts, rule rewards and GRPO settings mapped onto GRPOConfig; generation by transformers
generate, TRL's default) until --minutes of wall time have passed since this script started
(model loading included, as rlsys's minutes include its actors' start), stopping at the end of a
rollout batch. The policy is saved to OUT/model and evaluated the rlsys way (`rlsys eval` with the
config's eval settings: eval.dataset, eval.limit, eval.k, eval.temperature) on eval.dataset and
each --also dataset, the same protocol as rlsys's runs. OUT/result.json holds the steps, the
reward of every step and the evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def evaluate(model: Path, dataset: str, cfg_path: str, overrides: list[str], limit: int, k: int, out: Path) -> dict:
    """`rlsys eval` of `model` on `dataset`: its summary (pass@1, cons@k, ...) without the per-problem rows."""
    cmd = [sys.executable, "-m", "rlsys.cli", "eval", "--model", str(model), "--dataset", dataset,
           "--limit", str(limit), "--k", str(k), "--out", str(out), cfg_path, *overrides]
    subprocess.run(cmd, cwd=REPO, check=True)
    return {k: v for k, v in json.loads(out.read_text()).items() if k != "results"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--minutes", type=float, required=True, help="wall time, from this script's start")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--also", action="append", default=[], help="another held-out dataset to evaluate on")
    parser.add_argument("overrides", nargs="*", help="key=value")
    # intermixed: key=value overrides may follow the options, as the usage line shows
    args = parser.parse_intermixed_args(argv)
    start = time.monotonic()

    from transformers import TrainerCallback

    from benchmarks.common import machine
    from benchmarks.peer_trl import build_trainer
    from rlsys.config import load_config

    cfg = load_config(args.config, args.overrides + ["trainer.progress=false"])
    args.out.mkdir(parents=True, exist_ok=True)
    opt_per_step = cfg.learner.epochs * cfg.rollout_batch_size // cfg.learner.mini_batch_size
    deadline = start + args.minutes * 60

    class StopAtDeadline(TrainerCallback):
        """Stops after the rollout batch during which the deadline passed (TRL counts optimizer steps)."""

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % opt_per_step == 0 and time.monotonic() >= deadline:
                control.should_training_stop = True

    trainer, _, gens = build_trainer(cfg, args.out / "trl", steps=10**6, callbacks=[StopAtDeadline()])
    trainer.train()
    trained_s = time.monotonic() - start
    model = args.out / "model"
    trainer.save_model(str(model))
    trainer.processing_class.save_pretrained(str(model))
    print(f"[learning_trl] {len(gens)} steps in {trained_s / 60:.1f} min; policy saved to {model}", flush=True)

    evals = {}
    for dataset in [cfg.eval.dataset, *args.also]:
        name = Path(dataset).stem
        evals[dataset] = evaluate(model, dataset, args.config, args.overrides, cfg.eval.limit, cfg.eval.k,
                                  args.out / f"eval_{name}.json")
    result = {"config": args.config, "overrides": args.overrides, "minutes": args.minutes, "steps": len(gens),
              "trained_s": trained_s, "reward": [g["reward"] for g in gens], "evals": evals,
              "machine": machine(), "loadavg_end": os.getloadavg()[0]}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "reward"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
