"""The figures behind tests/test_learning.py's SUMS_MARGIN: its shortened sums run for several seeds.

    python benchmarks/learning_test_margin.py --out runs/learning_margin [--seeds 0 1 2]

Each seed is `rlsys train configs/r1_zero_sums.yaml <the test's overrides> trainer.seed=S`, one after
another (each takes the whole machine); a seed whose run already finished is not run again. The seed
changes the training samples, as running on another CPU (other rounding, other samples) would; the
test's evaluation is greedy, so it has no samples of its own. OUT/margin.json and the printed table:
per seed, held-out accuracy before and after and the gain, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)

    from benchmarks.common import machine
    from test_learning import SUMS_MARGIN, SUMS_OVERRIDES, SUMS_STEPS

    rows = {}
    for seed in args.seeds:
        run = (args.out / f"seed{seed}").resolve()
        last = run / "evals" / f"step_{SUMS_STEPS}.json"
        wall = None
        if not last.is_file():
            cmd = [sys.executable, "-m", "rlsys.cli", "train", "configs/r1_zero_sums.yaml", *SUMS_OVERRIDES,
                   f"trainer.seed={seed}", f"trainer.output_dir={run}"]
            print(f"[learning_test_margin] seed {seed}: {' '.join(cmd[3:])}", flush=True)
            start = time.monotonic()
            subprocess.run(cmd, cwd=REPO, check=True)
            wall = time.monotonic() - start
        before = json.loads((run / "evals" / "step_0.json").read_text())["pass@1"]
        after = json.loads(last.read_text())["pass@1"]
        rows[seed] = {"before": before, "after": after, "gain": after - before, "wall_s": wall}
    result = {"steps": SUMS_STEPS, "overrides": SUMS_OVERRIDES, "margin": SUMS_MARGIN, "seeds": rows,
              "min_gain": min(r["gain"] for r in rows.values()), "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "margin.json").write_text(json.dumps(result, indent=1))
    print("| seed | pass@1 before | after | gain | wall (s) |\n|---|---|---|---|---|")
    for seed, r in rows.items():
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        print(f"| {seed} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.3f} | {wall} |")
    print(f"smallest gain {result['min_gain']:+.3f}; the test's margin +{SUMS_MARGIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
