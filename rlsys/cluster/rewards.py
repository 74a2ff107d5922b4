"""The reward pools: a step's samples scored, each sample once.

RewardPool: the reward actors (rlsys.actors.reward_worker, made Ray actors in rlsys.cluster.remote).
A worker that dies or hangs is replaced and its share scored again (at most
cluster.max_actor_restarts times a run); a verifier that fails on every sample of a call stops the
run. CodeRewardPool (reward.verifier=code): the programs judged by the sandbox pool
(rlsys.cluster.sandboxes), the format and language rules paid on the driver (two regexes).
"""

from __future__ import annotations

import logging
import math
import time

import ray

from rlsys.cluster.deadlines import LOST, get_all
from rlsys.cluster.sandboxes import SandboxPool
from rlsys.config import RewardConfig
from rlsys.math.rewards import combine, format_score, language_score
from rlsys.sandbox.judge import extract_code
from rlsys.types import RewardResult, Rollout

log = logging.getLogger(__name__)


def check_verifier(results: list[RewardResult]) -> list[RewardResult]:
    """One sample's verifier error is the model's odd text (scored 0, counted, the run goes on);
    every sample of a call failing is a broken verifier, and training on its zeros would hide it."""
    if len(results) > 1 and all(r.error is not None for r in results):
        raise RuntimeError(f"the verifier failed on all {len(results)} samples of this call (first: "
                           f"{results[0].error}): it is broken, not the model's text")
    return results


class RewardPool:
    def __init__(self, actors: list, prefill: str = "", make=None, max_restarts: int = 3, timeout_s: float = 600.0,
                 start_timeout_s: float = 300.0, cfg: RewardConfig | None = None):
        """make(): a new reward actor, to replace one that died or hung (None: that stops the run).
        cfg: the workers' config, verifier resolved (evaluation reads answers the way they judge them).
        timeout_s: how long one worker's share may take (deadlines.score_s), counted once it runs;
        start_timeout_s: how long a replacement may take to start (deadlines.start_s)."""
        self.actors = actors
        self.prefill = prefill  # written by the prompt, scored as the model's own text
        self.make, self.max_restarts, self.restarts = make, max_restarts, 0
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.cfg = cfg

    def score(self, rollouts: list[Rollout]) -> list[RewardResult]:
        """Every sample scored once. A worker that dies (its process killed, its node lost) or
        gives no answer within timeout_s (hung) is killed, with its verifier child, and replaced;
        its share is scored again by the new one; at most max_restarts times a run."""
        samples = [(self.prefill + r.model_text(), r.answer) for r in rollouts]
        size = math.ceil(len(samples) / len(self.actors))
        shares = [samples[i * size:(i + 1) * size] for i in range(len(self.actors))]
        results: list[list[RewardResult] | None] = [None] * len(shares)
        while any(r is None for r in results):
            pending = {self.actors[i].score.remote(shares[i]): i for i, r in enumerate(results) if r is None}
            deadline = time.monotonic() + self.timeout_s
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:  # hung: every worker still busy is replaced, its share scored again
                    for i in pending.values():
                        self._replace(i, f"gave no result within {self.timeout_s:g}s (deadlines.score_s)",
                                      len(shares[i]))
                    break
                i = pending.pop(ready[0])
                try:
                    results[i] = ray.get(ready[0])
                except LOST as e:
                    self._replace(i, f"died ({type(e).__name__})", len(shares[i]))
        return check_verifier([res for chunk in results for res in chunk])

    def take_metrics(self) -> dict[str, float]:
        """The pool's own metrics since the last call (none: the workers' spans are in the timeline)."""
        return {}

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def _replace(self, i: int, why: str, samples: int) -> None:
        self.restarts += 1
        if self.make is None or self.restarts > self.max_restarts:
            raise RuntimeError(f"reward worker {i} {why}; {self.restarts} reward worker failures in this run, "
                               f"cluster.max_actor_restarts={self.max_restarts}")
        print(f"[rlsys] reward worker {i} {why}; replaced, its {samples} samples scored again", flush=True)
        ray.kill(self.actors[i])  # its verifier child dies with it (PR_SET_PDEATHSIG)
        self.actors[i] = self.make()
        get_all([self.actors[i].whereami.remote()], [f"reward worker {i}"], "reward worker start",
                self.start_timeout_s, "deadlines.start_s")  # started before its deadline runs


class CodeRewardPool:
    """reward.verifier=code: each sample's program (its `<answer>` block or last fenced block) run
    against its problem's tests by the sandbox pool; accuracy 1 when all pass (R1), or the fraction
    passed with reward.code.partial. A program the sandbox had to stop (deadline, output cap, a
    signal) is logged as a warning with the reason, any other failure at debug level."""

    def __init__(self, sandboxes: SandboxPool, prefill: str, cfg: RewardConfig):
        self.sandboxes, self.prefill, self.cfg = sandboxes, prefill, cfg

    @property
    def actors(self) -> list:
        return self.sandboxes.actors

    def score(self, rollouts: list[Rollout]) -> list[RewardResult]:
        completions = [self.prefill + r.model_text() for r in rollouts]
        verdicts = self.sandboxes.judge([(extract_code(c), r.answer) for c, r in zip(completions, rollouts)])
        results = []
        for completion, verdict in zip(completions, verdicts):
            acc = verdict.fraction if self.cfg.code.partial else float(verdict.passed == verdict.total)
            fmt, lang = format_score(completion, self.cfg), language_score(completion, self.cfg)
            stopped = any(w in verdict.reason for w in ("deadline", "output cap", "killed by", "sandbox worker"))
            if verdict.reason:
                log.log(logging.WARNING if stopped else logging.DEBUG, "code reward: %d/%d tests passed: %s",
                        verdict.passed, verdict.total, verdict.reason)
            results.append(RewardResult(reward=combine(acc, fmt, self.cfg, lang), accuracy=acc, format=fmt,
                                        timed_out="deadline" in verdict.reason, language=lang))
        return results

    def take_metrics(self) -> dict[str, float]:
        return self.sandboxes.take_metrics()

    def close(self) -> None:
        self.sandboxes.close()
