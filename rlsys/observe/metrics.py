"""Timers, rollout statistics and the run folder's logs (metrics.jsonl, samples.jsonl)."""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from rlsys.observe.profile import Spans
from rlsys.types import RewardResult, Rollout


class Timer:
    """Seconds per phase for the step's metrics, and the same phases as spans for the timeline."""

    def __init__(self, trace: bool = False):
        self.totals: dict[str, float] = defaultdict(float)
        self.spans = Spans(enabled=trace)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            with self.spans.span(name):
                yield
        finally:
            self.totals[f"timing/{name}"] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def rollout_stats(rollouts: list[Rollout], results: list[RewardResult], group_size: int) -> dict[str, float]:
    rewards = [r.reward for r in results]
    groups = [rewards[i:i + group_size] for i in range(0, len(rewards), group_size)]
    lengths = [len(r.response_ids) for r in rollouts]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/accuracy": statistics.fmean(r.accuracy for r in results),
        "reward/format": statistics.fmean(r.format for r in results),
        "reward/timeouts": sum(r.timed_out for r in results),
        # the verifier raised or its process died on these samples: accuracy 0, format still paid
        "reward/errors": sum(r.error is not None for r in results),
        # A group whose rewards are all equal has zero advantage everywhere: it teaches nothing.
        "groups/all_equal_frac": sum(len(set(g)) == 1 for g in groups) / len(groups),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": max(lengths),
        "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/weight_version": rollouts[0].weight_version,
        "tokens/response": sum(lengths),
    }


class RunLog:
    """Appends one JSON line per step; flushes every line (a crash loses nothing logged)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.samples = open(run_dir / "samples.jsonl", "a")

    def log(self, step: int, metrics: dict, sample: dict) -> None:
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        self.samples.write(json.dumps({"step": step, **sample}) + "\n")
        self.samples.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def sparkline(values: list[float], low: float = 0.0, high: float = 1.0) -> str:
    """The reward curve in one line of block characters, for the progress bar.

    >>> sparkline([0.0, 0.5, 1.0])
    '▁▅█'
    """
    blocks = "▁▂▃▄▅▆▇█"
    span = high - low
    return "".join(blocks[min(len(blocks) - 1, max(0, int((v - low) / span * len(blocks))))] for v in values)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
