"""The DeepSpeed learner rank, in this process (world size 1, gloo): the loss is normalised over
the whole mini-batch whatever the micro-batching, and beta = 0 loads no reference model."""

import pytest
import torch

from rlsys.config import AlgoConfig, LearnerConfig, ModelConfig
from rlsys.learner import Learner
from rlsys.models import resolve_model
from rlsys.types import TrainBatch
from rlsys.weight_sync import free_port


def toy_batch(lengths: list[int], advantages: list[float], prompt_len: int = 3) -> TrainBatch:
    B, L = len(lengths), prompt_len + max(lengths)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (B, L), generator=g)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        attention_mask[i, :prompt_len + n] = 1
        loss_mask[i, prompt_len:prompt_len + n] = 1
    input_ids = input_ids * attention_mask
    return TrainBatch(input_ids, attention_mask, loss_mask, torch.zeros(B, L), torch.tensor(advantages),
                      torch.zeros(B))


def make_learner(micro: int, aggregation: str = "token", beta: float = 0.0) -> Learner:
    path = resolve_model(ModelConfig())
    cfg = LearnerConfig(num_ranks=1, mini_batch_size=8, micro_batch_size=micro, lr=1e-2)
    learner = Learner(path, "float32", cfg, AlgoConfig(group_size=4, beta=beta, aggregation=aggregation),
                      temperature=1.0, rank=0, world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    return learner


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
    # Same mini-batch as 4 accumulated micro-batches or as 1: the same gradient. (The weights after
    # AdamW are not compared: its first step is about lr * sign(g), which turns float noise in
    # near-zero gradients into lr-sized differences.)
    batch = toy_batch(LENGTHS, ADV)
    norms = [make_learner(micro).train(batch)["grad_norm"] for micro in (1, 2, 8)]
    assert norms[0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and norms[2] == pytest.approx(norms[0], rel=1e-5)


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
    from rlsys.learner import by_length, scored_from, token_logprobs

    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.float)
    assert scored_from(mask) == 2 and scored_from(torch.zeros(2, 4)) == 0
    assert by_length(torch.tensor([4, 0, 2]), torch.tensor([5, 9, 1, 9, 3])).tolist() == [2, 4, 0]
    learner = make_learner(8)
    batch = toy_batch(LENGTHS, ADV, prompt_len=5)
    with torch.no_grad():
        fast = learner._logprobs(learner.engine.module, batch)
        logits = learner.engine.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = token_logprobs(logits, batch.input_ids, 1.0)
    scored = batch.loss_mask.bool()
    assert torch.allclose(fast[scored], full[scored], atol=1e-5)
    assert (fast[:, :4] == 0).all()
