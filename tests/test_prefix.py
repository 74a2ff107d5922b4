"""Shared prompts (rlsys.math.prefix): a group's rows as one sequence give each row exactly the
log-probs and gradients it has alone, and the planner (rlsys.math.packing) counts a shared prompt once."""

import doctest
import random

import pytest
import torch

from rlsys.actors.logprobs import with_logprob_forward
from rlsys.math import packing, prefix
from rlsys.math.packing import micro_batches_by_tokens, padded_shared, shard
from rlsys.math.prefix import share_prompts
from rlsys.types import TrainBatch


def test_doctests():
    assert doctest.testmod(prefix).failed == 0
    assert doctest.testmod(packing).failed == 0


def tiny_llama(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return with_logprob_forward(LlamaForCausalLM(cfg).float())


def rows_of(prompts: list[list[int]], answers: list[list[list[int]]]):
    """Right-padded rows, group after group: (ids (B, L), lengths (B,), prompt_lens (B,))."""
    seqs = [(p, a) for p, group in zip(prompts, answers) for a in group]
    L = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
    return ids, torch.tensor([len(p) + len(a) for p, a in seqs]), torch.tensor([len(p) for p, _ in seqs])


def one_by_one(model, ids, lengths, start):
    """Each row alone, unpadded: log-probs of its tokens start + 1 .. length - 1, (B, L - 1 - start) zero-padded."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1 - start)
    for i, n in enumerate(lengths.tolist()):
        logits = model(input_ids=ids[i:i + 1, :n]).logits[0].float()                 # (n, V)
        logp = torch.log_softmax(logits[start:n - 1], dim=-1)                        # (n - 1 - start, V)
        out[i, :n - 1 - start] = logp.gather(-1, ids[i, start + 1:n, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_layout_scores_every_row_as_it_scores_alone(attn):
    """sdpa: the learner's attention (with_logprob_forward makes it rlsys_prefix: attention by blocks
    when prefix_blocks are passed); eager: the block mask applied densely."""
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 97) for _ in range(n)] for n in (9, 4, 6)]
    answers = [[[rng.randrange(1, 97) for _ in range(n)] for n in lens] for lens in ([5, 1, 8, 3], [7, 2], [0, 4])]
    ids, lengths, prompt_lens = rows_of(prompts, answers)
    model = tiny_llama(attn)
    start = 3  # one before the earliest answer token would be 3 (prompt of 4); scores prompt tails too
    lay = share_prompts(ids, lengths, prompt_lens, start)
    assert lay.input_ids.shape[0] == 3                       # one sequence per prompt
    assert lay.tokens < int(lengths.sum())                   # fewer positions than the rows have tokens
    with torch.no_grad():
        shared = model(input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask,
                       logprobs_of=lay.targets, source=lay.source, temperature=1.0, chunk=5, prefix_blocks=lay.blocks)
        alone = one_by_one(model, ids, lengths, start)
    assert model.config._attn_implementation == {"sdpa": "rlsys_prefix", "eager": "eager"}[attn]
    scored = torch.arange(ids.shape[1] - 1 - start)[None, :] < (lengths - 1 - start)[:, None]   # (B, T)
    assert torch.allclose(shared[scored], alone[scored], atol=1e-5)
    assert scored.sum() == int((lengths - 1 - start).sum())


def test_shared_layout_gives_the_same_gradient():
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 97) for _ in range(12)], [rng.randrange(1, 97) for _ in range(5)]]
    answers = [[[rng.randrange(1, 97) for _ in range(n)] for n in lens] for lens in ([3, 6, 2], [4, 4])]
    ids, lengths, prompt_lens = rows_of(prompts, answers)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1 - 4, generator=torch.Generator().manual_seed(0))
    scored = torch.arange(weights.shape[1])[None, :] < (lengths - 5)[:, None]
    grads = []
    for share in (False, "dense", "blocks"):
        model = tiny_llama("sdpa")
        if share:
            lay = share_prompts(ids, lengths, prompt_lens, start=4)
            logp = model(input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask,
                         logprobs_of=lay.targets, source=lay.source, temperature=1.0, chunk=4,
                         prefix_blocks=lay.blocks if share == "blocks" else None)
        else:
            logp = model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1])[None] < lengths[:, None]).long(),
                         logprobs_of=ids[:, 5:], scored_from=4, temperature=1.0, chunk=4)
        (logp * weights * scored).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert torch.allclose(grads[0], grads[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_attention_equals_dense_attention_under_the_block_mask(dtype):
    """Ragged prompts and answers (one empty), grouped-query heads: outputs and gradients at every
    real position match SDPA with block_mask applied densely."""
    segment = torch.tensor([[0] * 5 + [1] * 3 + [2] * 1 + [3] * 4 + [-1] * 2,
                            [0] * 2 + [2] * 6 + [-1] * 7])                          # (2, 15): seq 1 has no answer 1
    S, Lp, H, Hkv, D = 2, 15, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(S, h, Lp, D, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=prefix.block_mask(segment), scale=0.3
    ).transpose(1, 2)                                                                 # (S, Lp, H, D)
    blocks = prefix.prefix_attention(q, k, v, prefix.prefix_blocks(segment), scaling=0.3)
    real = segment >= 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(dense[real].float(), blocks[real].float(), atol=tol)
    w = torch.randn(S, Lp, H, D, generator=g).to(dtype) * real[:, :, None, None]
    grads = [torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (dense, blocks)]
    for a, b in zip(*grads):
        assert torch.allclose(a.float(), b.float(), atol=tol * 5)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shared_budget_keeps_every_row_once_within_budget_and_ranks_in_lockstep(world):
    rng = random.Random(world)
    for trial in range(50):
        G = rng.choice([2, 4, 8])
        n_groups = world * rng.randint(1, 4)
        prompt_lens = [p for p in (rng.randint(5, 200) for _ in range(n_groups)) for _ in range(G)]
        lengths = [p + rng.randint(0, 150) for p in prompt_lens]
        groups = [i // G for i in range(len(lengths))]
        budget = rng.choice([128, 512, 2048])
        rows = list(range(len(lengths)))
        plan = micro_batches_by_tokens(rows, lengths, world, budget, prompt_lens, groups)
        assert sorted(i for rank in plan for micro in rank for i in micro) == rows
        assert len({len(rank) for rank in plan}) == 1, "every rank needs as many micro-batches"
        for micro in (m for rank in plan for m in rank):
            assert len(micro) == 1 or padded_shared(micro, lengths, prompt_lens, groups) <= budget


def test_sharing_fits_a_group_in_one_micro_batch_that_rows_would_cut_in_four():
    # A group of 8: a 200-token prompt and answers of 50. Row by row, 8 x 250 = 2000 tokens; shared,
    # 200 + 8 x 50 = 600. With a budget of 600: rows take 4 micro-batches of 2 (500 each), shared one.
    lengths, prompt_lens, groups = [250] * 8, [200] * 8, [0] * 8
    assert len(micro_batches_by_tokens(list(range(8)), lengths, 1, 600)[0]) == 4
    assert micro_batches_by_tokens(list(range(8)), lengths, 1, 600, prompt_lens, groups) == [[list(range(8))]]


def test_shard_with_groups_moves_whole_groups_into_mini_batches():
    G, B = 4, 16
    lengths = [10 + (i % 5) for i in range(B)]
    attention = torch.zeros(B, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        attention[i, :n] = 1
    ids = (torch.arange(B) // G + 1).unsqueeze(1) * attention                         # a group's rows: same tokens
    loss = attention.float()
    loss[:, :6] = 0
    batch = TrainBatch(ids, attention, loss, torch.zeros_like(loss), torch.arange(B, dtype=torch.float),
                       torch.zeros(B), prompt_lens=torch.full((B,), 6))
    # every mini-batch holds exactly two whole groups, over both ranks
    shards = [shard(batch, r, 2, 8, 2, 64, 0, 0, "token", group_size=G) for r in range(2)]
    for m in range(2):
        rows = sorted(int(s.batch.advantages[i]) for s in shards for sl in s.minis[m] for i in range(sl.start, sl.stop))
        groups = sorted({r // G for r in rows})
        assert len(groups) == 2 and rows == sorted(g * G + j for g in groups for j in range(G))
    with pytest.raises(ValueError, match="prompt_lens"):
        shard(TrainBatch(ids, attention, loss, torch.zeros_like(loss), torch.zeros(B), torch.zeros(B)),
              0, 1, 8, 2, 64, 0, 0, "token", group_size=G)
