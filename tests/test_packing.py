"""How a rollout batch is cut for the learner ranks (rlsys.math.packing): every row once, budgets
kept, ranks in lockstep and balanced, the loss normaliser of the whole mini-batch."""

import random

import pytest
import torch

from rlsys.math.packing import micro_batches_by_rows, micro_batches_by_tokens, padded, shard
from rlsys.types import TrainBatch


def batch_of(lengths: list[int], prompt: int = 2) -> TrainBatch:
    B, L = len(lengths), max(lengths)
    attention = torch.zeros(B, L, dtype=torch.long)
    loss = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
        loss[i, prompt:n] = 1
    ids = torch.arange(B).unsqueeze(1).expand(B, L) * attention  # row i's tokens are i: rows can be traced
    return TrainBatch(ids, attention, loss, torch.zeros(B, L), torch.arange(B, dtype=torch.float), torch.zeros(B))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_token_budget_keeps_every_row_once_within_budget_and_ranks_in_lockstep(world):
    rng = random.Random(world)
    for trial in range(50):
        n = world * rng.randint(1, 12)
        lengths = [rng.randint(3, 300) for _ in range(n)]
        budget = rng.choice([64, 256, 1024])
        plan = micro_batches_by_tokens(list(range(n)), lengths, world, budget)
        rows = sorted(i for rank in plan for micro in rank for i in micro)
        assert rows == list(range(n))
        assert len({len(rank) for rank in plan}) == 1, "every rank needs as many micro-batches"
        for micro in (m for rank in plan for m in rank):
            assert len(micro) == 1 or padded(micro, lengths) <= budget


def test_token_budget_balances_ranks_that_fixed_rows_leave_unbalanced():
    # 8 rows, 2 ranks: the shuffle put the 4 long rows first. Fixed rows give rank 0 all of them
    # (4 x 100 = 400 tokens against 4 x 10 = 40): rank 1 waits for rank 0. By tokens (budget 200):
    # bins [100, 100], [100, 100], [10 x 4]; 3 bins for 2 ranks, so a [100, 100] is halved; then
    # heaviest first to the least loaded rank: 200 -> 0, 100 -> 1, 100 -> 1, 40 -> 0: 240 and 200.
    lengths = [100, 100, 100, 100, 10, 10, 10, 10]
    rows = micro_batches_by_rows(list(range(8)), lengths, world=2, micro=2)
    assert [sum(padded(m, lengths) for m in rank) for rank in rows] == [400, 40]
    tokens = micro_batches_by_tokens(list(range(8)), lengths, world=2, budget=200)
    assert [sum(padded(m, lengths) for m in rank) for rank in tokens] == [240, 200]


def test_short_rows_share_a_micro_batch_that_fixed_rows_would_split():
    # 16 rows of 10 tokens: a budget of 160 holds them all in one forward; micro_batch_size 4 makes 4.
    assert micro_batches_by_tokens(list(range(16)), [10] * 16, world=1, budget=160) == [[list(range(16))]]
    assert len(micro_batches_by_rows(list(range(16)), [10] * 16, world=1, micro=4)[0]) == 4


@pytest.mark.parametrize("max_tokens", [0, 40])
def test_each_rank_gets_only_its_rows_and_the_whole_minibatch_normaliser(max_tokens):
    lengths = [12, 5, 9, 30, 7, 3, 18, 6]
    batch = batch_of(lengths)
    shards = [shard(batch, r, 2, mini_batch_size=4, micro_batch_size=2, max_tokens=max_tokens, seed=1, step=3,
                    aggregation="token") for r in range(2)]
    order = torch.randperm(8, generator=torch.Generator().manual_seed(4)).tolist()  # seed + step
    seen = []
    for s in shards:
        assert len(s.minis) == 2 and s.step == 3
        assert s.batch.input_ids.shape[1] == int(s.batch.attention_mask.sum(1).max())  # trimmed to its own rows
        for m, micros in enumerate(s.minis):
            rows = [int(s.batch.advantages[i]) for sl in micros for i in range(sl.start, sl.stop)]
            assert set(rows) <= set(order[4 * m:4 * m + 4])  # a mini-batch's rows come from its part of the shuffle
            seen += rows
            whole = sum(lengths[i] - 2 for i in order[4 * m:4 * m + 4])  # response tokens of the mini-batch
            assert s.normalizers[m] == whole / 2
    assert sorted(seen) == list(range(8))


def test_shared_prompts_are_kept_only_where_their_plan_costs_fewer_flops():
    # 2 groups of 4 rows. 100-token prompts, 8-token answers, SmolLM2-shaped model: the shared plan
    # computes each prompt once and wins. 10-token prompts to one 1000-token answer and three of 300
    # on a 1-layer, 64-wide model, budget 2048: a group (1910 positions) fills a micro-batch alone
    # and its blocks pad every answer to 1000 (or its mask is dense, 1910^2 pairs), while rows,
    # sorted by length over both groups, pair the two 1010s and put the six 310s together:
    # the shared plan costs 2.5x and the rows plan is kept.
    from rlsys.math.flops import Shape

    smollm2, small = Shape(576, 30, 9, 3, 64, 1536, 49152), Shape(64, 1, 4, 4, 16, 16, 1000)
    for shape, prompt, answers, budget, shared in ((smollm2, 100, [8] * 4, 8192, True),
                                                   (small, 10, [1000, 300, 300, 300], 2048, False)):
        batch = batch_of([prompt + a for a in answers * 2], prompt)
        batch.prompt_lens = torch.full((8,), prompt)
        batch.input_ids[:, :prompt] = (torch.arange(8) // 4).unsqueeze(1)  # one prompt a group
        work = shard(batch, 0, 1, 8, 8, budget, seed=0, step=0, aggregation="token", group_size=4, shape=shape)
        assert work.shared == shared
        assert sorted(work.batch.advantages.tolist()) == list(range(8))  # every row once either way
        assert shard(batch, 0, 1, 8, 8, 8192, 0, 0, "token", group_size=4).shared  # no shape: as asked


@pytest.mark.parametrize("max_tokens", [0, 40])
def test_zero_advantage_rows_leave_the_micro_batches_but_not_the_normaliser(max_tokens):
    # 8 rows, 2 ranks, mini-batches of 4. Advantages 0 on rows 0-4: a mini-batch keeps its other
    # rows, topped up with its shortest zero rows to a multiple of the ranks (each rank steps);
    # its normaliser is still every row's response tokens.
    lengths = [12, 5, 9, 30, 7, 3, 18, 6]
    batch = batch_of(lengths)
    batch.advantages = torch.tensor([0.0] * 5 + [1.0, -1.0, 2.0])
    whole, skipped = ([shard(batch, r, 2, 4, 2, max_tokens, seed=1, step=3, aggregation="token",
                             skip_zero_advantage=skip) for r in range(2)] for skip in (False, True))
    for a, b in zip(whole, skipped):
        assert a.normalizers == b.normalizers and a.rows_computed_frac == 1.0
        assert len(a.minis) == len(b.minis) == 2
    order = torch.randperm(8, generator=torch.Generator().manual_seed(4)).tolist()  # seed + step
    computed = []
    for m in range(2):
        rows = order[4 * m:4 * m + 4]
        busy = [i for i in rows if i >= 5]
        zero = sorted((i for i in rows if i < 5), key=lambda i: lengths[i])
        want = zero[:max(2, -(-len(busy) // 2) * 2) - len(busy)] + busy
        got = [int(s.batch.input_ids[i, 0]) for s in skipped for sl in s.minis[m] for i in range(sl.start, sl.stop)]
        assert sorted(got) == sorted(want), (m, rows)
        assert len({len(s.minis[m]) for s in skipped}) == 1  # lockstep: every rank as many micro-batches
        computed += got
    assert len(computed) < 8
    assert all(s.rows_computed_frac == len(computed) / 8 for s in skipped)  # every rank's rows, over the batch
