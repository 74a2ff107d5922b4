"""Held-out pass@1 of a sums run by kind of problem, for every evaluation it made (or eval JSONs).

    python benchmarks/learning_breakdown.py runs/r1_zero_sums [more runs or rlsys eval --out files ...]

For the two-term sums and differences of configs/r1_zero_sums.yaml: additions, subtractions with a
result >= 0, subtractions with a negative result, each with its problem count. Reads the
per-problem results rlsys writes (RUN/evals/step_V.json, or the --out of `rlsys eval`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KINDS = ("a + b", "a - b >= 0", "a - b < 0")


def kind(question: str, gold: str) -> str:
    """The problem's kind, from its operator and the gold's sign.

    >>> kind("State the final answer to the following arithmetic problem: 84 - 11 =", "73")
    'a - b >= 0'
    """
    problem = question.rsplit(":", 1)[-1]
    if "+" in problem:
        return KINDS[0]
    return KINDS[1] if int(gold) >= 0 else KINDS[2]


def breakdown(summary: dict) -> dict[str, tuple[float, int]]:
    """{kind: (pass@1, problems)} of one evaluation's per-problem results."""
    found: dict[str, list[bool]] = {k: [] for k in KINDS}
    problems: dict[str, int] = {k: 0 for k in KINDS}
    for r in summary["results"]:
        k = kind(r["question"], r["gold"])
        found[k] += r["correct"]
        problems[k] += 1
    return {k: (sum(v) / len(v) if v else float("nan"), problems[k]) for k, v in found.items()}


def main(paths: list[str]) -> int:
    print(f"{'evaluation':<48} {'pass@1':>7}  " + "  ".join(f"{k:>16}" for k in KINDS))
    for path in map(Path, paths):
        files = (sorted(path.glob("evals/step_*.json"), key=lambda p: int(p.stem.removeprefix("step_")))
                 if path.is_dir() else [path])
        for f in files:
            summary = json.loads(f.read_text())
            cells = "  ".join(f"{acc:>8.3f} ({n:>3} pr)" for acc, n in breakdown(summary).values())
            print(f"{str(f)[-48:]:<48} {summary['pass@1']:>7.3f}  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
