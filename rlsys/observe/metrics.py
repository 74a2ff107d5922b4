"""Timers, rollout statistics and the run folder's logs (metrics.jsonl, samples.jsonl, trackers)."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from rlsys.config import Config, to_dict
from rlsys.observe.profile import Spans
from rlsys.observe.trackers import make_tracker, plottable
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


def reflection_share(texts: list[str], words: list[str] | tuple[str, ...]) -> float:
    """Share of the texts with any of `words` as a whole word, any case: R1-Zero's "aha moment"
    signature (answers that stop to re-check: "wait", "check", "verify", "again").

    >>> reflection_share(["Wait, 3 + 4 is 7", "7", "let me re-check: 7", "Checking"], ["wait", "check"])
    0.5
    """
    if not words or not texts:
        return 0.0
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return sum(pattern.search(t) is not None for t in texts) / len(texts)


def rollout_stats(rollouts: list[Rollout], results: list[RewardResult], group_size: int,
                  reflection_words: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    rewards = [r.reward for r in results]
    groups = [rewards[i:i + group_size] for i in range(0, len(rewards), group_size)]
    lengths = [len(r.response_ids) for r in rollouts]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/accuracy": statistics.fmean(r.accuracy for r in results),
        "reward/format": statistics.fmean(r.format for r in results),
        "reward/timeouts": sum(r.timed_out for r in results),
        **({"reward/language": statistics.fmean(r.language for r in results)}
           if results and results[0].language is not None else {}),
        # the verifier raised or its process died on these samples: accuracy 0, format still paid
        "reward/errors": sum(r.error is not None for r in results),
        # A group whose rewards are all equal has zero advantage everywhere: it teaches nothing.
        "groups/all_equal_frac": sum(len(set(g)) == 1 for g in groups) / len(groups),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": max(lengths),
        "response/reflection_frac": reflection_share([r.text for r in rollouts], reflection_words),
        "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
        "rollout/weight_version": rollouts[0].weight_version,
        "tokens/response": sum(lengths),
        **(tool_stats(rollouts) if any(r.loss_mask is not None for r in rollouts) else {}),
    }


def tool_stats(rollouts: list[Rollout]) -> dict[str, float]:
    """generator.tools: turns per rollout, tool calls and failed calls per rollout, the share of
    rollouts that called a tool, the share of response tokens that are tools' output, and the seconds
    the tools took in all (summed over rollouts: the engines wait on them between turns)."""
    n = len(rollouts)
    tokens = sum(len(r.response_ids) for r in rollouts)
    return {"tools/turns_mean": sum(r.turns for r in rollouts) / n,
            "tools/calls_mean": sum(r.tool_calls for r in rollouts) / n,
            "tools/errors_mean": sum(r.tool_errors for r in rollouts) / n,
            "tools/used_frac": sum(r.tool_calls > 0 for r in rollouts) / n,
            "tools/output_token_frac": sum(len(r.loss_mask) - sum(r.loss_mask) for r in rollouts
                                           if r.loss_mask is not None) / max(tokens, 1),
            "tools/seconds": sum(r.tool_seconds for r in rollouts)}


class RunLog:
    """Appends one JSON line per step; flushes every line (a crash loses nothing logged).

    metrics.jsonl and samples.jsonl are always written, whether or not `trainer.loggers` lists
    jsonl: `rlsys report` reads them. With the config, each tracker that trainer.loggers names
    (tensorboard, wandb, mlflow; rlsys.observe.trackers) gets the config once, now, and every
    step's metrics and sample. Without it (RunLog(run_dir)), the two files only.
    """

    def __init__(self, run_dir: Path, cfg: Config | None = None):
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.samples = open(run_dir / "samples.jsonl", "a")
        self.trackers: dict[str, object] = {}
        self.warned: set[str] = set()   # metric names already warned about as not numbers
        if cfg is None:
            return
        try:
            for name in dict.fromkeys(cfg.trainer.loggers):   # listed twice: one tracker
                if name != "jsonl":
                    self.trackers[name] = make_tracker(name, run_dir, cfg.trainer)
            config = to_dict(cfg)
            for tracker in self.trackers.values():
                tracker.log_config(config)
        except Exception:
            # A tracker that cannot start stops the run before step 1; the files and the
            # trackers already started are closed first (a W&B run would be left running).
            self.close()
            raise

    def log(self, step: int, metrics: dict, sample: dict) -> None:
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        self.samples.write(json.dumps({"step": step, **sample}) + "\n")
        self.samples.flush()
        if self.trackers:
            numbers = plottable(metrics, self.warned)
            for tracker in self.trackers.values():
                tracker.log(step, numbers, sample)

    def close(self) -> None:
        """Closes the files and every tracker, even when one fails; then raises what failed."""
        closers = {"metrics.jsonl": self.metrics.close, "samples.jsonl": self.samples.close,
                   **{name: tracker.close for name, tracker in self.trackers.items()}}
        self.trackers = {}
        failed = []
        for name, close in closers.items():
            try:
                close()
            except Exception as e:
                failed.append((name, e))
        if len(failed) == 1:
            raise failed[0][1]
        if failed:
            names = ", ".join(f"{name} ({type(e).__name__}: {e})" for name, e in failed)
            raise RuntimeError(f"closing the run log failed for {names}") from failed[0][1]


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
