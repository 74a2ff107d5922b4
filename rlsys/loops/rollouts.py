"""One step's scored rollouts, for the synchronous loop and the asynchronous one alike.

`collect` samples `algo.group_size` answers for each prompt, scores them, and applies DAPO's
data-side options (rlsys.math.dapo):
- overlong shaping: the shaped rewards (verifier reward + overlong term) are what make_batch
  gets; the verifier's RewardResults are returned unchanged, so accuracy and format metrics stay
  the verifier's.
- dynamic sampling: groups whose shaped rewards are all equal are dropped and a new round of
  prompts (the next `data.prompts_per_step` of the same stream) is sampled, at most
  `algo.max_fill_rounds` extra rounds, until `data.prompts_per_step` informative groups are
  kept. Surplus informative groups of the last round are left out (counted).
  Still short after the last round: the batch is cut to the largest whole number of learner
  mini-batches (the learner splits a batch into mini-batches of exactly
  `learner.mini_batch_size` rows), i.e. a multiple of mini_batch_size / gcd(mini_batch_size,
  group_size) groups; the groups cut are counted as surplus. If that leaves nothing (no
  informative group at all, or too few for one mini-batch), the step trains on the last round's
  groups as they are (dapo/fallback = 1): the step runs, and the log says it learnt little.
Each round is sampled with its own seed key: (trainer.seed, step) for the first, as the loop
always did, (trainer.seed, step, round, 0) for refills (see `round_seed`).

With every option off, `generate` and `score` are called once each, with what the loop passed
them before, and their results are returned as they are.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable

from rlsys.config import Config
from rlsys.data.prompts import Prompt
from rlsys.math.dapo import TRUNCATED, informative_groups, overlong_penalties
from rlsys.types import PromptRequest, RewardResult, Rollout

Generate = Callable[..., list[Rollout]]
"""generate(requests: list[PromptRequest], n=group_size, seed=key) -> n rollouts per request, in
request order (rlsys.cluster.pool.Pool.generate)."""
Score = Callable[[list[Rollout]], list[RewardResult]]
"""score(rollouts) -> one RewardResult per rollout, in order (rlsys.cluster.groups' reward group)."""


@dataclass
class Collected:
    """A step's rollouts, group by group, groups numbered 0..n-1 in order."""

    rollouts: list[Rollout]      # (B,) B = n * group_size
    rewards: list[float]         # (B,) shaped: what make_batch takes
    scores: list[RewardResult]   # (B,) the verifier's, unshaped (rollout_stats)
    prompts: list[Prompt]        # (n,) prompt g is group g (the sample log)
    metrics: dict[str, float]    # dapo/*: the same keys whatever the options


@dataclass
class Round:
    """One round's groups: everything about group g sits at g (rollouts and rewards at g*G..)."""

    prompts: list[Prompt]
    rollouts: list[Rollout]
    rewards: list[float]
    scores: list[RewardResult]
    penalties: list[float]

    def take(self, g: int, G: int, new_id: int) -> "Round":
        """Group g alone, its rollouts renumbered as group `new_id` of the batch."""
        rows = slice(g * G, (g + 1) * G)
        rollouts = [r if r.group == new_id else replace(r, group=new_id) for r in self.rollouts[rows]]
        return Round([self.prompts[g]], rollouts, self.rewards[rows], self.scores[rows], self.penalties[rows])


def collect(prompts: list[Prompt], more: Callable[[], list[Prompt]], generate: Generate, score: Score,
            cfg: Config, step: int,
            phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()) -> Collected:
    """Scored rollouts for one step: `prompts` first, then `more()` per refill round (dynamic sampling).
    phase(name) wraps each generate ("generate") and score ("reward") call: pass the loop's Timer."""
    algo, N, G = cfg.algo, cfg.data.prompts_per_step, cfg.algo.group_size
    rounds = [sample(prompts, 0, generate, score, cfg, step, phase)]
    if not algo.dynamic_sampling:
        return finish(rounds[0], rounds, cfg, fallback=False)
    kept = informative(rounds[-1], G)
    while len(kept) < N and len(rounds) <= algo.max_fill_rounds:
        rounds.append(sample(more(), len(rounds), generate, score, cfg, step, phase))
        kept += informative(rounds[-1], G)
    unit = cfg.learner.mini_batch_size // math.gcd(cfg.learner.mini_batch_size, G)  # groups per mini-batch
    size = N if len(kept) >= N else len(kept) // unit * unit
    if size == 0:
        return finish(rounds[-1], rounds, cfg, fallback=True)
    return finish(concat([r.take(g, G, i) for i, (r, g) in enumerate(kept[:size])]), rounds, cfg, fallback=False)


def sample(prompts: list[Prompt], rnd: int, generate: Generate, score: Score, cfg: Config, step: int,
           phase: Callable[[str], AbstractContextManager]) -> Round:
    requests: list[PromptRequest] = [p.request(g) for g, p in enumerate(prompts)]
    with phase("generate"):
        rollouts = generate(requests, n=cfg.algo.group_size, seed=round_seed(cfg.trainer.seed, step, rnd))
    with phase("reward"):
        scores = score(rollouts)
    G = cfg.algo.group_size
    assert len(rollouts) == len(scores) == len(prompts) * G, \
        f"{len(prompts)} prompts x {G}: got {len(rollouts)} rollouts and {len(scores)} scores"
    for g in range(len(prompts)):
        ids = {r.group for r in rollouts[g * G:(g + 1) * G]}
        assert ids == {g}, f"rollouts {g * G}..{(g + 1) * G - 1} belong to groups {sorted(ids)}, expected {g}"
    penalties = overlong_penalties([len(r.response_ids) for r in rollouts], cfg.generator.max_tokens,
                                   cfg.algo.overlong_buffer, cfg.algo.overlong_penalty)
    if cfg.algo.overlong_buffer:
        rewards = [s.reward + p for s, p in zip(scores, penalties)]
    else:  # the verifier's rewards exactly, as the loop used them before
        rewards = [s.reward for s in scores]
    return Round(prompts, rollouts, rewards, scores, penalties)


def round_seed(seed: int, step: int, rnd: int) -> tuple[int, ...]:
    """The sampling seed key of a step's round; the pool appends the chunk index to it.

    numpy's SeedSequence (rlsys.cluster.pool.chunk_seed) pads keys shorter than 4 numbers with
    zeros, so (seed, step, rnd) + (chunk 0,) would sample what round 0's chunk `rnd` sampled.
    Refill keys are 5 numbers long, which no 3-number key of round 0 pads to.
    >>> round_seed(7, 3, 0), round_seed(7, 3, 2)
    ((7, 3), (7, 3, 2, 0))
    """
    return (seed, step) if rnd == 0 else (seed, step, rnd, 0)


def informative(rnd: Round, G: int) -> list[tuple[Round, int]]:
    """(round, group) for each group of the round with rewards not all equal."""
    return [(rnd, g) for g, ok in enumerate(informative_groups(rnd.rewards, G)) if ok]


def concat(parts: list[Round]) -> Round:
    def joined(field: str) -> list:
        return [x for part in parts for x in getattr(part, field)]

    return Round(joined("prompts"), joined("rollouts"), joined("rewards"), joined("scores"), joined("penalties"))


def finish(batch: Round, rounds: list[Round], cfg: Config, fallback: bool) -> Collected:
    """The Collected of `batch`, with the dapo/* metrics over every round sampled.
    Every sampled group not in the batch is dropped (no signal) or surplus (informative, left out)."""
    G = cfg.algo.group_size
    sampled = sum(len(r.prompts) for r in rounds)
    signal = sum(sum(informative_groups(r.rewards, G)) for r in rounds)
    used = len(batch.prompts)
    used_signal = sum(informative_groups(batch.rewards, G))
    masked = sum(r.finish_reason == TRUNCATED for r in batch.rollouts) if cfg.algo.mask_truncated else 0
    metrics = {
        "dapo/groups": used,
        "dapo/fill_rounds": len(rounds) - 1,
        "dapo/dropped_groups": (sampled - signal) - (used - used_signal),
        "dapo/surplus_groups": signal - used_signal,
        "dapo/fallback": float(fallback),
        "dapo/overlong_penalty_mean": sum(batch.penalties) / len(batch.penalties),
        "dapo/truncated_masked": masked,  # make_batch zeroes their loss rows
    }
    return Collected(batch.rollouts, batch.rewards, batch.scores, batch.prompts, metrics)
