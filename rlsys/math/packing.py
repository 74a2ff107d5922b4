"""How a rollout batch is cut for the learner ranks: mini-batches, each rank's rows, micro-batches.

Pure functions of the rows' lengths and a seed, so that the driver can cut the batch once and send
each rank only its own rows (rlsys.cluster.groups.LearnerGroup.train) and a rank given the whole
batch cuts the same (rlsys.actors.learner.Learner.train).

Two layouts:
- rows (learner.max_tokens_per_micro_batch = 0): each rank takes an equal share of every
  mini-batch, sorted by length, in micro-batches of micro_batch_size rows. A rank that draws the
  long rows is the straggler, and a micro-batch of short rows is small.
- tokens (> 0): the mini-batch's rows, longest first, fill micro-batches up to the token budget
  (rows x longest row, the padded size a forward really computes), so a micro-batch of short rows
  holds many of them; the micro-batches are then dealt to the ranks by their padded tokens,
  heaviest first to the least loaded rank (LPT), every rank getting the same number of them
  (ZeRO-2/3 run collectives in every forward and backward: ranks must step in lockstep).

The loss normaliser of a mini-batch is its response-token count (or row count) over the
data-parallel world: DeepSpeed averages the ranks' gradients, so the sum over ranks and
micro-batches of the micro losses is the mini-batch loss, however the rows fall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsys.config import AlgoConfig, LearnerConfig
from rlsys.types import TrainBatch


@dataclass
class Shard:
    """One rank's part of one rollout batch."""

    batch: TrainBatch
    """This rank's rows only, micro-batch after micro-batch, trimmed to its longest row."""
    minis: list[list[slice]]
    """Per mini-batch, its micro-batches as row ranges of `batch` (every rank has as many)."""
    normalizers: list[float]
    """Per mini-batch: the loss normaliser (its response tokens, or rows, over the world size)."""
    step: int
    """The learner update this shard is for (batches trained before it): the shuffle's seed is
    seed + step, and a rank checks it is at the same update as the driver that cut the batch."""


def micro_batches_by_rows(rows: list[int], lengths: list[int], world: int, micro: int) -> list[list[list[int]]]:
    """rows of one mini-batch -> per rank, its micro-batches (lists of row ids): rank r takes the
    r-th equal slice, sorted by length (stable), cut every `micro` rows.

    >>> micro_batches_by_rows([5, 1, 4, 0], lengths=[3, 9, 9, 9, 2, 1], world=2, micro=1)
    [[[5], [1]], [[4], [0]]]
    """
    per_rank = len(rows) // world
    out = []
    for r in range(world):
        mine = sorted(rows[r * per_rank:(r + 1) * per_rank], key=lambda i: lengths[i])
        out.append([mine[j:j + micro] for j in range(0, per_rank, micro)])
    return out


def padded(bin_: list[int], lengths: list[int]) -> int:
    """Tokens a forward over these rows computes: rows x the longest."""
    return len(bin_) * max(lengths[i] for i in bin_)


def micro_batches_by_tokens(rows: list[int], lengths: list[int], world: int, budget: int) -> list[list[list[int]]]:
    """rows of one mini-batch -> per rank, its micro-batches: at most `budget` padded tokens each
    (a row longer than the budget alone), the same number on every rank, balanced by padded tokens.
    Needs len(rows) to be a multiple of `world` (then a split always reaches a multiple of it).

    Rows of lengths 8, 8, 4, 4, 4, 4, 2, 2 and a budget of 16: bins [8, 8], [4, 4, 4, 4], [2, 2]
    (3 bins; 2 ranks need an even count: the heaviest splittable bin, [8, 8] with 16 padded
    tokens, is halved), then 16 + 4 on one rank, 8 + 8 on the other:
    >>> L = [8, 8, 4, 4, 4, 4, 2, 2]
    >>> plan = micro_batches_by_tokens(list(range(8)), L, world=2, budget=16)
    >>> plan
    [[[2, 3, 4, 5], [6, 7]], [[0], [1]]]
    >>> [sum(padded(b, L) for b in rank) for rank in plan]
    [20, 16]
    """
    assert len(rows) % world == 0, f"{len(rows)} rows do not split over {world} ranks"
    ordered = sorted(rows, key=lambda i: -lengths[i])            # longest first: a bin's first row sets its width
    bins: list[list[int]] = []
    for i in ordered:
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    while len(bins) % world:                                     # every rank needs as many micro-batches
        splittable = [b for b in bins if len(b) > 1]
        heaviest = max(splittable, key=lambda b: padded(b, lengths))
        k = bins.index(heaviest)
        half = len(heaviest) // 2
        bins[k:k + 1] = [heaviest[:half], heaviest[half:]]
    per_rank = len(bins) // world
    plan: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for b in sorted(bins, key=lambda b: -padded(b, lengths)):   # LPT: heaviest to the least loaded rank with room
        r = min((r for r in range(world) if len(plan[r]) < per_rank), key=lambda r: (load[r], r))
        plan[r].append(b)
        load[r] += padded(b, lengths)
    return plan


def shard(batch: TrainBatch, rank: int, world: int, mini_batch_size: int, micro_batch_size: int,
          max_tokens: int, seed: int, step: int, aggregation: str) -> Shard:
    """Rank `rank`'s part of a rollout batch for update `step`. Mini-batches follow a shuffle seeded
    by seed + step (the same on every rank and on the driver); within them, the layout above."""
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed + step)).tolist()
    lengths = batch.attention_mask.sum(dim=1).tolist()
    mine: list[int] = []
    minis: list[list[slice]] = []
    normalizers: list[float] = []
    for start in range(0, len(batch), mini_batch_size):
        rows = order[start:start + mini_batch_size]
        plan = (micro_batches_by_tokens(rows, lengths, world, max_tokens) if max_tokens > 0
                else micro_batches_by_rows(rows, lengths, world, micro_batch_size))
        micros = []
        for micro in plan[rank]:
            micros.append(slice(len(mine), len(mine) + len(micro)))
            mine.extend(micro)
        minis.append(micros)
        count = float(batch.loss_mask[rows].sum()) if aggregation == "token" else float(len(rows))
        normalizers.append(max(count, 1.0) / world)  # no loss token at all (every row masked): a loss of 0, not 0/0
    return Shard(batch.select(torch.tensor(mine)), minis, normalizers, step)


def cut(batch: TrainBatch, rank: int, world: int, cfg: LearnerConfig, algo: AlgoConfig, seed: int, step: int
        ) -> Shard:
    """Rank `rank`'s Shard of a rollout batch for update `step`, as the learner config lays it out."""
    return shard(batch, rank, world, cfg.mini_batch_size, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                 seed, step, algo.aggregation)
