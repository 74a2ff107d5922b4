"""How a rollout batch is cut for the learner ranks: mini-batches, each rank's rows, micro-batches.

Pure functions of the rows' lengths and a seed, so that the driver can cut the batch once and send
each rank only its own rows (rlsys.cluster.learners.LearnerGroup.train) and a rank given the whole
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
from rlsys.math.flops import Shape, padded_forward_flops
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
    shared: bool = False
    """Micro-batches were planned with prompts shared: the rank lays them out so (rlsys.math.prefix)."""
    rows_computed_frac: float = 1.0
    """The share of the whole rollout batch's rows the plan computes, over every rank (the rest:
    zero advantage, learner.skip_zero_advantage)."""


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


def shared_sizes(bin_: list[int], lengths: list[int], prompt_lens: list[int], groups: list[int]) -> list[int]:
    """The sequences these rows become with prompts shared (rlsys.math.prefix): one per group, the
    prompt once then every answer; their lengths."""
    sizes: dict[int, int] = {}
    for i in bin_:
        sizes[groups[i]] = sizes.get(groups[i], prompt_lens[i]) + lengths[i] - prompt_lens[i]
    return list(sizes.values())


def padded_shared(bin_: list[int], lengths: list[int], prompt_lens: list[int], groups: list[int]) -> int:
    """Tokens a forward over these rows computes with prompts shared: sequences x the longest."""
    sizes = shared_sizes(bin_, lengths, prompt_lens, groups)
    return len(sizes) * max(sizes)


def shared_pairs(bin_: list[int], lengths: list[int], prompt_lens: list[int], groups: list[int]) -> int:
    """(query, key) pairs the attention of these rows computes with prompts shared
    (rlsys.math.prefix.prefix_attention): each sequence's prompt part over the longest prompt P,
    then every answer's R positions (R the longest answer) against P prompt keys and R of its own;
    or, where fewer (very uneven answers), every pair of each sequence padded to the longest.

    >>> shared_pairs([0, 1, 2], lengths=[7, 5, 3], prompt_lens=[3, 3, 2], groups=[0, 0, 1])  # 2*3*3 + 3*4*(3+4)
    102
    """
    answers = [lengths[i] - prompt_lens[i] for i in bin_ if lengths[i] > prompt_lens[i]]
    P, R = max(prompt_lens[i] for i in bin_), max(answers, default=0)
    sizes = shared_sizes(bin_, lengths, prompt_lens, groups)
    blocks, dense = len(sizes) * P * P + len(answers) * R * (P + R), len(sizes) * max(sizes) ** 2
    return min(blocks, dense)  # share_prompts applies the mask densely where that costs less


def micro_batches_by_tokens(rows: list[int], lengths: list[int], world: int, budget: int,
                            prompt_lens: list[int] | None = None, groups: list[int] | None = None
                            ) -> list[list[list[int]]]:
    """rows of one mini-batch -> per rank, its micro-batches: at most `budget` padded tokens each
    (a row longer than the budget alone), the same number on every rank, balanced by padded tokens.
    Needs len(rows) to be a multiple of `world` (then a split always reaches a multiple of it).

    The unit placed is a row, or, given each row's prompt length and group (prompts shared), a
    group's rows in this mini-batch: one sequence of prompt_len + its answers' tokens. A unit
    longer than the budget is cut into parts that fit (each with the prompt: one answer at least).

    Rows of lengths 8, 8, 4, 4, 4, 4, 2, 2 and a budget of 16: bins [8, 8], [4, 4, 4, 4], [2, 2]
    (3 bins; 2 ranks need an even count: the heaviest splittable bin, [8, 8] with 16 padded
    tokens, is halved), then 16 + 4 on one rank, 8 + 8 on the other:
    >>> L = [8, 8, 4, 4, 4, 4, 2, 2]
    >>> plan = micro_batches_by_tokens(list(range(8)), L, world=2, budget=16)
    >>> plan
    [[[2, 3, 4, 5], [6, 7]], [[0], [1]]]
    >>> [sum(padded(b, L) for b in rank) for rank in plan]
    [20, 16]

    The same rows as two groups of 4 with 2-token prompts, shared: group 0's answers are 6, 6, 2, 2
    tokens, one sequence of 2 + 16 = 18 (over the budget: cut into [0, 1, 2] of 16 and [3] of 4);
    group 1's are 2, 2, 0, 0, one sequence of 6. Bins: [0, 1, 2]; then group 1 with row 3 (two
    sequences of at most 6: 12 padded tokens):
    >>> plan = micro_batches_by_tokens(list(range(8)), L, world=2, budget=16, prompt_lens=[2] * 8,
    ...                                groups=[0, 0, 0, 0, 1, 1, 1, 1])
    >>> plan
    [[[0, 1, 2]], [[4, 5, 6, 7, 3]]]
    >>> [sum(padded_shared(b, L, [2] * 8, [0] * 4 + [1] * 4) for b in rank) for rank in plan]
    [16, 12]
    """
    assert len(rows) % world == 0, f"{len(rows)} rows do not split over {world} ranks"
    if prompt_lens is None or groups is None:
        cost = lambda bin_: padded(bin_, lengths)  # noqa: E731
        units = [[i] for i in rows]
    else:
        cost = lambda bin_: padded_shared(bin_, lengths, prompt_lens, groups)  # noqa: E731
        by_group: dict[int, list[int]] = {}
        for i in rows:
            by_group.setdefault(groups[i], []).append(i)
        units = []
        for unit in by_group.values():  # a group over the budget: parts that fit, in order
            unit = sorted(unit, key=lambda i: -lengths[i])
            units.append([unit[0]])
            for i in unit[1:]:
                if cost(units[-1] + [i]) <= budget:
                    units[-1].append(i)
                else:
                    units.append([i])
    # A bin is a list of units; its cost is that of all their rows. Longest unit first: a bin's
    # first unit sets its width (units are never wider than the first).
    bins: list[list[list[int]]] = []
    for unit in sorted(units, key=lambda u: -cost(u)):
        if bins and (len(bins[-1]) + 1) * cost(bins[-1][0]) <= budget:
            bins[-1].append(unit)
        else:
            bins.append([unit])
    flat = lambda bin_: [i for unit in bin_ for i in unit]  # noqa: E731

    def split_heaviest() -> bool:
        splittable = [b for b in bins if len(flat(b)) > 1]
        if not splittable:
            return False
        heaviest = max(splittable, key=lambda b: cost(flat(b)))
        k = bins.index(heaviest)
        if len(heaviest) > 1:                                    # halve by units
            half = len(heaviest) // 2
            bins[k:k + 1] = [heaviest[:half], heaviest[half:]]
        else:                                                    # one unit: halve its rows (each part keeps the prompt)
            unit = heaviest[0]
            half = len(unit) // 2
            bins[k:k + 1] = [[unit[:half]], [unit[half:]]]
        return True

    def deal() -> tuple[list[list[list[int]]], list[int]]:
        per_rank = len(bins) // world
        plan: list[list[list[int]]] = [[] for _ in range(world)]
        load = [0] * world
        for b in sorted(bins, key=lambda b: -cost(flat(b))):    # LPT: heaviest to the least loaded rank with room
            r = min((r for r in range(world) if len(plan[r]) < per_rank), key=lambda r: (load[r], r))
            plan[r].append(flat(b))
            load[r] += cost(flat(b))
        return plan, load

    while True:
        while len(bins) % world:                                 # every rank needs as many micro-batches
            assert split_heaviest(), "rows are a multiple of the world size: a split always exists"
        plan, load = deal()
        # Few large bins deal badly (a 3-group bin and a 1-group bin on 2 ranks: one waits for the
        # other, 3:1). Smaller micro-batches cost a little efficiency; a straggler costs the gap.
        if max(load) <= BALANCE * sum(load) / world or not split_heaviest():
            return plan


BALANCE = 1.25
"""The most loaded rank may hold this much more than the mean of padded tokens; beyond, the
heaviest micro-batch is split and the micro-batches dealt again."""


def trained_rows(rows: list[int], inert: list[bool], lengths: list[int], world: int) -> list[int]:
    """The rows of one mini-batch the learner computes: those not `inert` (no gradient: a zero
    advantage at beta 0), topped up with the shortest inert rows to a multiple of the world size,
    at least `world` (every rank computes a micro-batch and steps; an inert row's gradient is
    exactly 0, so the optimizer steps as if on the whole mini-batch). In `rows` order.

    >>> trained_rows([0, 1, 2, 3, 4, 5], [True, False, True, True, False, False], [5, 4, 3, 2, 9, 9], world=2)
    [1, 3, 4, 5]
    >>> trained_rows([0, 1, 2, 3], [True] * 4, [5, 4, 3, 2], world=2)
    [2, 3]
    """
    busy = [i for i in rows if not inert[i]]
    want = max(world, -(-len(busy) // world) * world)
    spare = sorted((i for i in rows if inert[i]), key=lambda i: (lengths[i], i))[:want - len(busy)]
    keep = set(busy) | set(spare)
    return [i for i in rows if i in keep]


def plan(lengths: list[int], world: int, mini_batch_size: int, micro_batch_size: int, max_tokens: int, seed: int,
         step: int, prompt_lens: list[int] | None = None, group_size: int = 0,
         inert: list[bool] | None = None) -> list[tuple[list[int], list[list[list[int]]]]]:
    """Every mini-batch of a rollout batch for update `step`: (its rows, per rank its micro-batches).
    Mini-batches follow a shuffle seeded by seed + step (the same on every rank and on the driver);
    within them, the layout above.

    group_size > 0 (prompts shared, rlsys.math.prefix): the batch is groups of that many rows with
    one prompt each (make_batch's layout); the shuffle moves whole groups, so a mini-batch holds
    whole groups (when mini_batch_size is a multiple of it), and token budgets count each group's
    prompt once.

    inert: per row, True where it has no gradient (learner.skip_zero_advantage): the micro-batches
    hold only trained_rows; a mini-batch's rows (its loss normaliser) are still all of them."""
    B = len(lengths)
    groups = None
    if group_size > 0:
        assert B % group_size == 0, f"{B} rows are not whole groups of {group_size}"
        perm = torch.randperm(B // group_size, generator=torch.Generator().manual_seed(seed + step)).tolist()
        order = [g * group_size + j for g in perm for j in range(group_size)]
        groups = [i // group_size for i in range(B)]
    else:
        order = torch.randperm(B, generator=torch.Generator().manual_seed(seed + step)).tolist()
    out = []
    for start in range(0, B, mini_batch_size):
        rows = order[start:start + mini_batch_size]
        packed = rows if inert is None else trained_rows(rows, inert, lengths, world)
        out.append((rows, micro_batches_by_tokens(packed, lengths, world, max_tokens, prompt_lens, groups)
                    if max_tokens > 0 else micro_batches_by_rows(packed, lengths, world, micro_batch_size)))
    return out


def plan_flops(shape: Shape, minis: list[tuple[list[int], list[list[list[int]]]]], lengths: list[int],
               prompt_lens: list[int] | None = None, group_size: int = 0) -> int:
    """Forward FLOPs of a plan's micro-batches over every rank: each micro-batch its rows padded to
    the longest (rlsys.math.flops.padded_forward_flops: attention over every pair of a padded
    sequence) or, prompts shared (group_size > 0), one sequence per group padded to the longest,
    its attention by blocks (shared_pairs)."""
    groups = [i // group_size for i in range(len(lengths))] if group_size > 0 else None
    total = 0
    for _, per_rank in minis:
        for micros in per_rank:
            for micro in micros:
                if groups is not None:
                    sizes = shared_sizes(micro, lengths, prompt_lens, groups)
                    total += padded_forward_flops(shape, len(sizes), max(sizes),
                                                  shared_pairs(micro, lengths, prompt_lens, groups))
                else:
                    total += padded_forward_flops(shape, len(micro), max(lengths[i] for i in micro))
    return total


def shard(batch: TrainBatch, rank: int, world: int, mini_batch_size: int, micro_batch_size: int,
          max_tokens: int, seed: int, step: int, aggregation: str, group_size: int = 0, shape: Shape | None = None,
          skip_zero_advantage: bool = False) -> Shard:
    """Rank `rank`'s part of a rollout batch for update `step` (the mini-batches of `plan`).

    group_size > 0 asks for shared prompts; given the model's `shape` too (and token budgets), the
    shared plan is kept only when its micro-batches cost fewer forward FLOPs than the rows plan's
    (plan_flops). Shared sequences pad every answer to the group's longest, and the rows plan,
    sorted by length over the whole mini-batch, pads less than a group's own rows: with long,
    uneven answers and short prompts rows can cost less.

    skip_zero_advantage: rows whose advantage is exactly 0 are left out of the micro-batches
    (trained_rows; the caller vouches that such a row has no gradient: beta 0, a GRPO update)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    inert = (batch.advantages == 0).tolist() if skip_zero_advantage else None
    prompt_lens = None
    if group_size > 0:
        if batch.prompt_lens is None:
            raise ValueError("learner.share_prompts needs each row's prompt length (TrainBatch.prompt_lens, "
                             "set by rlsys.math.batch.make_batch)")
        prompt_lens = batch.prompt_lens.tolist()
    minis = plan(lengths, world, mini_batch_size, micro_batch_size, max_tokens, seed, step, prompt_lens, group_size,
                 inert)
    if group_size > 0 and shape is not None and max_tokens > 0:
        rows = plan(lengths, world, mini_batch_size, micro_batch_size, max_tokens, seed, step, inert=inert)
        if plan_flops(shape, rows, lengths) < plan_flops(shape, minis, lengths, prompt_lens, group_size):
            minis, group_size = rows, 0
    mine: list[int] = []
    out: list[list[slice]] = []
    normalizers: list[float] = []
    for rows_of_mini, per_rank in minis:
        micros = []
        for micro in per_rank[rank]:
            micros.append(slice(len(mine), len(mine) + len(micro)))
            mine.extend(micro)
        out.append(micros)
        count = float(batch.loss_mask[rows_of_mini].sum()) if aggregation == "token" else float(len(rows_of_mini))
        normalizers.append(max(count, 1.0) / world)  # no loss token at all (every row masked): a loss of 0, not 0/0
    computed = sum(len(micro) for _, per_rank in minis for micros in per_rank for micro in micros)
    return Shard(batch.select(torch.tensor(mine)), out, normalizers, step, shared=group_size > 0,
                 rows_computed_frac=computed / len(batch))


def cut(batch: TrainBatch, rank: int, world: int, cfg: LearnerConfig, algo: AlgoConfig, seed: int, step: int,
        shape: Shape | None = None, grpo: bool = True) -> Shard:
    """Rank `rank`'s Shard of a rollout batch for update `step`, as the learner config lays it out
    (shape: the model's, to keep shared prompts only where they are cheaper). grpo: the batch is
    for a GRPO update (False: a supervised step, whose rows all have a gradient)."""
    skip = grpo and cfg.skip_zero_advantage and algo.beta == 0.0
    return shard(batch, rank, world, cfg.mini_batch_size, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                 seed, step, algo.aggregation, algo.group_size if cfg.share_prompts else 0, shape, skip)
