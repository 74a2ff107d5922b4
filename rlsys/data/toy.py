"""Toy tasks for the tiny model: small enough that a random 0.1M-parameter policy can learn them
with GRPO in a few dozen steps on a CPU, so the machinery can be shown to learn, not just run.

digits: "Copy the digit 7" -> "7". A random policy emits the right digit as its final number a
few percent of the time: rare enough to start near zero reward, common enough that groups
disagree and GRPO has a signal from the first step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def digit_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Copy the digit {d}", "answer": str(d)} for d in (rng.randrange(10) for _ in range(n))]


def digit_add_rows(split: str) -> list[tuple[str, str]]:
    """All 100 sums of two digits, shuffled once: 20 held out as "test", 80 for "train". Small
    instruct models get the sum right in about half their samples, so GRPO has signal at once."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    chosen = pairs[:20] if split == "test" else pairs[20:]
    return [(f"What is {a} + {b}?", str(a + b)) for a, b in chosen]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_jsonl(digit_rows(200), Path(__file__).resolve().parents[2] / "configs" / "data" / "toy_digits.jsonl")
