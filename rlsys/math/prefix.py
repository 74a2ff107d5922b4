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

Fewer positions are not always less work: the packed sequence is longer than any of its rows and
its block mask is applied densely, so attention costs (P + sum n_i)^2 per group where rows pay
G * (P + n)^2. With long answers on a small model (attention-bound) rows are cheaper:
rlsys.math.packing.shard keeps the shared plan only when it costs fewer FLOPs than the rows plan.

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
    """Targets are the rows' tokens from position start + 1 on (rlsys.actors.learner.scored_from)."""

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
    return SharedLayout(ids, pos, block_mask(segment), source, targets, start)

