"""Supervised fine-tuning math: the batch of (prompt, response) examples and its loss.

R1's cold start and its distillation both fine-tune on reasoning traces: the model learns to
write the response after the prompt, so the loss is the negative log-likelihood of the response
tokens only (the prompt is given, never learned) and of the end-of-sequence token after them
(the model must learn to stop). The batch is a TrainBatch like a rollout batch (rlsys.types), so
the learner's token-budget packing (rlsys.math.packing) cuts it the same way; the GRPO-only
fields (advantages, rewards, generator log-probs) are zeros.
"""

from __future__ import annotations

import torch

from rlsys.types import TrainBatch


def sft_batch(examples: list[tuple[list[int], list[int]]]) -> TrainBatch:
    """(prompt_ids, response_ids) pairs -> a right-padded TrainBatch, loss on response tokens only.

    >>> b = sft_batch([([5, 6, 7], [8, 9]), ([5], [4])])
    >>> b.input_ids.tolist(), b.loss_mask.tolist()
    ([[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]], [[0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    """
    assert examples and all(p and r for p, r in examples), "every example needs prompt and response tokens"
    B = len(examples)
    L = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.zeros(B, L, dtype=torch.long)                  # (B, L)
    attention_mask = torch.zeros(B, L, dtype=torch.long)             # (B, L)
    loss_mask = torch.zeros(B, L)                                     # (B, L)
    for i, (p, r) in enumerate(examples):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        loss_mask[i, len(p):len(p) + len(r)] = 1
    zeros = torch.zeros(B)
    return TrainBatch(input_ids, attention_mask, loss_mask, torch.zeros(B, L), zeros, zeros.clone(), None,
                      torch.tensor([len(p) for p, _ in examples]))


def sft_loss(logp: torch.Tensor, loss_mask: torch.Tensor, normalizer: float) -> tuple[torch.Tensor, dict]:
    """logp (B, L) log-probs of the batch's tokens, loss_mask (B, L) 1 on response tokens ->
    the summed negative log-likelihood of the response tokens / normalizer (the token count of
    the whole mini-batch over every rank: each micro-batch's loss is its share of the mean, as
    in rlsys.math.grpo's token aggregation), and the micro-batch's summed NLL for the metrics.

    >>> logp = torch.log(torch.tensor([[1.0, 0.5, 0.25], [1.0, 1.0, 0.5]]))
    >>> loss, m = sft_loss(logp, torch.tensor([[0.0, 1, 1], [0, 0, 1]]), normalizer=3.0)
    >>> round(float(loss), 4), round(m["nll_sum"], 4)  # (ln 2 + ln 4 + ln 2) / 3
    (0.9242, 2.7726)
    """
    nll = -(logp * loss_mask).sum()
    return nll / normalizer, {"nll_sum": float(nll.detach())}
