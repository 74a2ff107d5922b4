"""GRPO loss math: pure tensor functions, no state.

Algorithm choices (GRPO as in DeepSeek-R1 / R1-Zero):
- Group-relative advantages: each prompt is sampled G times and an output's advantage is
  its reward minus the group mean (optionally divided by the group std), so no value
  network is needed. ``std_normalize=False`` gives the Dr.GRPO variant (no std bias).
- PPO-style clipped surrogate on the importance ratio pi_theta / pi_old, with an optional
  asymmetric band [1 - eps_low, 1 + eps_high] ("clip-higher", DAPO) that lets
  low-probability tokens grow faster and so counters entropy collapse.
- The log-ratio logp - old_logp is clamped to +-LOG_RATIO_CLAMP (20, as verl) before every
  exp (the surrogate, the ratio_mean metric, the k3 KL). Without it a stale or garbage
  log-prob (several epochs, padding positions) makes exp overflow float32 (and bf16, same
  range) to inf, and inf * 0 -- a masked token, a zero advantage, an unchosen min branch in
  backward -- is NaN, which poisons the whole loss and gradient. exp(20) ~ 4.9e8 is finite
  and far outside any clip band, so the clamp never changes a sane loss; beyond it the
  gradient is 0.
- Optional dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
  RL"; verl's clip_ratio_c): for A < 0 the PPO min picks ratio * A, which is unbounded as
  the ratio grows over epochs; dual clip c > 1 caps the per-token loss at c * |A| (and its
  gradient is then 0). A >= 0 is unchanged; None (the default) is the plain surrogate.
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
# Bound on |log-ratio| before exp: exp(20) ~ 4.9e8 stays finite in float32/bf16 (overflow is
# at ~88.7), so inf * 0 = NaN cannot appear in masked positions or in backward. verl uses 20.
LOG_RATIO_CLAMP = 20.0


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
    d is clamped to +-LOG_RATIO_CLAMP (exp overflow, see the module docstring).
    """
    d = (ref_logp.float() - logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    return torch.exp(d) - d - 1.0                                # (B, T)


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """pi_theta / pi_old = exp(clamp(logp - old_logp, +-LOG_RATIO_CLAMP)).

    logp, old_logp: (B, T) -> (B, T) float32. Equal to the plain exp inside the clamp range.
    """
    log_ratio = (logp.float() - old_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    return torch.exp(log_ratio)                                  # (B, T)


OFF_POLICY = ("tis", "mis", "icepop", "seq_mask")  # their default bands: rlsys.config.OFF_POLICY_BAND


def off_policy_weights(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                       method: str, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights that correct for rollouts sampled by another policy than the learner's.

    prox_logp: (B, T) the learner's log-probs before this update (the PPO ratio's denominator:
    the clip stays around the learner's own policy, decoupled PPO as AReaL); behav_logp: (B, T) the
    generator's log-probs of the sampled tokens (the behaviour policy: older weights, or the same
    weights through other kernels and precision); mask: (B, T) response tokens; rows: (B,) bool,
    the rows to correct (stale rows, or every row). With rho_t = pi_prox(y_t) / pi_behav(y_t):
    - "tis", truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly
      Brings You Off-Policy RL Training"): w_t = min(rho_t, hi); every token keeps a gradient.
    - "mis", masked importance sampling (Liu, Li et al. 2025, "When Speed Kills Stability"):
      w_t = rho_t where lo <= rho_t <= hi, else 0: a token the generator found far likelier than
      the learner does (or, with lo > 0, far less likely) is left out instead of truncated.
      The paper's token-level form is one-sided (lo = 0, the default).
    - "icepop" (Ling Team 2025, Ring-1T; INTELLECT-3): the same form with a band on both sides
      (default [0.5, 5]): rho_t outside it gets weight 0, inside it weighs rho_t.
    - "seq_mask", sequence-level masking (rejection by the geometric mean): a row whose
      geometric-mean ratio exp(mean_t log rho_t) leaves [lo, hi] is dropped whole (every token 0),
      the others weigh 1 (default band [0.8, 1.25]: +-0.22 nats per token on average).
    Rows not in `rows` and positions outside the mask get weight 1 and are never masked.
    Returns (weights (B, T) float32, detached; masked (B, T) bool: tokens the band zeroed).

    >>> prox = torch.tensor([[0.0, -1.0, -1.0, -3.0]]); behav = torch.tensor([[0.0, -2.0, -0.5, -1.0]])
    >>> m = torch.tensor([[0.0, 1.0, 1.0, 1.0]]); yes = torch.tensor([True])  # rho = 1, e, e^-0.5, e^-2
    >>> off_policy_weights(prox, behav, m, yes, "tis", 0.0, 2.0)[0]    # e capped at 2
    tensor([[1.0000, 2.0000, 0.6065, 0.1353]])
    >>> off_policy_weights(prox, behav, m, yes, "mis", 0.0, 2.0)       # e > 2: out
    (tensor([[1.0000, 0.0000, 0.6065, 0.1353]]), tensor([[False,  True, False, False]]))
    >>> off_policy_weights(prox, behav, m, yes, "icepop", 0.5, 5.0)    # e^-2 = 0.135 < 0.5: out
    (tensor([[1.0000, 2.7183, 0.6065, 0.0000]]), tensor([[False, False, False,  True]]))
    >>> off_policy_weights(prox, behav, m, yes, "seq_mask", 0.8, 1.25)  # mean log rho = -0.5: e^-0.5 < 0.8
    (tensor([[1., 0., 0., 0.]]), tensor([[False,  True,  True,  True]]))
    >>> off_policy_weights(prox, behav, m, torch.tensor([False]), "icepop", 0.5, 5.0)[0]  # a row not corrected
    tensor([[1., 1., 1., 1.]])
    """
    if method not in OFF_POLICY:
        raise ValueError(f"unknown off-policy correction {method!r}; allowed: {OFF_POLICY}")
    log_rho = (prox_logp.float() - behav_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    rho = torch.exp(log_rho)                                                     # (B, T)
    m = mask.bool()                                                              # (B, T)
    if method == "tis":
        w, out = rho.clamp(max=hi), torch.zeros_like(m)                          # (B, T) x2
    elif method in ("mis", "icepop"):
        out = (rho < lo) | (rho > hi)                                            # (B, T)
        w = torch.where(out, torch.zeros_like(rho), rho)                         # (B, T)
    else:  # seq_mask
        mean_log = (log_rho * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)          # (B,)
        geo = torch.exp(mean_log)                                                # (B,)
        out = ((geo < lo) | (geo > hi)).unsqueeze(1).expand_as(m)                # (B, T)
        w = (~out).float()                                                       # (B, T)
    corrected = rows.unsqueeze(1) & m                                            # (B, T)
    w = torch.where(corrected, w, torch.ones_like(w))                            # (B, T)
    return w.detach(), out & corrected                                           # (B, T) x2


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float, dual_clip: float | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with an asymmetric band and an optional dual clip.

    logp, old_logp: (B, T); advantages: (B,) broadcast over tokens.
    loss = -min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A), ratio = importance_ratio.
    dual_clip c (> 1): where A < 0, loss = min(loss, -c * A), i.e. at most c * |A|.
    dual_clip None: the plain surrogate above, bit for bit.
    Returns (loss (B, T) float32, clipped (B, T) bool: where the clamped branch set the min,
    dual_clipped (B, T) bool: where the dual-clip bound set the loss; all False when off).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None: off), got {dual_clip}")
    ratio = importance_ratio(logp, old_logp)                     # (B, T)
    adv = advantages.float().unsqueeze(1)                        # (B, 1)
    unclipped = ratio * adv                                      # (B, T)
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # (B, T)
    loss = -torch.minimum(unclipped, clipped_obj)                # (B, T)
    clipped = clipped_obj < unclipped                            # (B, T)
    if dual_clip is None:
        return loss, clipped, torch.zeros_like(clipped)          # (B, T) x3
    bound = -dual_clip * adv                                     # (B, 1) = c * |A| where A < 0
    dual_clipped = (adv < 0) & (loss > bound)                    # (B, T)
    loss = torch.where(dual_clipped, bound, loss)                # (B, T) constant there: grad 0
    return loss, clipped, dual_clipped                           # (B, T) x3


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
              dual_clip: float | None = None, is_weights: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective for one micro-batch.

    logp (B, T) with grad; old_logp, ref_logp (B, T) detached (ref_logp may be None when
    beta == 0: no KL is computed); advantages (B,); mask (B, T).
    per-token = is_weights * clipped surrogate (dual-clipped if dual_clip is not None) + beta * k3_kl;
    loss = masked_aggregate(per-token). is_weights (B, T), detached: the off-policy correction's
    weights (off_policy_weights); None is 1 everywhere.
    Returns (loss scalar float32, metrics of detached scalars: pg_loss, kl (same aggregation),
    clip_frac, dual_clip_frac (0 when off, so the keys do not depend on the config),
    ratio_mean (the last three token-weighted over this micro-batch)).
    """
    pg_tok, clipped, dual_clipped = clipped_surrogate(
        logp, old_logp, advantages, eps_low, eps_high, dual_clip)  # (B, T) x3
    if is_weights is not None:
        pg_tok = pg_tok * is_weights                             # (B, T)
    pg = masked_aggregate(pg_tok, mask, aggregation, normalizer)  # ()
    if beta != 0.0:
        assert ref_logp is not None, "ref_logp is required when beta != 0"
        kl = masked_aggregate(k3_kl(logp, ref_logp), mask, aggregation, normalizer)  # ()
        loss = pg + beta * kl    # linear, so equal to aggregating the per-token sum
    else:
        kl = torch.zeros((), dtype=torch.float32, device=pg.device)
        loss = pg
    with torch.no_grad():
        ratio = importance_ratio(logp, old_logp)                 # (B, T)
        metrics = {
            "pg_loss": pg.detach(),
            "kl": kl.detach(),
            "clip_frac": masked_mean(clipped.float(), mask),
            "dual_clip_frac": masked_mean(dual_clipped.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics
