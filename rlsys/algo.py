"""GRPO loss math: pure tensor functions, no state.

Algorithm choices (GRPO as in DeepSeek-R1 / R1-Zero):
- Group-relative advantages: each prompt is sampled G times and an output's advantage is
  its reward minus the group mean (optionally divided by the group std), so no value
  network is needed. ``std_normalize=False`` gives the Dr.GRPO variant (no std bias).
- PPO-style clipped surrogate on the importance ratio pi_theta / pi_old, with an optional
  asymmetric band [1 - eps_low, 1 + eps_high] ("clip-higher", DAPO) that lets
  low-probability tokens grow faster and so counters entropy collapse.
- KL to a frozen reference policy is a penalty inside the loss (not in the reward), using
  the k3 estimator: unbiased, always >= 0, low variance.
- Aggregation over tokens is either "token" (DAPO: every response token weighs the same,
  so long answers are not under-weighted) or "sequence" (original GRPO: mean per sequence,
  then mean over sequences).
Everything is computed in float32 whatever the input dtype (bf16 log-probs are too coarse
for exp(logp - old_logp)).
"""
import torch

AGGREGATIONS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages.

    rewards: (B,) laid out group by group [q0 o0, ..., q0 o_{G-1}, q1 o0, ...], B % G == 0.
    A_i = r_i - mean(group), divided by (std(group) + eps) if std_normalize. std is the
    UNBIASED sample std (torch.std default, as in the GRPO reference implementations).
    A group whose rewards are all equal gets exactly 0 (no NaN, also for G == 1).
    Returns (B,) float32.
    """
    B = rewards.shape[0]
    assert B % group_size == 0, f"batch size {B} is not a multiple of group_size {group_size}"
    r = rewards.float().view(-1, group_size)                     # (B/G, G)
    centered = r - r.mean(dim=1, keepdim=True)                   # (B/G, G)
    # Equal rewards carry no signal; force exact zeros (mean rounding, 0/0 with eps=0, G=1).
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)         # (B/G, 1)
    if std_normalize:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)                        # (B/G, G)
    adv = torch.where(all_equal, torch.zeros_like(centered), centered)
    return adv.reshape(B)                                        # (B,)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1, d = ref - logp.

    logp, ref_logp: (B, T) -> (B, T) float32, always >= 0.
    """
    d = ref_logp.float() - logp.float()                          # (B, T)
    return torch.exp(d) - d - 1.0                                # (B, T)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with an asymmetric band.

    logp, old_logp: (B, T); advantages: (B,) broadcast over tokens.
    loss = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = exp(logp - old_logp).
    Returns (loss (B, T) float32, clipped (B, T) bool: where the clamped branch set the min).
    """
    ratio = torch.exp(logp.float() - old_logp.float())           # (B, T)
    adv = advantages.float().unsqueeze(1)                        # (B, 1)
    unclipped = ratio * adv                                      # (B, T)
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # (B, T)
    loss = -torch.minimum(unclipped, clipped_obj)                # (B, T)
    return loss, (clipped_obj < unclipped)                      # (B, T), (B, T)


def masked_aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str,
                     normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token values (B, T) under mask (B, T) (1 = response token) to a scalar.

    "token":    sum(values * mask) / normalizer, default mask.sum()  (DAPO)
    "sequence": sum_i [sum_t (values * mask)_i / mask_i.sum()] / normalizer, default B (GRPO)
    An explicit normalizer lets micro-batches (and data-parallel ranks) divide by the count of
    the WHOLE mini-batch, so that their losses sum to the mini-batch loss.
    Rows with an all-zero mask contribute 0.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; allowed: {AGGREGATIONS}")
    m = mask.float()                                             # (B, T)
    masked = values.float() * m                                  # (B, T)
    if mode == "token":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return masked.sum() / denom                              # ()
    per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)    # (B,) empty rows -> 0
    denom = values.shape[0] if normalizer is None else normalizer
    return per_seq.sum() / denom                                 # ()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean of values (B, T) under mask (B, T); 0 for an empty mask."""
    m = mask.float()                                             # (B, T)
    return (values.float() * m).sum() / m.sum().clamp(min=1.0)   # ()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float, eps_high: float,
              beta: float, aggregation: str, normalizer: float | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective for one micro-batch.

    logp (B, T) with grad; old_logp, ref_logp (B, T) detached (ref_logp may be None when
    beta == 0: no KL is computed); advantages (B,); mask (B, T).
    per-token = clipped surrogate + beta * k3_kl; loss = masked_aggregate(per-token).
    Returns (loss scalar float32, metrics of detached scalars: pg_loss, kl (same aggregation),
    clip_frac, ratio_mean (token-weighted over this micro-batch)).
    """
    pg_tok, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)  # (B, T)
    pg = masked_aggregate(pg_tok, mask, aggregation, normalizer)  # ()
    if beta != 0.0:
        assert ref_logp is not None, "ref_logp is required when beta != 0"
        kl = masked_aggregate(k3_kl(logp, ref_logp), mask, aggregation, normalizer)  # ()
        loss = pg + beta * kl    # linear, so equal to aggregating the per-token sum
    else:
        kl = torch.zeros((), dtype=torch.float32, device=pg.device)
        loss = pg
    with torch.no_grad():
        ratio = torch.exp(logp.float() - old_logp.float())       # (B, T)
        metrics = {
            "pg_loss": pg.detach(),
            "kl": kl.detach(),
            "clip_frac": masked_mean(clipped.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics
