"""The DeepSpeed learner rank, in this process (world size 1, gloo): the loss is normalised over
the whole mini-batch whatever the micro-batching, and beta = 0 loads no reference model."""

import pytest
import torch

from rlsys.config import AlgoConfig, LearnerConfig, ModelConfig
from rlsys.actors.learner import Learner
from rlsys.data.models import resolve_model
from rlsys.types import TrainBatch
from rlsys.actors.weight_sync import free_port


def toy_batch(lengths: list[int], advantages: list[float], prompt_len: int = 3, group: int = 1) -> TrainBatch:
    """Random tokens; each `group` consecutive rows share their prompt (1: every prompt its own)."""
    B, L = len(lengths), prompt_len + max(lengths)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (B, L), generator=g)
    input_ids[:, :prompt_len] = input_ids[torch.arange(B) // group * group, :prompt_len]
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        attention_mask[i, :prompt_len + n] = 1
        loss_mask[i, prompt_len:prompt_len + n] = 1
    input_ids = input_ids * attention_mask
    return TrainBatch(input_ids, attention_mask, loss_mask, torch.zeros(B, L), torch.tensor(advantages),
                      torch.zeros(B), prompt_lens=torch.full((B,), prompt_len))


def make_learner(micro: int, aggregation: str = "token", beta: float = 0.0, **learner) -> Learner:
    """Rows one by one (share_prompts off) unless `learner` says otherwise: toy batches' rows have
    prompts of their own, so a planner that shares a group's prompt would mis-count them. Every
    row computed (skip_zero_advantage off) unless asked: ADV has zeros, and the layout tests count
    micro-batches of every row."""
    path = resolve_model(ModelConfig())
    cfg = LearnerConfig(**{"num_ranks": 1, "mini_batch_size": 8, "micro_batch_size": micro,
                           "max_tokens_per_micro_batch": 0, "lr": 1e-2, "share_prompts": False,
                           "skip_zero_advantage": False, **learner})
    learner = Learner(path, "float32", cfg, AlgoConfig(group_size=4, beta=beta, aggregation=aggregation),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    return learner


def train_seeing_gradients(learner: Learner, work) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """learner.train(work), and each optimizer step's whole gradient (before clipping), by parameter:
    read where the plain path (ZeRO-0 fp32) clips them, at the accumulation boundary."""
    seen, clip = [], learner._clip_or_drop_plain_grads

    def capture(norm: float) -> None:
        seen.append({n: p.grad.detach().clone() for n, p in learner.engine.module.named_parameters()
                     if p.grad is not None})
        clip(norm)

    learner._clip_or_drop_plain_grads = capture
    try:
        return learner.train(work), seen
    finally:
        learner._clip_or_drop_plain_grads = clip


def assert_same_gradients(got: list[dict], want: list[dict], rtol: float) -> None:
    """Every parameter's gradient within rtol, elementwise, with an absolute slack of rtol times the
    tensor's largest entry (float sums in another order leave near-zero entries ~1e-8 apart)."""
    assert len(got) == len(want) > 0 and all(g.keys() == w.keys() and g for g, w in zip(got, want))
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=rtol, atol=rtol * float(w[name].abs().max()),
                                       msg=lambda m: f"step {step} {name}: {m}")


LENGTHS = [1, 2, 3, 4, 5, 6, 7, 8]
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0, 0.0, -2.0]


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_first_step_loss_is_the_whole_minibatch_value(aggregation):
    # At the first step old == current weights, so ratio = 1 and the per-token loss is -A_i.
    # token:    -(sum_i A_i * n_i) / sum_i n_i = -(1 - 2 + 1.5 - 2 + 10 + 0 + 0 - 16) / 36 = 7.5 / 36
    # sequence: -(mean_i A_i) = -(1 - 1 + .5 - .5 + 2 + 0 + 0 - 2) / 8 = 0
    expected = {"token": 7.5 / 36, "sequence": 0.0}[aggregation]
    for micro in (2, 8):  # 4 accumulated micro-batches or 1: the same mini-batch loss
        metrics = make_learner(micro, aggregation).train(toy_batch(LENGTHS, ADV))
        assert metrics["loss"] == pytest.approx(expected, abs=1e-6), micro
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_micro_batching_does_not_change_the_gradient():
    # Same mini-batch as 4 accumulated micro-batches or as 1, or cut by token budgets (prompt 3 +
    # lengths 1..8: budgets of 11 and 24 padded tokens give 7 and 4 micro-batches): the same
    # gradient, parameter by parameter. (The weights after AdamW are not compared: its first step is
    # about lr * sign(g), which turns float noise in near-zero gradients into lr-sized differences.)
    batch = toy_batch(LENGTHS, ADV)
    runs = [train_seeing_gradients(make_learner(micro), batch) for micro in (1, 2, 8)]
    for budget in (11, 24):
        learner = make_learner(1)
        learner.cfg.max_tokens_per_micro_batch = budget
        assert sum(len(m) for m in learner.shard(batch).minis) == {11: 7, 24: 4}[budget]
        runs.append(train_seeing_gradients(learner, batch))
    (first, want), *rest = runs
    assert first["grad_norm"] > 0
    for metrics, grads in rest:
        assert metrics["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-5)
        assert_same_gradients(grads, want, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_shared_prompts_give_the_same_update(beta):
    # Groups of 4 rows with one 6-token prompt: laid out shared (two sequences of 6 + answers) or
    # row by row, with token budgets, the same loss, gradient (parameter by parameter) and
    # generator gap; with beta > 0 the reference pass (and, over 2 epochs, the old-log-prob pass)
    # shares too. (One mini-batch: with several, sharing shuffles whole groups and the rows layout
    # single rows, a different split.)
    batch = toy_batch(LENGTHS, ADV, prompt_len=6, group=4)
    out, grads = [], []
    for share in (False, True):
        learner = make_learner(1, beta=beta, max_tokens_per_micro_batch=40, share_prompts=share,
                               epochs=2 if beta else 1)
        work = learner.shard(batch)
        assert work.shared == share
        (first, g1), (second, g2) = train_seeing_gradients(learner, work), train_seeing_gradients(learner, batch)
        out.append((first, second))
        grads.append(g1 + g2)
    for key in ("loss", "grad_norm", "gen_logprob_abs_diff", "kl", "ratio_mean"):
        for step in range(2):
            assert out[1][step][key] == pytest.approx(out[0][step][key], rel=1e-4, abs=1e-6), (key, step)
    assert len(grads[0]) == (4 if beta else 2)  # an optimizer step per epoch, per train call
    assert_same_gradients(grads[1], grads[0], rtol=1e-3)
    assert out[0][1]["grad_norm"] > 0 and (beta == 0 or out[0][1]["kl"] > 0)
    # Short answers to a prompt as long: every micro-batch was really laid out shared.
    assert [o[0]["shared_prompt_frac"] for o in out] == [0.0, 1.0]


@pytest.mark.parametrize("layout", [{"micro": 2}, {"micro": 1, "max_tokens_per_micro_batch": 40, "share_prompts": True}])
def test_zero_advantage_rows_are_not_computed_and_the_update_is_the_same(layout):
    # Two groups of 4 with one 6-token prompt; group 0 scored alike (advantage 0 on every row). At
    # beta 0 its rows carry no gradient: skipped, the learner computes half the rows, and the loss
    # and gradient (parameter by parameter) are those of computing every row, at this step and the
    # next (whose gradient is taken at the weights this step left).
    batch = toy_batch(LENGTHS, [0.0] * 4 + [1.0, -1.0, 0.5, -0.5], prompt_len=6, group=4)
    micro = layout["micro"]
    rest = {k: v for k, v in layout.items() if k != "micro"}
    out, grads = [], []
    for skip in (False, True):
        learner = make_learner(micro, skip_zero_advantage=skip, **rest)
        work = learner.shard(batch)
        assert len(work.batch) == (4 if skip else 8)
        (first, g1), (second, g2) = train_seeing_gradients(learner, work), train_seeing_gradients(learner, batch)
        out.append([first, second])
        grads.append(g1 + g2)
    assert [o[0]["rows_computed_frac"] for o in out] == [1.0, 0.5]
    for key in ("loss", "grad_norm"):
        for step in range(2):
            assert out[1][step][key] == pytest.approx(out[0][step][key], rel=1e-5), (key, step)
    assert_same_gradients(grads[1], grads[0], rtol=1e-4)
    assert out[0][0]["grad_norm"] > 0


def test_every_row_is_computed_where_the_kl_term_has_a_gradient_or_none_has_a_signal():
    # beta > 0: a zero-advantage row still has a KL gradient, so nothing is skipped.
    batch = toy_batch(LENGTHS, [0.0] * 4 + [1.0, -1.0, 0.5, -0.5])
    assert make_learner(2, beta=0.1, skip_zero_advantage=True).train(batch)["rows_computed_frac"] == 1.0
    # Every advantage 0: the mini-batch keeps its shortest row (a rank with nothing would not step);
    # the gradient is exactly 0 and the weights do not move.
    learner = make_learner(2, skip_zero_advantage=True)
    before = [p.detach().clone() for p in learner.engine.module.parameters()]
    metrics = learner.train(toy_batch(LENGTHS, [0.0] * 8))
    assert metrics["rows_computed_frac"] == 1 / 8 and metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.engine.module.parameters()))


def test_uneven_answers_on_a_small_model_are_laid_out_as_rows():
    # One answer of 200 tokens and three of 60 to a 2-token prompt, per group, on the 2-layer,
    # 64-wide test model, budget 512: a shared group pads its answers to 200 (in blocks, or pays
    # its whole dense mask), where rows put the two 202s together and the 62s together: the shared
    # plan costs 1.56x, the FLOP count keeps the rows plan, and the update is the rows layout's.
    batch = toy_batch([200, 60, 60, 60] * 2, ADV, prompt_len=2, group=4)
    planned, rows = (make_learner(1, max_tokens_per_micro_batch=512, share_prompts=share) for share in (True, False))
    assert not planned.shard(batch).shared
    a, b = planned.train(batch), rows.train(batch)
    assert a["shared_prompt_frac"] == 0.0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_beta_zero_loads_no_reference_model():
    assert make_learner(8, beta=0.0).ref is None
    learner = make_learner(8, beta=0.1)
    assert learner.ref is not None
    batch = toy_batch(LENGTHS, ADV)
    assert learner.train(batch)["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference at first
    assert learner.train(batch)["kl"] > 0  # one update later they differ


def test_on_policy_update_skips_the_old_logprob_pass_and_changes_nothing(monkeypatch):
    """One epoch over one mini-batch: the micro-batches' own detached log-probs stand in for the
    separate no-grad pass; loss, ratio and gradient are those of the two-pass update."""
    batch = toy_batch(LENGTHS, ADV)
    batch.gen_logprobs[:] = -1.0
    fast = make_learner(2)
    assert not fast.needs_old_logprobs(1) and fast.needs_old_logprobs(2)
    a = fast.train(batch)
    monkeypatch.setattr(Learner, "needs_old_logprobs", lambda self, n: True)
    b = make_learner(2).train(batch)
    for key in ("loss", "grad_norm", "ratio_mean", "gen_logprob_abs_diff"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_logits_only_from_the_first_response_position_give_the_same_logprobs():
    from rlsys.actors.logprobs import scored_from, token_logprobs

    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.float)
    assert scored_from(mask) == 2 and scored_from(torch.zeros(2, 4)) == 0
    learner = make_learner(8)
    batch = toy_batch(LENGTHS, ADV, prompt_len=5)
    scored = batch.loss_mask.bool()
    with torch.no_grad():
        logits = learner.engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = token_logprobs(logits, batch.input_ids, 1.0)
    for chunk in (0, 3 * len(LENGTHS), 1024):  # all positions at once; 3 positions a chunk (a last short one); one chunk
        learner.cfg.logprob_chunk = chunk
        with torch.no_grad():
            fast = learner._logprobs(learner.engine.module, batch, shared=False)
        assert torch.allclose(fast[scored], full[scored], atol=1e-5), chunk
        assert (fast[:, :4] == 0).all()


def test_chunked_logprobs_give_the_same_gradient_as_one_pass():
    from rlsys.actors.logprobs import chunked_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 7, 8, generator=g)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    grads = []
    for chunk in (14, 2):  # every token in one chunk; one position (both rows) at a time
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        out = chunked_logprobs(h, head, targets, 0.7, chunk)                      # (2, 7)
        reference = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, targets[..., None])[..., 0]
        assert torch.allclose(out, reference, atol=1e-6)
        (out * torch.arange(14.).view(2, 7)).sum().backward()
        grads.append((h.grad.clone(), head.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


# ---------------------------------------------------------------- dropout, precision, LR schedule

def test_dropout_is_off_in_every_forward(tmp_path):
    """A model that ships with attention dropout 0.5: the training forward must score the same
    policy as the no-grad passes (old log-probs, reference) and the generators."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(ModelConfig())
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path)
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=8, max_tokens_per_micro_batch=0, lr=1e-2)
    learner = Learner(str(tmp_path), "float32", cfg, AlgoConfig(group_size=4, beta=0.1), temperature=1.0, rank=0,
                      world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    assert learner.engine.module.config.attention_dropout == 0.0 and learner.ref.module.config.attention_dropout == 0.0
    batch = toy_batch(LENGTHS, ADV)
    learner.engine.train()
    with torch.no_grad():
        a = learner._logprobs(learner.engine, batch, shared=False)
        b = learner._logprobs(learner.engine, batch, shared=False)
        learner.engine.eval()
        c = learner._logprobs(learner.engine, batch, shared=False)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_lr_schedule_warms_up_then_follows_a_cosine():
    # warm-up 2, cosine to 0.1 over 5 optimizer steps (one per train call: mini-batch = batch):
    # step 0: 1/2 = 0.5; step 1: 2/2 = 1; steps 2..4: 0.1 + 0.9 * (1 + cos(pi * p)) / 2, p = 0, 1/2, 1
    # -> 1, 0.55, 0.1 (times lr = 1e-2)
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=4, max_tokens_per_micro_batch=0, lr=1e-2, lr_schedule="cosine",
                        warmup_steps=2, min_lr_ratio=0.1)
    learner = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=4, beta=0.0),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=0, total_updates=5)
    learner.setup("127.0.0.1", free_port())
    lrs = [learner.train(toy_batch(LENGTHS, ADV))["lr"] for _ in range(5)]
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 5.5e-3, 1e-3], rel=1e-9)


def test_a_short_batch_skips_its_missing_steps_in_the_lr_schedule():
    """DAPO's dynamic sampling can leave a batch with fewer mini-batches than planned. The cosine
    schedule is laid out for 2 updates x 2 mini-batches (positions 0-3, lr 1e-2 * [1, 0.75, 0.25, 0]
    with no warm-up and min_lr_ratio 0: cos over 3 spans). A first batch of one mini-batch takes
    position 0; the second batch starts at position 2, as planned, so its last step is at 3
    (lr 0), where counting optimizer steps would have put it at 2 (lr 0.25e-2)."""
    path = resolve_model(ModelConfig())
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=4, micro_batch_size=4, max_tokens_per_micro_batch=0, lr=1e-2,
                        share_prompts=False, lr_schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    learner = Learner(path, "float32", cfg, AlgoConfig(group_size=4, beta=0.0), temperature=1.0, rank=0, world=1,
                      backend="gloo", seed=0, total_updates=4, updates_per_batch=2)
    learner.setup("127.0.0.1", free_port())
    short = learner.train(toy_batch(LENGTHS[:4], ADV[:4]))
    assert short["lr"] == pytest.approx(1e-2)
    full = learner.train(toy_batch(LENGTHS, ADV))
    assert full["lr"] == pytest.approx(0.0, abs=1e-12)
    assert learner.engine.get_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_keeps_lr_after_warmup():
    from rlsys.actors.learner import lr_factor

    cfg = LearnerConfig(lr_schedule="constant", warmup_steps=4)
    assert [lr_factor(s, cfg, total=10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor(s, LearnerConfig(), total=3) for s in range(3)] == [1.0, 1.0, 1.0]


def bf16_learner(stage: int, lr: float) -> Learner:
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=1, max_tokens_per_micro_batch=0, lr=lr, zero_stage=stage)
    learner = Learner(resolve_model(ModelConfig()), "bfloat16", cfg, AlgoConfig(group_size=4, beta=0.0),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    return learner


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(stage):
    """What DeepSpeed is asked for and does: fp32 gradient accumulation over the 8 micro-batches
    of a mini-batch and fp32 gradient communication, with fp32 master weights (ZeRO-1: its BF16
    optimizer; ZeRO-2/3: the ZeRO optimizer's accumulation dtype)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    learner = bf16_learner(stage, 1e-3)
    engine = learner.engine
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.communication_data_type == torch.float32
    if stage == 1:
        assert isinstance(engine.optimizer, BF16_Optimizer) and engine.optimizer.grad_acc_dtype == torch.float32
    else:
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_updates_track_the_fp32_update(stage):
    """Three updates of 8 accumulated micro-batches each: the change of the bf16 weights follows
    the fp32 run's. Tolerance: cosine similarity > 0.99 and norms within 2% (measured: 0.998 and 0.01%; bf16 rounds every
    weight to 8 bits of mantissa and computes in bf16; at lr 1e-3 a step moves a weight by about
    1e-3, several bf16 ulps of the tiny model's weights)."""
    batch = toy_batch(LENGTHS, ADV)
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=1, max_tokens_per_micro_batch=0, lr=1e-3, zero_stage=0)
    fp32 = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=4, beta=0.0), temperature=1.0,
                   rank=0, world=1, backend="gloo", seed=0)
    fp32.setup("127.0.0.1", free_port())
    bf16 = bf16_learner(stage, 1e-3)
    start32 = {k: v.float().clone() for k, v in fp32.full_state_dict().items()}  # ZeRO-0 returns live tensors
    start16 = {k: v.float().clone() for k, v in bf16.full_state_dict().items()}
    for _ in range(3):
        fp32.train(batch)
        bf16.train(batch)
    d32 = torch.cat([(v.float() - start32[k]).flatten() for k, v in fp32.full_state_dict().items()])
    d16 = torch.cat([(v.float() - start16[k]).flatten() for k, v in bf16.full_state_dict().items()])
    cosine = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    assert cosine > 0.99, cosine
    assert float(d16.norm() / d32.norm()) == pytest.approx(1.0, abs=0.02)


# ---------------------------------------------------------------- data parallelism

def two_rank_group(zero_stage: int, overrides: list[str]):
    from rlsys.config import load_config
    from rlsys.cluster.learners import start_learner_group

    cfg = load_config(None, ["learner.num_ranks=2", f"learner.zero_stage={zero_stage}", "algo.group_size=4",
                             "algo.beta=0", "data.prompts_per_step=4", "learner.max_tokens_per_micro_batch=0", *overrides])
    return start_learner_group(cfg, resolve_model(cfg.model))


def stop(group, pg) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for actor in group.actors:
        ray.kill(actor)
    remove_placement_group(pg)


@pytest.mark.parametrize("zero_stage,skip", [(0, False), (3, False), (3, True)])
def test_two_ranks_update_like_one_rank(ray_cluster, zero_stage, skip):
    """The same batch through a 2-rank group and one rank: the same losses, clip fractions and
    gradient norms at every optimizer step, and the same weights after. 2 epochs x 2 mini-batches
    of 8 (4 optimizer steps; the old log-probs then come from their own pass and the ratios move
    off 1 after the first step), micro-batches of 2. This guards the loss normalisation across
    ranks: a rank that divided by its own token count instead of the mini-batch's would scale
    its gradient by the share of tokens it holds. skip: the two ranks leave out the rows of zero
    advantage (learner.skip_zero_advantage; ZeRO-3 gathers in every forward, so both ranks must
    still step in lockstep), the one rank computes every row: the same update. (The per-token
    shares then cover different rows: a 2-rank mini-batch keeps an extra zero row to give each
    rank its share.)"""
    lengths = [1, 9, 2, 3, 7, 4, 8, 5, 6, 2, 1, 9, 3, 3, 5, 8]
    adv = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 0.0, -1.5, 1.5, 0.25, -0.25, 1.0, -1.0, 0.7, -0.7]
    if skip:  # two more rows of zero advantage: the shuffle's first mini-batch (of each update) then has 3
        adv[10:12] = [0.0, 0.0]
    batch = toy_batch(lengths, adv)
    # Rows one by one (toy rows have prompts of their own; sharing is compared in test_shared_prompts_*).
    overrides = ["learner.epochs=2", "learner.mini_batch_size=8", "learner.micro_batch_size=2", "learner.lr=1e-2",
                 "learner.share_prompts=false", f"learner.skip_zero_advantage={str(skip).lower()}"]
    group, pg = two_rank_group(zero_stage, overrides)
    try:
        two = [group.train(batch) for _ in range(2)]
        two_weights = group.full_state_dict()
    finally:
        stop(group, pg)
    cfg = LearnerConfig(num_ranks=1, zero_stage=zero_stage, epochs=2, mini_batch_size=8, micro_batch_size=2, max_tokens_per_micro_batch=0,
                        lr=1e-2, share_prompts=False, skip_zero_advantage=False)
    one_rank = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=4, beta=0.0),
                       temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
    one_rank.setup("127.0.0.1", free_port())
    one = [one_rank.train(batch) for _ in range(2)]
    assert one[1]["clip_frac"] > 0 and one[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-4), \
        "the update should move the ratios, or the test would not cover the old-log-prob pass"
    for a, b in zip(one, two):
        for key in ("loss", "pg_loss", "grad_norm", "lr") + (() if skip else ("clip_frac", "ratio_mean")):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert (b["rows_computed_frac"] < 1.0) == skip
    # k_proj.bias shifts every key's score for a query equally, which softmax ignores: its gradient
    # is 0 up to float noise, and AdamW's first steps turn noise into +-lr. Every other weight must match.
    compared = 0
    for name, w in one_rank.full_state_dict().items():
        if not name.endswith("k_proj.bias"):
            # ZeRO-3 sums the ranks' gradients by reduce-scatter, and skipping puts rows in other
            # micro-batches: other summation orders, whose float noise reached 1.3e-5 (ZeRO-3, an
            # AVX2-only AMD EPYC Zen 1) and 3e-5 (skip) on a few weights; 4 AdamW steps of lr 1e-2
            # on a wrong gradient move them ~1e-2. ZeRO-0 all-reduces in one order: 1e-5 holds.
            assert torch.allclose(two_weights[name], w, atol=1e-4 if skip or zero_stage == 3 else 1e-5), name
            compared += 1
    assert compared >= 20


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_only_rank_0_holds_the_full_weights(ray_cluster, zero_stage):
    """Saving or exporting copies the whole model once, on the writing rank: rank 1 returns nothing."""
    import ray
    from safetensors.torch import load_file

    group, pg = two_rank_group(zero_stage, ["learner.mini_batch_size=8", "learner.micro_batch_size=4"])
    try:
        full = ray.get([a.full_state_dict.remote() for a in group.actors])
    finally:
        stop(group, pg)
    assert full[1] is None
    initial = load_file(f"{resolve_model(ModelConfig())}/model.safetensors")
    assert set(full[0]) == set(initial) and all(torch.equal(full[0][k], initial[k]) for k in initial)


def test_generator_gap_metrics_are_token_weighted_means_and_a_true_max():
    """Generator log-probs of 0 on every token: the gap is |learner log-prob| per response token;
    over 4 micro-batches the mean is token-weighted and the max is the largest single gap (not a
    sum of the micro-batches' maxima)."""
    learner = make_learner(2)
    batch = toy_batch(LENGTHS, ADV)
    with torch.no_grad():
        logp = learner._logprobs(learner.engine.module, batch, shared=False)
    gaps = logp[batch.loss_mask.bool()].abs().double()
    metrics = learner.train(batch)
    assert metrics["gen_logprob_abs_diff"] == pytest.approx(float(gaps.mean()), rel=1e-5)
    assert metrics["gen_logprob_max_abs_diff"] == pytest.approx(float(gaps.max()), rel=1e-5)
    k3 = torch.exp(-gaps) + gaps - 1  # r = learner - generator = -gap
    assert metrics["gen_kl"] == pytest.approx(float(k3.mean()), rel=1e-5)


def corrected_learner(off_policy: str = "tis", rows: str = "all") -> Learner:
    learner = make_learner(8)
    learner.algo = AlgoConfig(group_size=4, beta=0.0, off_policy=off_policy, off_policy_rows=rows)
    return learner


def test_off_policy_weights_reach_the_update():
    """algo.off_policy_rows=all weights every response token by rho = pi_learner / pi_generator
    (one micro-batch of the 8 rows, first step: ratio 1, per-token loss -w A, token mean over 36).
    Generator log-probs equal to the learner's: rho = 1, the loss and the updated weights are an
    uncorrected learner's. Lower by 0.3 on rows 0-3: their tokens weigh e^0.3 (TIS, under the cap
    of 2), loss -(e^0.3 (1 - 2 + 1.5 - 2) + (10 + 0 + 0 - 16)) / 36 = (1.5 e^0.3 + 6) / 36 instead
    of 7.5 / 36, and the update differs. seq_mask drops rows 0-3 (geometric-mean rho e^0.3 = 1.35 >
    1.25): loss -(10 - 16) / 36 = 6 / 36, every token of those rows counted as masked."""
    import math

    batch = toy_batch(LENGTHS, ADV)
    plain = make_learner(8)
    with torch.no_grad():
        own = plain._logprobs(plain.engine.module, batch, shared=False)
    plain_metrics = plain.train(batch)
    assert plain_metrics["loss"] == pytest.approx(7.5 / 36, abs=1e-6)
    plain_weights = plain.full_state_dict()

    batch.gen_logprobs = own.clone()
    same = corrected_learner()
    metrics = same.train(batch)
    assert metrics["loss"] == pytest.approx(7.5 / 36, abs=1e-6) and metrics["is_weight_mean"] == pytest.approx(1.0)
    for name, w in same.full_state_dict().items():
        assert torch.allclose(w, plain_weights[name], atol=1e-6), name

    shifted = own.clone()
    shifted[:4] -= 0.3
    batch.gen_logprobs = shifted
    tis = corrected_learner()
    metrics = tis.train(batch)
    assert metrics["loss"] == pytest.approx((1.5 * math.exp(0.3) + 6) / 36, abs=1e-5)
    tokens_0_3 = sum(LENGTHS[:4]) / sum(LENGTHS)
    assert metrics["is_weight_mean"] == pytest.approx(1 + tokens_0_3 * (math.exp(0.3) - 1), rel=1e-5)
    moved = tis.full_state_dict()
    assert any(not torch.allclose(moved[name], w, atol=1e-4) for name, w in plain_weights.items())

    dropped = corrected_learner("seq_mask").train(batch)
    assert dropped["loss"] == pytest.approx(6 / 36, abs=1e-5)
    assert dropped["is_masked_frac"] == pytest.approx(tokens_0_3) and dropped["is_masked_seq_frac"] == 0.5
    # k3 KL(generator || learner) with r = learner - generator = 0.3 on those tokens, 0 elsewhere
    assert dropped["mismatch_kl"] == pytest.approx(tokens_0_3 * (math.exp(0.3) - 0.3 - 1), rel=1e-4)


def stateful_learner(stage: int, dtype: str) -> Learner:
    # A warm-up and a cosine: the LR differs at every update, so a lost scheduler state shows.
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=4, micro_batch_size=2, max_tokens_per_micro_batch=0, lr=1e-2, zero_stage=stage,
                        lr_schedule="cosine", warmup_steps=2)
    learner = Learner(resolve_model(ModelConfig()), dtype, cfg, AlgoConfig(group_size=4, beta=0.0),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=3, total_updates=8)
    learner.setup("127.0.0.1", free_port())
    return learner


@pytest.mark.parametrize("stage,dtype", [(0, "float32"), (1, "bfloat16"), (3, "float32")])
def test_a_saved_learner_continues_exactly_where_it_stopped(tmp_path, stage, dtype):
    """Two mini-batches per batch (so the shuffle, seeded by the update count, matters), Adam
    moments, the LR schedule and the bf16 fp32 master copy all come back: the resumed learner's
    next update is the uninterrupted one's, bit for bit."""
    first, second = toy_batch(LENGTHS, ADV), toy_batch(LENGTHS[::-1], ADV)
    ran = stateful_learner(stage, dtype)
    ran.train(first)
    ran.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "learner" / "state").is_dir()
    expected = ran.train(second)
    expected_weights = ran.full_state_dict()
    resumed = stateful_learner(stage, dtype)
    if stage == 3:  # as a rank on another node gets it: the files it reads, sent by the driver in chunks
        from rlsys.checkpoint import file_chunks, rank_state_files

        names = rank_state_files(tmp_path / "ckpt", rank=0)
        assert names and all(name.startswith("learner/") for name in names)
        for chunk in file_chunks(tmp_path / "ckpt", names, chunk_bytes=4096):
            resumed.receive_state_chunk("rlsys-resume-test", *chunk)
        assert resumed.load_received_state("rlsys-resume-test", {n: (tmp_path / "ckpt" / n).stat().st_size
                                                                 for n in names}) == 1
        resumed.drop_received_state("rlsys-resume-test")
    else:
        assert resumed.load_state(str(tmp_path / "ckpt")) == 1
    got = resumed.train(second)
    assert got == expected
    weights = resumed.full_state_dict()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def test_learner_state_is_json_and_safetensors_and_builds_only_allowed_types(tmp_path):
    """No pickle in a checkpoint: the learner's DeepSpeed state files are JSON with their tensors
    in safetensors beside them, and a file naming any class but DeepSpeed's few state classes is
    refused before anything is built."""
    import json

    from rlsys.actors import state_tree

    learner = stateful_learner(1, "bfloat16")  # ZeRO-1 bf16: the state with DeepSpeed's own classes
    learner.train(toy_batch(LENGTHS, ADV))
    learner.save(str(tmp_path / "ckpt"))
    files = [p for p in (tmp_path / "ckpt" / "learner").rglob("*") if p.is_file()]
    assert files
    for f in files:
        if f.suffix != ".safetensors":
            assert f.read_text()[:1] in "{[", f  # every state file is JSON (under DeepSpeed's file name)
            json.loads(f.read_text())
    (tmp_path / "evil").write_text(json.dumps({"x": {"__object__": "os:system", "state": {}}}))
    state_tree.save({}, tmp_path / "empty")
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "empty.safetensors").read_bytes())
    with pytest.raises(TypeError, match="names class os:system, which it may not hold"):
        state_tree.load(tmp_path / "evil")
    with pytest.raises(TypeError, match="is not a type a checkpoint may hold"):
        state_tree.save({"f": print}, tmp_path / "bad")


@pytest.mark.parametrize("stage,dtype", [(0, "float32"), (1, "bfloat16"), (2, "float32"), (3, "float32")])
def test_a_non_finite_loss_skips_the_update_and_is_counted(stage, dtype):
    """A NaN advantage makes its mini-batch's loss and gradients NaN: that update is not applied
    (ZeRO-0 fp32 by rlsys, ZeRO 1-3 by DeepSpeed's own overflow check), the healthy one is, no NaN
    reaches a weight, and the metrics say how many updates were skipped."""
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=4, micro_batch_size=2, max_tokens_per_micro_batch=0, lr=1e-2, zero_stage=stage)
    learner = Learner(resolve_model(ModelConfig()), dtype, cfg, AlgoConfig(group_size=4, beta=0.0),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=3)
    learner.setup("127.0.0.1", free_port())
    before = {k: v.clone() for k, v in learner.full_state_dict().items()}  # (ZeRO 0-2 hand out the live tensors)
    poisoned = toy_batch(LENGTHS, [float("nan")] + ADV[1:])  # one of the two mini-batches is poisoned
    metrics = learner.train(poisoned)
    after = {k: v.clone() for k, v in learner.full_state_dict().items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(torch.isfinite(v).all() for v in after.values()), "NaN reached the weights"
    assert metrics["skipped_updates"] == 1.0, metrics
    assert changed, "the healthy mini-batch still updates"
    assert metrics["grad_norm"] == metrics["grad_norm"] and metrics["grad_norm"] > 0  # the one step taken
    every = learner.train(toy_batch(LENGTHS, [float("nan")] * len(ADV)))
    assert every["skipped_updates"] == 2.0 and every["grad_norm"] != every["grad_norm"]  # NaN: no step taken
    assert all(torch.equal(v, learner.full_state_dict()[k]) for k, v in after.items())


def test_zero3_builds_the_model_sharded_from_the_start(monkeypatch):
    """ZeRO-3: transformers builds the policy (and the reference) inside deepspeed.zero.Init, so no
    rank holds the whole model at any time: every parameter is a DeepSpeed shard (ds_id) when
    from_pretrained returns, before deepspeed.initialize. Other stages load whole models."""
    import rlsys.actors.learner as module

    built = []
    real = module.load_without_dropout

    def spy(path, dtype):
        model = real(path, dtype)
        built.append(all(hasattr(p, "ds_id") for p in model.parameters()))
        return model

    monkeypatch.setattr(module, "load_without_dropout", spy)
    for stage in (3, 0):
        cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=2, max_tokens_per_micro_batch=0, lr=1e-2, zero_stage=stage)
        learner = Learner(resolve_model(ModelConfig()), "float32", cfg, AlgoConfig(group_size=4, beta=0.001),
                          temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
        learner.setup("127.0.0.1", free_port())
        assert learner.train(toy_batch(LENGTHS, ADV))["loss"] == pytest.approx(7.5 / 36, abs=1e-6)
    assert built == [True, True, False, False]  # ZeRO-3: policy and reference sharded; ZeRO-0: whole



def test_learner_doctests():  # resolve_logprob_chunk
    import doctest

    from rlsys.actors import learner

    assert doctest.testmod(learner).failed == 0
