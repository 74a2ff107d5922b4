"""Shared prompts: a micro-batch's rows that share a prompt go through the learner as ONE sequence.

GRPO samples `group_size` answers to each prompt, and in R1-Zero work the prompt (template, system
prompt, question) is often as long as the answers or longer: row by row the learner computes every
prompt group_size times. Laid out shared, a group is one sequence, the prompt once and then every
answer after it:

    tokens     p0 p1 p2 | a0 a1 | b0 b1 b2 | pad
    positions   0  1  2 |  3  4 |  3  4  5 |  0
    segment     0  0  0 |  1  1 |  2  2  2 | -1

and a block attention mask: a token sees the prompt and the earlier tokens of its own answer,
nothing of the other answers. Each answer's positions continue from the prompt's, so every token
gets exactly the attention inputs it has in its own row: the same log-probs and the same gradient,
for P + sum(n_i) tokens instead of G * P + sum(n_i). (Prefix sharing; the same idea as
"Prefix Grouper", 2025.) rlsys.math.packing plans micro-batches with this cost.

Attention follows the blocks instead of applying the mask densely (`prefix_attention`, the
learner's attention implementation when a layout's `blocks` are passed): the prompts causally, then
every answer's queries against its prompt's keys and its own, batched over the answers. A group
then costs P^2 + sum n_i (P + n_i) attended pairs instead of (P + sum n_i)^2: for the R1 template's
~200-token prompts and 8 answers of 64 tokens, 2.9x fewer. On 2 AMD EPYC (Zen 4) cores the
attention ops of a SmolLM2 update took 2.0 s instead of 4.2 in bf16, but the gathers around them
give some of it back: forward + backward of a 2-group micro-batch 5.0 s instead of 5.4 in bf16,
9.3 instead of 9.8 in fp32 (benchmarks/limits.py, 2026-12-05). Fewer positions are still not always less
work (the packed sequence pads to the longest group): rlsys.math.packing.shard keeps the shared
plan only when it costs fewer FLOPs than the rows plan.

Log-probs come back in the row layout, (B, L) as before: `source` says which packed position's
hidden state predicts each row's token t (position t - 1 of the row; for an answer's first token,
the prompt's last position, shared by every answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SharedLayout:
    """One micro-batch laid out with its prompts shared."""

    input_ids: torch.Tensor       # (S, Lp) long: one sequence per distinct prompt, right-padded with 0
    position_ids: torch.Tensor    # (S, Lp) long
    attention_mask: torch.Tensor  # (S, 1, Lp, Lp) bool: True = query (row) may attend to key (column)
    source: torch.Tensor          # (B, T) long: flat index into (S * Lp) of the hidden state scoring each target
    targets: torch.Tensor         # (B, T) long: the row's token at position start + 1 + j (0 past its end)
    start: int
    """Targets are the rows' tokens from position start + 1 on (rlsys.actors.logprobs.scored_from)."""
    blocks: "PrefixBlocks | None" = None
    """The same mask as blocks, for prefix_attention (None: apply attention_mask densely)."""

    @property
    def tokens(self) -> int:
        """Positions the forward computes (padding included)."""
        return self.input_ids.numel()


def block_mask(segment: torch.Tensor) -> torch.Tensor:
    """segment (S, Lp): 0 = prompt, s >= 1 = answer s, -1 = padding -> (S, 1, Lp, Lp) bool mask.

    Query q sees key k iff k <= q, k is real, and k is prompt or in q's own answer. Every position
    also sees itself, so no row of the mask is empty (an empty row is NaN in softmax, even for
    padding whose output is never used).

    >>> block_mask(torch.tensor([[0, 0, 1, 2, -1]]))[0, 0].int()
    tensor([[1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [0, 0, 0, 0, 1]], dtype=torch.int32)
    """
    Lp = segment.shape[1]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]                         # (S, Lp, 1), (S, 1, Lp)
    causal = torch.ones(Lp, Lp, dtype=torch.bool).tril()                              # (Lp, Lp)
    visible = (k_seg == 0) | (k_seg == q_seg)                                         # (S, Lp, Lp)
    allowed = causal & visible & (k_seg >= 0) & (q_seg >= 0)                          # (S, Lp, Lp)
    return (allowed | torch.eye(Lp, dtype=torch.bool)).unsqueeze(1)                   # (S, 1, Lp, Lp)


def share_prompts(input_ids: torch.Tensor, lengths: torch.Tensor, prompt_lens: torch.Tensor, start: int
                  ) -> SharedLayout:
    """Rows (B, L) right-padded, their real lengths (B,) and prompt lengths (B,) -> the shared layout.

    Rows whose prompts are the same tokens share one sequence (in their order in the batch), and
    log-probs are wanted for each row's tokens at positions start + 1 .. L - 1.

    Two answers to one prompt [5, 6] and one answer to another prompt [7]:
    >>> ids = torch.tensor([[5, 6, 1, 2], [5, 6, 3, 0], [7, 4, 0, 0]])
    >>> lay = share_prompts(ids, lengths=torch.tensor([4, 3, 2]), prompt_lens=torch.tensor([2, 2, 1]), start=0)
    >>> lay.input_ids.tolist(), lay.position_ids.tolist()
    ([[5, 6, 1, 2, 3], [7, 4, 0, 0, 0]], [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]])
    >>> lay.source.tolist()  # row 1's token 3 is predicted by the prompt's last position (1), like row 0's token 1
    [[0, 1, 2], [0, 1, 0], [5, 0, 0]]
    >>> lay.targets.tolist()
    [[6, 1, 2], [6, 3, 0], [4, 0, 0]]
    """
    B, L = input_ids.shape
    T = L - 1 - start
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(B):
        groups.setdefault(tuple(input_ids[i, :int(prompt_lens[i])].tolist()), []).append(i)
    sizes = [len(prompt) + sum(int(lengths[i] - prompt_lens[i]) for i in rows) for prompt, rows in groups.items()]
    S, Lp = len(groups), max(sizes)
    ids = torch.zeros(S, Lp, dtype=torch.long)                                        # (S, Lp)
    pos = torch.zeros(S, Lp, dtype=torch.long)                                        # (S, Lp)
    segment = torch.full((S, Lp), -1, dtype=torch.long)                               # (S, Lp)
    source = torch.zeros(B, T, dtype=torch.long)                                      # (B, T)
    targets = torch.zeros(B, T, dtype=torch.long)                                     # (B, T)
    for s, (prompt, rows) in enumerate(groups.items()):
        P = len(prompt)
        ids[s, :P], pos[s, :P], segment[s, :P] = torch.tensor(prompt, dtype=torch.long), torch.arange(P), 0
        at = P  # where the next answer starts in sequence s
        for n, i in enumerate(rows, start=1):
            length = int(lengths[i])
            R = length - P
            ids[s, at:at + R] = input_ids[i, P:length]
            pos[s, at:at + R] = torch.arange(P, length)
            segment[s, at:at + R] = n
            # Row position t (start < t < length) is scored by the row's position t - 1: a prompt
            # position (< P) in the shared prompt, an answer position (>= P) in this answer's segment.
            t = torch.arange(start + 1, length)                                       # (n_t,)
            before = t - 1
            packed = torch.where(before < P, before, at + before - P)                 # (n_t,)
            source[i, :len(t)] = s * Lp + packed
            targets[i, :len(t)] = input_ids[i, start + 1:length]
            at += R
    blocks = prefix_blocks(segment)
    # Answers pad to the longest in the blocks: with very uneven answers the dense mask costs less.
    return SharedLayout(ids, pos, block_mask(segment), source, targets, start,
                        blocks if blocks.pairs < S * Lp * Lp else None)



@dataclass
class PrefixBlocks:
    """The block structure of a shared layout, as index tensors for prefix_attention. A: answers in
    all sequences, R: the longest answer, P: the longest prompt."""

    prompt: int                   # P: every sequence's prompt lies in positions [0, P)
    answer_seq: torch.Tensor      # (A,) long: the sequence of each answer
    answer_pos: torch.Tensor      # (A, R) long: flat index into (S * Lp) of each answer position (0 past its end)
    real: torch.Tensor            # (A, R) bool: a real answer position (not padding)
    mask: torch.Tensor            # (A, 1, R, P + R) bool: its prompt's real keys, then its own keys causally
    sequences: int                # S

    @property
    def pairs(self) -> int:
        """(query, key) pairs prefix_attention computes: each sequence's P x P prompt part, then
        every answer's R x (P + R) (rlsys.math.packing.shared_pairs counts the same before a layout exists)."""
        return self.sequences * self.prompt ** 2 + self.mask.shape[0] * self.mask.shape[2] * self.mask.shape[3]

    def to(self, device) -> "PrefixBlocks":
        return PrefixBlocks(self.prompt, self.answer_seq.to(device), self.answer_pos.to(device),
                            self.real.to(device), self.mask.to(device), self.sequences)


def prefix_blocks(segment: torch.Tensor) -> PrefixBlocks:
    """segment (S, Lp) (as block_mask takes it) -> the blocks; every sequence starts with its prompt.

    >>> b = prefix_blocks(torch.tensor([[0, 0, 1, 2, 2], [0, 1, -1, -1, -1]]))
    >>> b.prompt, b.answer_seq.tolist(), b.answer_pos.tolist(), b.real.tolist()
    (2, [0, 0, 1], [[2, 0], [3, 4], [6, 0]], [[True, False], [True, True], [True, False]])
    >>> b.pairs  # 2 x 2^2 + 3 answers x 2 x (2 + 2), against 2 x 5^2 dense
    32
    >>> b.mask[1, 0].int()  # answer 2 of sequence 0: both prompt keys, then its own causally
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)
    >>> b.mask[2, 0].int()  # sequence 1's prompt is 1 token; a padded query row still sees key 0
    tensor([[1, 0, 1, 0],
            [1, 0, 0, 0]], dtype=torch.int32)
    """
    S, Lp = segment.shape
    prompt_lens = (segment == 0).sum(dim=1)                                           # (S,)
    P = int(prompt_lens.max())
    spans = []  # (sequence, first position, length) of every answer (an empty answer has no segment)
    for s in range(S):
        for n in segment[s].unique().tolist():
            if n >= 1:
                where = (segment[s] == n).nonzero().flatten()
                spans.append((s, int(where[0]), len(where)))
    A, R = len(spans), max((n for *_, n in spans), default=1)
    answer_seq = torch.tensor([s for s, *_ in spans], dtype=torch.long)               # (A,)
    offsets = torch.arange(R)                                                         # (R,)
    first = torch.tensor([s * Lp + at for s, at, _ in spans], dtype=torch.long)       # (A,)
    real = offsets[None, :] < torch.tensor([n for *_, n in spans])[:, None]           # (A, R)
    answer_pos = torch.where(real, first[:, None] + offsets[None, :], 0)              # (A, R)
    sees_prompt = torch.arange(P)[None, :] < prompt_lens[answer_seq][:, None]         # (A, P)
    causal = torch.ones(R, R, dtype=torch.bool).tril()                                # (R, R)
    own = causal[None] & real[:, None, :] & real[:, :, None]                          # (A, R, R)
    mask = torch.cat([sees_prompt[:, None, :].expand(A, R, P), own], dim=2)           # (A, R, P + R)
    mask[:, :, 0] |= ~real  # a padded query row sees key 0 (a prompt token), never an empty row
    return PrefixBlocks(P, answer_seq, answer_pos, real, mask.unsqueeze(1), S)


def prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: PrefixBlocks,
                     scaling: float | None = None) -> torch.Tensor:
    """Attention of a shared layout by its blocks: the same result as scaled dot-product attention
    under block_mask, for P^2 + A R (P + R) attended pairs instead of S Lp^2.

    query (S, H, Lp, D); key, value (S, Hkv, Lp, D) (grouped-query: each kv head serves H / Hkv
    query heads) -> (S, Lp, H, D), the layout HF's attention functions return. Padding positions
    get a prompt position's output (never used: nothing scores from them)."""
    F = torch.nn.functional
    S, H, Lp, D = query.shape
    key = key.repeat_interleave(H // key.shape[1], dim=1)                             # (S, H, Lp, D)
    value = value.repeat_interleave(H // value.shape[1], dim=1)                       # (S, H, Lp, D)
    P = blocks.prompt
    # Prompts: causal within [0, P); positions of a shorter prompt's answers in there are recomputed below.
    prompts = F.scaled_dot_product_attention(query[:, :, :P], key[:, :, :P], value[:, :, :P], is_causal=True,
                                             scale=scaling)                           # (S, H, P, D)
    # index_select, not advanced indexing: its backward is an index_add, where indexing's is a
    # sorting index_put (measured: a third of the time the blocks save, on 2 CPU cores)
    A, R = blocks.answer_pos.shape
    flat = lambda x: x.transpose(1, 2).reshape(S * Lp, H, D)                          # (S * Lp, H, D)
    pick = lambda x: flat(x).index_select(0, blocks.answer_pos.flatten()).view(A, R, H, D).transpose(1, 2)  # (A, H, R, D)
    prompt_of = lambda x: x[:, :, :P].index_select(0, blocks.answer_seq)              # (A, H, P, D)
    keys = torch.cat([prompt_of(key), pick(key)], dim=2)                              # (A, H, P + R, D)
    values = torch.cat([prompt_of(value), pick(value)], dim=2)                        # (A, H, P + R, D)
    answers = F.scaled_dot_product_attention(pick(query), keys, values, attn_mask=blocks.mask,
                                             scale=scaling)                           # (A, H, R, D)
    out = F.pad(prompts, (0, 0, 0, Lp - P))                                           # (S, H, Lp, D)
    rows = blocks.answer_pos[blocks.real]                                             # (n,) real answer positions
    got = answers.transpose(1, 2)[blocks.real]                                        # (n, H, D)
    return flat(out).index_copy(0, rows, got).reshape(S, Lp, H, D)
