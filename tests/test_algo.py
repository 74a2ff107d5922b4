"""Tests for rlsys.math.grpo. Every expected number is worked out by hand in the comments."""
import math

import pytest
import torch

from rlsys.config import OFF_POLICY_BAND
from rlsys.math.grpo import (LOG_RATIO_CLAMP, OFF_POLICY, clipped_surrogate, group_advantages, grpo_loss,
                             k3_kl, masked_aggregate, masked_mean, off_policy_weights)

LN2 = 0.6931471805599453
E20 = math.exp(20.0)  # 485165195.4, the largest ratio after the log-ratio clamp


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32),
                          torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ---------------------------------------------------------------- advantages

def test_group_advantages_with_std():
    r = torch.tensor([1., 0, 0, 0, 1, 1, 0, 0])
    adv = group_advantages(r, group_size=4, eps=0.0)
    # group 0: mean 0.25, centered [.75,-.25,-.25,-.25], unbiased var = (.5625+3*.0625)/3 = .25,
    #          std .5 -> [1.5, -.5, -.5, -.5]
    # group 1: mean .5, centered [.5,.5,-.5,-.5], unbiased var = 1/3, std 0.5773503
    #          -> .5/0.5773503 = 0.8660254
    assert adv.dtype == torch.float32 and adv.shape == (8,)
    assert close(adv, [1.5, -0.5, -0.5, -0.5, 0.8660254, 0.8660254, -0.8660254, -0.8660254])


def test_group_advantages_default_eps_is_tiny():
    adv = group_advantages(torch.tensor([1., 0, 0, 0]), group_size=4)
    assert close(adv, [1.5, -0.5, -0.5, -0.5], tol=1e-4)


def test_group_advantages_without_std():
    r = torch.tensor([1., 0, 0, 0, 1, 1, 0, 0, 3, 1])
    adv = group_advantages(r, group_size=2, std_normalize=False)
    # pairs: (1,0) mean .5 -> [.5,-.5]; (0,0) -> 0; (1,1) -> 0; (0,0) -> 0; (3,1) mean 2 -> [1,-1]
    assert close(adv, [.5, -.5, 0, 0, 0, 0, 0, 0, 1, -1])


def test_group_advantages_all_equal_is_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 1., 1., 1., 1.])
    for eps in (0.0, 1e-6):
        adv = group_advantages(r, group_size=4, eps=eps)
        assert not torch.isnan(adv).any()
        assert (adv == 0).all()
    # group_size 1: every group is trivially all-equal
    assert (group_advantages(torch.tensor([3., 5.]), group_size=1) == 0).all()


def test_group_advantages_bad_batch():
    with pytest.raises(AssertionError, match="group_size"):
        group_advantages(torch.zeros(6), group_size=4)


# ---------------------------------------------------------------- k3

def test_k3_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    # token 0: d = ln .25 - ln .5 = -ln2 -> exp(-ln2) + ln2 - 1 = .5 + .693147 - 1 = .193147
    # token 1: equal -> 0
    kl = k3_kl(logp, ref)
    assert kl.shape == (1, 2)
    assert close(kl, [[0.5 + LN2 - 1.0, 0.0]])
    # d = +ln2: exp(ln2) - ln2 - 1 = 2 - .693147 - 1 = .306853
    assert close(k3_kl(ref, logp)[0, 0], 1.0 - LN2)


def test_k3_huge_log_ratio_is_clamped():
    # d = ref - logp = +1000 -> clamped to 20: e^20 - 20 - 1 (finite, was inf);
    # d = -1000 -> clamped to -20: e^-20 + 20 - 1 = 19.000000002; gradient 0 beyond the clamp.
    logp = torch.tensor([[-1000.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1000.0]])
    kl = k3_kl(logp, ref)
    assert math.isclose(kl[0, 0].item(), E20 - 21.0, rel_tol=1e-6) and close(kl[0, 1], 19.0)
    kl.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    kl = k3_kl(torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g))
    assert (kl >= 0).all()


# ---------------------------------------------------------------- clipped surrogate

def _ratio_logps(ratios):
    """old_logp = 0, logp = ln(ratio), so exp(logp - old_logp) == ratio."""
    r = torch.tensor(ratios, dtype=torch.float32)
    return torch.log(r), torch.zeros_like(r)


def test_clipped_surrogate_cases():
    # row 0, A=+1: ratios 1.5 (above 1.2 -> clipped, loss -1.2), 1.1 (inside, loss -1.1),
    #              0.5 (below 0.8, but A>0 so min picks ratio*A = .5: unclipped, loss -.5)
    # row 1, A=-2: ratios 0.5 (below 0.8 -> min(-1, -1.6) = -1.6 clipped, loss 1.6),
    #              1.5 (min(-3, -2.4) = -3 unclipped, loss 3), 1.0 (loss 2)
    logp, old = _ratio_logps([[1.5, 1.1, 0.5], [0.5, 1.5, 1.0]])
    loss, clipped, dual = clipped_surrogate(logp, old, torch.tensor([1., -2.]), 0.2, 0.2)
    assert close(loss, [[-1.2, -1.1, -0.5], [1.6, 3.0, 2.0]])
    assert clipped.dtype == torch.bool and dual.dtype == torch.bool
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    assert not dual.any()                     # dual clip off by default


def test_clip_higher_changes_result():
    # ratio 1.25, A = 1: eps_high .28 -> band up to 1.28, unclipped, loss -1.25;
    #                    eps_high .2  -> clipped to 1.2, loss -1.2
    logp, old = _ratio_logps([[1.25]])
    a = torch.tensor([1.])
    loss_hi, clip_hi, _ = clipped_surrogate(logp, old, a, eps_low=0.2, eps_high=0.28)
    loss_sym, clip_sym, _ = clipped_surrogate(logp, old, a, eps_low=0.2, eps_high=0.2)
    assert close(loss_hi, [[-1.25]]) and not clip_hi.item()
    assert close(loss_sym, [[-1.2]]) and clip_sym.item()
    # eps_low governs the lower side: ratio .75, A = -1: eps_low .2 -> clamp .8, min(-.75,-.8)
    # = -.8 clipped (loss .8); eps_low .3 -> inside the band, loss .75
    logp, old = _ratio_logps([[0.75]])
    a = torch.tensor([-1.])
    assert close(clipped_surrogate(logp, old, a, 0.2, 0.28)[0], [[0.8]])
    assert close(clipped_surrogate(logp, old, a, 0.3, 0.28)[0], [[0.75]])


def test_dual_clip_bounds_negative_advantage():
    # A = -2, eps .2/.2, c = 3 -> bound -c*A = 6.
    # ratio 5:   PPO min(5*-2, 1.2*-2) = min(-10, -2.4) = -10 -> loss 10 (unbounded in ratio);
    #            dual clip: min(10, 6) = 6, bound active
    # ratio 2.5: PPO loss 2.5*2 = 5 < 6 -> 5, bound inactive
    # ratio 0.5: PPO min(-1, -1.6) = -1.6 -> loss 1.6 (ratio-clipped), bound inactive
    logp, old = _ratio_logps([[5.0, 2.5, 0.5]])
    a = torch.tensor([-2.])
    plain, plain_clip, plain_dual = clipped_surrogate(logp, old, a, 0.2, 0.2, dual_clip=None)
    assert close(plain, [[10.0, 5.0, 1.6]]) and not plain_dual.any()
    loss, clipped, dual = clipped_surrogate(logp, old, a, 0.2, 0.2, dual_clip=3.0)
    assert loss[0, 0].item() == 6.0           # exactly -c*A = 3*2
    assert close(loss, [[6.0, 5.0, 1.6]])
    assert dual.tolist() == [[True, False, False]]
    assert clipped.tolist() == plain_clip.tolist() == [[False, False, True]]


def test_dual_clip_leaves_positive_advantage_alone():
    # A = +1: ratios 5 (clipped to 1.2, loss -1.2), 1.1 (loss -1.1), 0.5 (loss -.5); A = 0: loss 0.
    # -c*A = -3 (or 0) would be below every loss, but the bound only applies where A < 0.
    logp, old = _ratio_logps([[5.0, 1.1, 0.5], [5.0, 1.1, 0.5]])
    a = torch.tensor([1., 0.])
    plain, _, _ = clipped_surrogate(logp, old, a, 0.2, 0.2)
    loss, _, dual = clipped_surrogate(logp, old, a, 0.2, 0.2, dual_clip=3.0)
    assert close(loss, [[-1.2, -1.1, -0.5], [0.0, 0.0, 0.0]])
    assert torch.equal(loss, plain) and not dual.any()


def test_dual_clip_must_exceed_one():
    logp, old = _ratio_logps([[1.0]])
    for c in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            clipped_surrogate(logp, old, torch.tensor([-1.]), 0.2, 0.2, dual_clip=c)


def test_huge_log_ratio_is_clamped_in_surrogate():
    # log-ratio +1000 would be exp -> inf; clamped to +20: ratio e^20. A = -1, no dual clip:
    # loss -min(-e^20, -1.2) = e^20 (finite). Log-ratio -1000 -> e^-20, A = -1:
    # -min(-e^-20, -.8) = .8 (ratio-clipped).
    logp = torch.tensor([[0.0, -1000.0]])
    old = torch.tensor([[-1000.0, 0.0]])
    loss = clipped_surrogate(logp, old, torch.tensor([-1.]), 0.2, 0.2)[0]
    assert torch.isfinite(loss).all()
    assert math.isclose(loss[0, 0].item(), E20, rel_tol=1e-6) and close(loss[0, 1], 0.8)
    assert LOG_RATIO_CLAMP == 20.0


# ---------------------------------------------------------------- aggregation

VALS = torch.tensor([[1., 2., 9.], [4., 9., 9.]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregate_token_and_sequence():
    # token: (1+2+4)/3 = 7/3; sequence: ((1+2)/2 + 4/1)/2 = (1.5+4)/2 = 2.75
    assert close(masked_aggregate(VALS, MASK, "token"), 7 / 3)
    assert close(masked_aggregate(VALS, MASK, "sequence"), 2.75)
    # explicit normalizers: token 7/6; sequence (1.5+4)/4 = 1.375
    assert close(masked_aggregate(VALS, MASK, "token", normalizer=6), 7 / 6)
    assert close(masked_aggregate(VALS, MASK, "sequence", normalizer=4), 1.375)


def test_aggregate_micro_batches_sum_to_whole():
    v2 = torch.tensor([[3., 3., 3.], [7., 7., 7.]])
    m2 = torch.tensor([[1, 1, 1], [0, 0, 0]])  # second row fully masked -> contributes 0
    whole_v, whole_m = torch.cat([VALS, v2]), torch.cat([MASK, m2])
    # token: (1+2+4 + 3+3+3)/6 = 16/6; micro-batches with normalizer 6: 7/6 + 9/6
    assert close(masked_aggregate(whole_v, whole_m, "token"), 16 / 6)
    parts = [masked_aggregate(v, m, "token", normalizer=6) for v, m in ((VALS, MASK), (v2, m2))]
    assert close(parts[0], 7 / 6) and close(parts[1], 9 / 6)
    assert close(parts[0] + parts[1], 16 / 6)
    # sequence: (1.5 + 4 + 3 + 0)/4 = 2.125; micro-batches with normalizer 4: 5.5/4 + 3/4
    assert close(masked_aggregate(whole_v, whole_m, "sequence"), 2.125)
    parts = [masked_aggregate(v, m, "sequence", normalizer=4) for v, m in ((VALS, MASK), (v2, m2))]
    assert close(parts[0], 1.375) and close(parts[1], 0.75)
    assert close(parts[0] + parts[1], 2.125)


def test_aggregate_empty_mask():
    z = torch.zeros(2, 3)
    for mode in ("token", "sequence"):
        out = masked_aggregate(VALS, z, mode)
        assert not torch.isnan(out) and out.item() == 0.0
    assert masked_mean(VALS, z).item() == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="'bogus'.*token.*sequence"):
        masked_aggregate(VALS, MASK, "bogus")


def test_masked_mean():
    assert close(masked_mean(VALS, MASK), 7 / 3)


# ---------------------------------------------------------------- grpo_loss

def test_grpo_loss_beta_zero_without_ref():
    logp, old = _ratio_logps([[1.5, 1.1, 1.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = grpo_loss(logp, old, None, torch.tensor([1.]), mask, eps_low=0.2, eps_high=0.2,
                        beta=0.0, aggregation="token")
    # tokens: -1.2 (clipped), -1.1; third masked. mean = -2.3/2 = -1.15
    assert close(loss, -1.15) and close(m["pg_loss"], -1.15)
    assert m["kl"].item() == 0.0
    assert close(m["clip_frac"], 0.5)         # 1 of 2 response tokens clipped
    assert close(m["ratio_mean"], 1.3)        # (1.5 + 1.1)/2
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_grpo_loss_with_kl():
    # ratio 1 everywhere, A = 1 -> pg per token -1, pg = -1 in both modes.
    # k3: token 0 (ref .25 vs .5) = .193147, token 1 = 0 -> token mean .0965736
    # beta .1 -> loss = -1 + .00965736 = -.99034264
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    mask = torch.ones(1, 2)
    kl_tok = (0.5 + LN2 - 1.0) / 2
    for agg in ("token", "sequence"):
        loss, m = grpo_loss(logp, logp.clone(), ref, torch.tensor([1.]), mask, eps_low=0.2,
                            eps_high=0.28, beta=0.1, aggregation=agg)
        assert close(m["pg_loss"], -1.0) and close(m["kl"], kl_tok)
        assert close(loss, -1.0 + 0.1 * kl_tok)
        assert close(m["clip_frac"], 0.0) and close(m["ratio_mean"], 1.0)


def test_grpo_loss_gradient():
    # token mode, 3 response tokens, normalizer 3, eps .2/.2, beta 0.
    # row 0 (A=2): ratio 1.1 unclipped -> d/dlogp (-A*ratio/3) = -2*1.1/3 = -.733333
    #              ratio 1.5 clipped (constant) -> grad 0
    # row 1 (A=-1): ratio 1.5 unclipped (min(-1.5,-1.2)) -> -(-1)*1.5/3 = .5; padding -> 0
    r, old = _ratio_logps([[1.1, 1.5], [1.5, 1.0]])
    logp = r.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = grpo_loss(logp, old, None, torch.tensor([2., -1.]), mask, eps_low=0.2,
                        eps_high=0.2, beta=0.0, aggregation="token")
    loss.backward()
    assert close(logp.grad, [[-2 * 1.1 / 3, 0.0], [1.5 / 3, 0.0]])
    # with explicit normalizer 6 the same gradient halves: -2*1.1/6 = -.366667
    logp.grad = None
    loss, _ = grpo_loss(logp, old, None, torch.tensor([2., -1.]), mask, eps_low=0.2,
                        eps_high=0.2, beta=0.0, aggregation="token", normalizer=6)
    loss.backward()
    assert close(logp.grad[0, 0], -2 * 1.1 / 6)


def test_importance_weights_scale_each_tokens_gradient_and_weights_of_one_change_nothing():
    # token mode, normalizer 3, eps .2/.2, beta 0, logp = old (ratio 1, inside the clip band): the
    # per-token loss is -w_t * A * ratio_t / 3, so d/dlogp_t = -w_t * A / 3.
    # row 0 (A=2), weights [0.5, 2.0] -> [-1/3, -4/3]; row 1 (A=-1), weight 0 (a masked token) -> 0,
    # and its padding -> 0.
    old = torch.log(torch.tensor([[0.5, 0.25], [0.4, 0.9]]))
    adv, mask = torch.tensor([2., -1.]), torch.tensor([[1, 1], [1, 0]])

    def grad(weights):
        logp = old.clone().requires_grad_(True)
        loss, _ = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                            aggregation="token", is_weights=weights)
        loss.backward()
        return loss.detach(), logp.grad

    loss, g = grad(torch.tensor([[0.5, 2.0], [0.0, 7.0]]))
    assert close(g, [[-1 / 3, -4 / 3], [0.0, 0.0]])
    assert close(loss, -(2 * 0.5 + 2 * 2.0) / 3)  # -(w A) summed over tokens / 3 = -5/3
    plain_loss, plain = grad(None)
    assert close(plain, [[-2 / 3, -2 / 3], [1 / 3, 0.0]])
    ones_loss, ones = grad(torch.ones(2, 2))
    assert torch.equal(ones, plain) and torch.equal(ones_loss, plain_loss)


def test_off_policy_methods_each_have_a_default_band():
    import doctest

    from rlsys.math import grpo

    assert doctest.testmod(grpo).failed == 0  # off_policy_weights' worked numbers
    assert set(OFF_POLICY) == set(OFF_POLICY_BAND)
    with pytest.raises(ValueError, match="unknown off-policy correction 'clip'"):
        off_policy_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([True]), "clip", 0, 2)


def test_off_policy_masking_counts_only_response_tokens_of_corrected_rows():
    # Two rows, rho = e^{prox - behav}: row 0 [e^2, 1, (pad: e^5)], row 1 [e^-1, e^-1, e^-1].
    # seq_mask [0.8, 1.25]: row 0's mean log rho over its 2 tokens = 1 -> e > 1.25: dropped (its padding
    # not counted in the mean: with it the mean would be 7/3); row 1 mean -1 -> e^-1 = 0.37 < 0.8: dropped.
    prox = torch.tensor([[2.0, 0.0, 5.0], [-1.0, -1.0, -1.0]])
    behav = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w, out = off_policy_weights(prox, behav, mask, torch.tensor([True, True]), "seq_mask", 0.8, 1.25)
    assert torch.equal(out, mask.bool()) and torch.equal(w, 1.0 - mask.float())  # padding keeps weight 1
    # icepop [0.5, 5] on row 0 only (row 1 not corrected): e^2 = 7.39 > 5 out, 1 in; padding never masked.
    w, out = off_policy_weights(prox, behav, mask, torch.tensor([True, False]), "icepop", 0.5, 5.0)
    assert out.tolist() == [[True, False, False], [False, False, False]]
    assert w.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_bfloat16_inputs_give_float32():
    logp = torch.log(torch.tensor([[0.5, 0.5]])).bfloat16().requires_grad_(True)
    old = logp.detach().clone()
    ref = torch.log(torch.tensor([[0.25, 0.5]])).bfloat16()
    loss, m = grpo_loss(logp, old, ref, torch.tensor([1.]).bfloat16(), torch.ones(1, 2),
                        eps_low=0.2, eps_high=0.28, beta=0.1, aggregation="token")
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m.values())
    # pg = -1, kl ~ .193147/2 (bf16 logs are rounded, so loose tolerance)
    assert close(loss, -1.0 + 0.1 * (0.5 + LN2 - 1.0) / 2, tol=1e-2)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16
    assert group_advantages(torch.tensor([1., 0.]).bfloat16(), 2).dtype == torch.float32


def test_grpo_loss_dual_clip_frac_and_loss():
    # eps .2/.2, token mode, c = 3.
    # row 0 (A=-1), mask [1,1,0]: ratio 4 -> PPO loss 4 > bound 3 -> 3 (dual-clipped);
    #                             ratio 1 -> loss 1; ratio 10 would be dual-clipped but is masked.
    # row 1 (A=+1), mask [1,1,1]: ratio 4 -> clipped to 1.2, loss -1.2 each (bound not for A>0).
    # response tokens 5, dual-clipped 1 -> dual_clip_frac .2; ratio-clipped 3 -> clip_frac .6.
    # loss with c=3: (3 + 1 - 3*1.2)/5 = .4/5 = .08; without: (4 + 1 - 3.6)/5 = 1.4/5 = .28.
    logp, old = _ratio_logps([[4.0, 1.0, 10.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    a = torch.tensor([-1., 1.])
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="token")
    loss, m = grpo_loss(logp, old, None, a, mask, dual_clip=3.0, **kw)
    assert close(loss, 0.08) and close(m["pg_loss"], 0.08)
    assert m["dual_clip_frac"].item() == pytest.approx(0.2, abs=1e-7)
    assert close(m["clip_frac"], 0.6)
    loss, m = grpo_loss(logp, old, None, a, mask, **kw)
    assert close(loss, 0.28)
    assert m["dual_clip_frac"].item() == 0.0  # key present, 0 when off
    assert m["dual_clip_frac"].dtype == torch.float32 and not m["dual_clip_frac"].requires_grad


def test_grpo_loss_dual_clip_gradient_is_zero_where_active():
    # A = -2, ratios 5 and 2.5, token mode over 2 tokens, c = 3 (bound 6).
    # ratio 5: dual-clipped, loss the constant 6 -> grad 0
    #          (without dual clip: d/dlogp(-A*ratio)/2 = 2*5/2 = 5)
    # ratio 2.5: PPO loss 5 < 6, unclipped -> 2*2.5/2 = 2.5 either way
    r, old = _ratio_logps([[5.0, 2.5]])
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="token")
    logp = r.clone().requires_grad_(True)
    grpo_loss(logp, old, None, torch.tensor([-2.]), torch.ones(1, 2), dual_clip=3.0, **kw)[0].backward()
    assert logp.grad[0, 0].item() == 0.0
    assert close(logp.grad, [[0.0, 2.5]])
    logp.grad = None
    grpo_loss(logp, old, None, torch.tensor([-2.]), torch.ones(1, 2), dual_clip=None, **kw)[0].backward()
    assert close(logp.grad, [[5.0, 2.5]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_loss_huge_log_ratio_finite(dtype):
    # logp/old chosen so the log-ratio is +-1000 (a stale or garbage old log-prob). Token mode,
    # eps .2/.2, beta 0, 4 response tokens. Log-ratio clamped to +-20: ratio e^20 or e^-20.
    # row 0 (A=-1), mask [1,1,0]: +1000 -> loss e^20 (no dual clip) / 3 (c=3); 0 -> ratio 1, loss 1;
    #                             masked +1000 -> loss e^20 * 0 = 0 (was inf * 0 = NaN)
    # row 1 (A=+1), mask [1,1,0]: +1000 -> clipped, -1.2; -1000 -> ratio e^-20, loss -e^-20;
    #                             masked 0 -> 0
    # loss, no dual clip: (e^20 + 1 - 1.2 - e^-20)/4; with c=3: (3 + 1 - 1.2 - e^-20)/4 = .7
    # grad (both): clamped tokens 0, ratio-clipped token 0, row 0 token 1: -A*1/4 = .25, masked 0
    # ratio_mean: (e^20 + 1 + e^20 + e^-20)/4 (was NaN: inf in a masked position)
    logp0 = torch.tensor([[0.0, 0.0, 0.0], [0.0, -1000.0, 0.0]])
    old = torch.tensor([[-1000.0, 0.0, -1000.0], [-1000.0, 0.0, 0.0]]).to(dtype)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    a = torch.tensor([-1., 1.])
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0, aggregation="token")
    for c, expect in ((None, (E20 - 0.2) / 4), (3.0, 0.7)):
        logp = logp0.to(dtype).clone().requires_grad_(True)
        extra = {} if c is None else {"dual_clip": c}   # c None: the default call
        loss, m = grpo_loss(logp, old, None, a, mask, **kw, **extra)
        loss.backward()
        assert torch.isfinite(loss) and math.isclose(loss.item(), expect, rel_tol=1e-6)
        assert torch.isfinite(logp.grad).all()
        assert torch.equal(logp.grad.float(), torch.tensor([[0.0, 0.25, 0.0], [0.0, 0.0, 0.0]]))
        assert all(torch.isfinite(v) for v in m.values())
        assert math.isclose(m["ratio_mean"].item(), (2 * E20 + 1) / 4, rel_tol=1e-6)
        assert m["dual_clip_frac"].item() == (0.0 if c is None else 0.25)  # 1 of 4 tokens


def _grpo_loss_before(logp, old_logp, ref_logp, advantages, mask, *, eps_low, eps_high, beta,
                      aggregation, normalizer=None):
    """grpo_loss as it was before the log-ratio clamp and the dual clip (commit 44df935)."""
    ratio = torch.exp(logp.float() - old_logp.float())
    adv = advantages.float().unsqueeze(1)
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    pg_tok, clipped = -torch.minimum(unclipped, clipped_obj), clipped_obj < unclipped
    pg = masked_aggregate(pg_tok, mask, aggregation, normalizer)
    if beta != 0.0:
        d = ref_logp.float() - logp.float()
        kl = masked_aggregate(torch.exp(d) - d - 1.0, mask, aggregation, normalizer)
        loss = pg + beta * kl
    else:
        kl = torch.zeros((), dtype=torch.float32, device=pg.device)
        loss = pg
    with torch.no_grad():
        ratio = torch.exp(logp.float() - old_logp.float())
        metrics = {"pg_loss": pg.detach(), "kl": kl.detach(),
                   "clip_frac": masked_mean(clipped.float(), mask),
                   "ratio_mean": masked_mean(ratio, mask)}
    return loss, metrics


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_dual_clip_none_is_bit_identical_to_before(aggregation, beta):
    # Random log-ratios (|.| << 20, so the clamp is the identity): loss, metrics and gradient
    # equal the pre-change implementation bit for bit; dual_clip_frac is an exact 0.
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    base = old + torch.randn(B, T, generator=g) * 0.5
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, aggregation=aggregation, normalizer=None)
    new_logp = base.clone().requires_grad_(True)
    new_loss, new_m = grpo_loss(new_logp, old, ref, adv, mask, dual_clip=None, **kw)
    new_loss.backward()
    old_logp = base.clone().requires_grad_(True)
    ref_loss, ref_m = _grpo_loss_before(old_logp, old, ref, adv, mask, **kw)
    ref_loss.backward()
    assert torch.equal(new_loss, ref_loss)
    assert torch.equal(new_logp.grad, old_logp.grad)
    assert set(new_m) == set(ref_m) | {"dual_clip_frac"}
    assert all(torch.equal(new_m[k], ref_m[k]) for k in ref_m)
    assert new_m["dual_clip_frac"].item() == 0.0
    # and the default (no dual_clip argument) is the same call
    assert torch.equal(grpo_loss(base, old, ref, adv, mask, **kw)[0], ref_loss)
