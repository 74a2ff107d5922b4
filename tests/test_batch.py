"""Tests for rlsys.math.batch.make_batch and TrainBatch.select, on hand-made rollouts."""
import pytest
import torch

from rlsys.math.batch import make_batch
from rlsys.config import AlgoConfig
from rlsys.types import Rollout, TrainBatch

PAD = 0  # make_batch right-pads with id 0
A = 0.7071068  # 0.5 / std([1, 0]) with the unbiased std sqrt(0.5) = 0.7071068


def rollout(group, prompt, response, logprobs):
    return Rollout(prompt_index=10 + group, group=group, prompt_ids=prompt, response_ids=response,
                   response_logprobs=logprobs, text="", finish_reason="stop", weight_version=0, answer="")


def two_groups():
    """2 groups x 2 samples; row lengths 3+2=5, 3+1=4, 2+4=6, 2+2=4 -> L = 6."""
    return [
        rollout(0, [11, 12, 13], [21, 22], [-0.1, -0.2]),
        rollout(0, [11, 12, 13], [23], [-0.3]),
        rollout(1, [14, 15], [24, 25, 26, 27], [-0.4, -0.5, -0.6, -0.7]),
        rollout(1, [14, 15], [28, 29], [-0.8, -0.9]),
    ]


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


@pytest.fixture
def batch():
    return make_batch(two_groups(), [1.0, 0.0, 1.0, 1.0], AlgoConfig(group_size=2))


def test_input_ids_are_prompt_then_response_right_padded(batch):
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [
        [11, 12, 13, 21, 22, PAD],
        [11, 12, 13, 23, PAD, PAD],
        [14, 15, 24, 25, 26, 27],
        [14, 15, 28, 29, PAD, PAD],
    ]
    assert len(batch) == 4


def test_attention_mask_covers_prompt_and_response(batch):
    assert batch.attention_mask.dtype == torch.long
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
    ]


def test_loss_mask_is_exactly_the_response_positions(batch):
    assert batch.loss_mask.dtype == torch.float32
    assert batch.loss_mask.tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0],
    ]


def test_gen_logprobs_sit_on_the_response_positions(batch):
    assert close(batch.gen_logprobs, [
        [0, 0, 0, -0.1, -0.2, 0],
        [0, 0, 0, -0.3, 0, 0],
        [0, 0, -0.4, -0.5, -0.6, -0.7],
        [0, 0, -0.8, -0.9, 0, 0],
    ])


def test_group_advantages_and_rewards(batch):
    # group 0: rewards [1, 0], mean .5, unbiased std sqrt(.5) = .7071 -> [+.5/.7071, -.5/.7071]
    # group 1: rewards [1, 1] are all equal -> exactly 0
    assert batch.advantages.shape == (4,) and batch.advantages.dtype == torch.float32
    assert close(batch.advantages, [A, -A, 0.0, 0.0])
    assert batch.advantages[2:].tolist() == [0.0, 0.0]
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_advantages_without_std_normalization():
    b = make_batch(two_groups(), [1.0, 0.0, 0.25, 0.75], AlgoConfig(group_size=2, std_normalize=False))
    # centred only: group 0 mean .5 -> [.5, -.5]; group 1 mean .5 -> [-.25, .25]
    assert close(b.advantages, [0.5, -0.5, -0.25, 0.25])


def test_one_group_of_four():
    rollouts = [rollout(0, r.prompt_ids, r.response_ids, r.response_logprobs) for r in two_groups()]
    b = make_batch(rollouts, [1.0, 0.0, 0.0, 0.0], AlgoConfig(group_size=4))
    # mean .25, centred [.75, -.25, -.25, -.25], unbiased var (.5625 + 3 * .0625) / 3 = .25, std .5
    assert close(b.advantages, [1.5, -0.5, -0.5, -0.5])


def test_mixed_groups_in_a_block_fail():
    rollouts = two_groups()
    rollouts[1].group = 1  # block 0..1 now holds groups {0, 1}
    with pytest.raises(AssertionError, match=r"rollouts 0\.\.1 mix groups \[0, 1\]"):
        make_batch(rollouts, [1.0, 0.0, 1.0, 1.0], AlgoConfig(group_size=2))


def test_interleaved_groups_fail():
    rollouts = two_groups()
    rollouts[1], rollouts[2] = rollouts[2], rollouts[1]  # [0, 1, 0, 1]
    with pytest.raises(AssertionError, match="mix groups"):
        make_batch(rollouts, [1.0, 0.0, 1.0, 1.0], AlgoConfig(group_size=2))


def test_count_mismatches_fail():
    with pytest.raises(AssertionError, match="4 rollouts, 3 rewards"):
        make_batch(two_groups(), [1.0, 0.0, 1.0], AlgoConfig(group_size=2))
    with pytest.raises(AssertionError, match="group_size 3"):  # 4 rollouts are not whole groups of 3
        make_batch(two_groups(), [1.0, 0.0, 1.0, 1.0], AlgoConfig(group_size=3))


# ---------------------------------------------------------------- select

def test_select_trims_to_the_longest_remaining_row(batch):
    sub = batch.select(torch.tensor([1, 3]))  # lengths 4 and 4 -> width 4
    assert isinstance(sub, TrainBatch) and len(sub) == 2
    assert sub.input_ids.tolist() == [[11, 12, 13, 23], [14, 15, 28, 29]]
    assert sub.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert sub.loss_mask.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    assert close(sub.gen_logprobs, [[0, 0, 0, -0.3], [0, 0, -0.8, -0.9]])
    assert close(sub.advantages, [-A, 0.0])
    assert sub.rewards.tolist() == [0.0, 1.0]


def test_select_with_a_slice(batch):
    sub = batch.select(slice(0, 2))  # lengths 5 and 4 -> width 5
    assert sub.input_ids.tolist() == [[11, 12, 13, 21, 22], [11, 12, 13, 23, PAD]]
    assert sub.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert close(sub.advantages, [A, -A])


def test_select_keeping_the_longest_row_keeps_full_width(batch):
    sub = batch.select(torch.tensor([2, 0]))
    assert sub.input_ids.shape == (2, 6)
    assert sub.input_ids[0].tolist() == [14, 15, 24, 25, 26, 27]
    assert sub.rewards.tolist() == [1.0, 1.0]
