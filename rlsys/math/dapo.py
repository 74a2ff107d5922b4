"""DAPO's data-side options (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale"): pure functions, no state. Clip-higher and token-level aggregation, DAPO's other
two, live in the loss (rlsys.math.grpo).

- Overlong reward shaping (algo.overlong_buffer, algo.overlong_penalty): a response in the last
  `buffer` tokens before max_tokens loses reward linearly, reaching -penalty at max_tokens. A hard
  penalty for every truncated answer punishes sound reasoning that ran long; the ramp tells the
  model that length costs before it is cut. rlsys adds it to the combined reward before the group
  advantages; the verifier's accuracy and format scores are left as they are.
- Dynamic sampling (algo.dynamic_sampling): a group whose rewards are all equal has zero advantage
  for every sample and teaches nothing; such groups are dropped and more prompts sampled
  (rlsys.loops.rollouts.collect). `informative_groups` is the test.
- Overlong filtering (algo.mask_truncated): a response cut at max_tokens has no answer to judge,
  so its reward says little about its tokens; its row carries no loss. It still counts in its
  group's mean and std (the other samples' advantages do not change).
"""

from __future__ import annotations

import torch

TRUNCATED = "length"
"""A rollout's finish_reason when it hit generator.max_tokens."""


def overlong_penalties(lengths: list[int], max_tokens: int, buffer: int, penalty: float) -> list[float]:
    """DAPO's soft overlong punishment, one term per response, to add to its reward.

    lengths: (B,) response tokens. With Lmax = max_tokens, Lc = buffer, p = penalty:
      0                          if L <= Lmax - Lc
      p * ((Lmax - Lc) - L) / Lc  if Lmax - Lc < L <= Lmax   (-p at Lmax)
      -p                         if L > Lmax (a generator never returns more; kept bounded)
    buffer 0: all 0 (off). Returns (B,) floats <= 0.

    Lmax 10, Lc 4: the ramp starts after 6 tokens and loses a quarter of p per token.
    >>> overlong_penalties([3, 6, 7, 8, 10], max_tokens=10, buffer=4, penalty=1.0)
    [0.0, 0.0, -0.25, -0.5, -1.0]
    >>> overlong_penalties([8, 10], max_tokens=10, buffer=4, penalty=0.5)
    [-0.25, -0.5]
    >>> overlong_penalties([10], max_tokens=10, buffer=0, penalty=1.0)
    [0.0]
    """
    assert 0 <= buffer < max_tokens, f"overlong buffer {buffer} must lie in [0, max_tokens={max_tokens})"
    if buffer == 0:
        return [0.0] * len(lengths)
    start = max_tokens - buffer
    return [0.0 if n <= start else penalty * (start - min(n, max_tokens)) / buffer for n in lengths]


def informative_groups(rewards: list[float], group_size: int) -> list[bool]:
    """Which groups carry a learning signal: rewards not all equal.

    rewards: (B,) laid out group by group, B % G == 0. Returns (B/G,) bools. Compared in float32,
    as make_batch hands them to group_advantages: a group is uninformative exactly when its
    advantages are all 0.
    >>> informative_groups([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2], group_size=3)
    [True, False, False]
    >>> informative_groups([0.3, 0.1 + 0.2], group_size=2)  # unequal in float64, equal in float32
    [False]
    """
    assert len(rewards) % group_size == 0, f"{len(rewards)} rewards is not a multiple of group_size {group_size}"
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (B/G, G)
    return (r != r[:, :1]).any(dim=1).tolist()                           # (B/G,)


def mask_truncated_rows(loss_mask: torch.Tensor, finish_reasons: list[str]) -> torch.Tensor:
    """loss_mask (B, L) with the rows of truncated rollouts (finish_reason "length") zeroed;
    finish_reasons: (B,). Returns a new (B, L) tensor; the input is not changed.

    >>> mask_truncated_rows(torch.ones(3, 2), ["stop", "length", "stop"]).tolist()
    [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    assert loss_mask.shape[0] == len(finish_reasons), f"{loss_mask.shape[0]} rows, {len(finish_reasons)} reasons"
    keep = torch.tensor([reason != TRUNCATED for reason in finish_reasons], dtype=loss_mask.dtype)  # (B,)
    return loss_mask * keep.unsqueeze(1)                                                            # (B, L)
