"""Off-policy corrections on a long asynchronous run: one training run per (staleness, correction),
side by side.

    python benchmarks/off_policy_runs.py configs/r1_zero_sums.yaml [key=value ...] --out runs/off_policy \
        [--staleness 0 1 2] [--methods tis mis icepop seq_mask]

Each run is `rlsys train CONFIG trainer.max_staleness=S algo.off_policy=M algo.off_policy_rows=all
trainer.output_dir=OUT/s<S>_<M> key=value ...`, one after another (each takes the whole machine);
staleness 0 is one synchronous run, s0_sync, the reference.
A run whose folder already holds a finished run (its last step logged with its evaluation) is not run again,
so the grid can be filled over several sittings; an unfinished one continues (trainer.resume=auto).
Then OUT/table.md and OUT/table.json: per run, the final held-out pass@1 and cons@k, the mean
mismatch KL (k3 of generator vs learner log-probs over the run), the shares of capped tokens, of masked tokens and
sequences, the mean importance weight and the share of stale rows.

--keep DIR copies each finished run's metrics.jsonl and config.yaml to DIR/<name>.metrics.jsonl and
DIR/<name>.config.yaml (a few tens of KB, committed: docs/learning/off_policy/), and a run kept there
counts as finished: a grid of ~45-minute runs is filled over several sittings on machines that keep
nothing between them, and the table is rebuilt from what was kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("tis", "mis", "icepop", "seq_mask")
LEARNER_KEYS = ("mismatch_kl", "is_capped_frac", "is_masked_frac", "is_masked_seq_frac", "is_weight_mean", "stale_frac")


def finished(metrics: Path, total_steps: int) -> bool:
    """The run behind this metrics.jsonl logged its last step, with that step's evaluation."""
    from rlsys.observe.metrics import read_jsonl

    if not metrics.is_file():
        return False
    rows = read_jsonl(metrics)
    return any(r["step"] == total_steps - 1 and "eval/pass@1" in r for r in rows)


def summarize(metrics: Path, k: int) -> dict:
    """A finished run's row: the last evaluation, and the learner's off-policy metrics averaged over its steps."""
    from rlsys.observe.metrics import read_jsonl

    rows = read_jsonl(metrics)
    last = max(rows, key=lambda r: r["step"])
    evals = [r for r in rows if "eval/pass@1" in r]
    row = {"steps": len(rows), "pass@1 on the way": ", ".join(f"{r['eval/pass@1']:.3g} (step {r['step'] + 1})"
                                                               for r in evals if r is not last),
           "pass@1": last["eval/pass@1"], f"cons@{k}": last[f"eval/cons@{k}"]}
    for key in LEARNER_KEYS:
        values = [r[key] for r in rows if key in r]
        row[key] = statistics.fmean(values) if values else None
    return row


def table(results: dict[str, dict], k: int) -> str:
    head = ["run", "steps", "pass@1 on the way", "pass@1", f"cons@{k}", *LEARNER_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [name] + [("" if row[h] is None else f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]))
                          for h in head[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, Path], out: Path, untrained: float | None = None) -> Path:
    """Two panels: each run's mismatch KL per step (k3 of generator vs learner, every row), and its
    held-out pass@1 at each evaluation (the untrained model's, the same for every run, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlsys.observe.metrics import read_jsonl

    fig, (kl_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, metrics in runs.items():
        rows = sorted(read_jsonl(metrics), key=lambda r: r["step"])
        style = "-" if name.startswith("s1") else "--" if name.startswith("s2") else ":"
        kl_ax.plot([r["step"] + 1 for r in rows], [r.get("mismatch_kl", float("nan")) for r in rows], style, label=name)
        evals = [(r["step"] + 1, r["eval/pass@1"]) for r in rows if "eval/pass@1" in r]
        acc_ax.plot([0] + [s for s, _ in evals] if untrained is not None else [s for s, _ in evals],
                    ([untrained] if untrained is not None else []) + [a for _, a in evals], style, marker="o",
                    label=name)
    if untrained is not None:
        acc_ax.axhline(untrained, color="grey", linestyle=":", linewidth=1)
    kl_ax.set(xlabel="step", ylabel="mismatch KL (k3, generator vs learner)", title="generator/learner mismatch",
              yscale="log")
    acc_ax.set(xlabel="step", ylabel="held-out pass@1", title="held-out accuracy (50 problems x 4)")
    for ax in (kl_ax, acc_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--staleness", type=int, nargs="+", default=[1, 2])
    # choices: a key=value written after --methods is refused, not taken for a method
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--keep", type=Path, help="copy each finished run's metrics and config here; "
                        "a run kept here is not run again")
    parser.add_argument("--plot", type=Path, help="also draw the runs' mismatch KL and held-out accuracy into this PNG")
    parser.add_argument("--untrained", type=float, help="the untrained model's held-out pass@1, drawn at step 0")
    parser.add_argument("--table-only", action="store_true", help="run nothing: the table of the runs kept in "
                        "--keep (those not kept yet are left out, and named)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_intermixed_args(argv)

    from rlsys.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.table_only and not args.keep:
        parser.error("--table-only reads the kept runs: give --keep")
    if not cfg.eval.every:
        parser.error("the runs are compared by their last held-out evaluation: eval.every must be > 0")
    results = {}
    # staleness 0: one synchronous run, the reference (no stale row; the default correction, on stale rows only)
    grid = [(s, m) for s in args.staleness for m in (["sync"] if s == 0 else args.methods)]
    for staleness, method in grid:
        name = f"s{staleness}_{method}"
        run = (args.out / name).resolve()
        kept = args.keep / f"{name}.metrics.jsonl" if args.keep else None
        if kept is not None and finished(kept, cfg.trainer.total_steps):
            results[name] = summarize(kept, cfg.eval.k)
            continue
        if args.table_only:
            print(f"[off_policy_runs] {name}: not kept yet, left out of the table", flush=True)
            continue
        if not finished(run / "metrics.jsonl", cfg.trainer.total_steps):
            resume = ["trainer.resume=auto"] if (run / "metrics.jsonl").is_file() else []
            correction = [] if staleness == 0 else [f"algo.off_policy={method}", "algo.off_policy_rows=all"]
            cmd = [sys.executable, "-m", "rlsys.cli", "train", args.config, *args.overrides,
                   f"trainer.max_staleness={staleness}", *correction,
                   f"trainer.output_dir={run}", "trainer.progress=false", *resume]
            print(f"[off_policy_runs] {name}: {' '.join(cmd[3:])}", flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
        if kept is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / "metrics.jsonl", kept)
            shutil.copyfile(run / "config.yaml", args.keep / f"{name}.config.yaml")
        results[name] = summarize(run / "metrics.jsonl", cfg.eval.k)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        sources = {name: (args.keep / f"{name}.metrics.jsonl" if args.keep else args.out / name / "metrics.jsonl")
                   for name in results}
        print(f"[off_policy_runs] plot: {plot(sources, args.plot, args.untrained)}", flush=True)
    (args.out / "table.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results, cfg.eval.k))
    print(table(results, cfg.eval.k))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
