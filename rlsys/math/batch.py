"""Rollouts + rewards -> the learner's TrainBatch (group advantages computed here, once)."""

from __future__ import annotations

import torch

from rlsys.math.dapo import mask_truncated_rows
from rlsys.math.grpo import group_advantages
from rlsys.config import AlgoConfig
from rlsys.types import Rollout, TrainBatch


def make_batch(rollouts: list[Rollout], rewards: list[float], cfg: AlgoConfig, version: int | None = None
               ) -> TrainBatch:
    """Rollouts must come group by group (G consecutive samples of one question). `version`: the
    learner's weight version the batch is trained at; each row's staleness is measured from it
    (None: synchronous, every row on-policy).

    A rollout's loss_mask (generator.tools) leaves its tools' output tokens out of the loss: they
    stay in the row (the model reads them) but are never trained on.

    cfg.mask_truncated (DAPO's overlong filtering): a truncated rollout's row has no loss tokens;
    its reward still counts in its group's advantages, so the other rows' advantages are the same.

    Rows are right-padded with token id 0: padding sits after every real token, outside the
    attention and loss masks, so its id never matters (and a tokenizer need not have a pad token:
    Llama-3's and Mistral's have none)."""
    G = cfg.group_size
    assert len(rollouts) == len(rewards) and len(rollouts) % G == 0, \
        f"{len(rollouts)} rollouts, {len(rewards)} rewards, group_size {G}"
    for i in range(0, len(rollouts), G):
        groups = {r.group for r in rollouts[i:i + G]}
        assert len(groups) == 1, f"rollouts {i}..{i + G - 1} mix groups {sorted(groups)}"
    B = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    input_ids = torch.zeros(B, L, dtype=torch.long)                  # (B, L)
    attention_mask = torch.zeros(B, L, dtype=torch.long)             # (B, L)
    loss_mask = torch.zeros(B, L)                                     # (B, L)
    gen_logprobs = torch.zeros(B, L)                                  # (B, L)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, :p + n] = torch.tensor(r.prompt_ids + r.response_ids)
        attention_mask[i, :p + n] = 1
        loss_mask[i, p:p + n] = 1 if r.loss_mask is None else torch.tensor(r.loss_mask, dtype=torch.float32)
        gen_logprobs[i, p:p + n] = torch.tensor(r.response_logprobs)
    if cfg.mask_truncated:
        loss_mask = mask_truncated_rows(loss_mask, [r.finish_reason for r in rollouts])  # (B, L)
    reward_t = torch.tensor(rewards, dtype=torch.float32)            # (B,)
    advantages = group_advantages(reward_t, G, std_normalize=cfg.std_normalize)
    staleness = None if version is None else torch.tensor([version - r.weight_version for r in rollouts])  # (B,)
    assert staleness is None or bool((staleness >= 0).all()), f"rollouts newer than the learner's version {version}"
    prompt_lens = torch.tensor([len(r.prompt_ids) for r in rollouts])  # (B,)
    return TrainBatch(input_ids, attention_mask, loss_mask, gen_logprobs, advantages, reward_t, staleness, prompt_lens)
