"""DAPO's options: the pure functions (rlsys.math.dapo), truncated rows in make_batch, and
rlsys.loops.rollouts.collect with fake generate / score callables."""
import doctest
import math

import torch

from rlsys.cluster.pool import chunk_seed
from rlsys.config import AlgoConfig, load_config
from rlsys.data.prompts import Prompt
from rlsys.loops import rollouts as rollouts_module
from rlsys.loops.rollouts import collect, round_seed
from rlsys.math import dapo
from rlsys.math.batch import make_batch
from rlsys.math.dapo import informative_groups, mask_truncated_rows, overlong_penalties
from rlsys.types import RewardResult, Rollout


def test_doctests():
    assert doctest.testmod(dapo).failed == 0
    assert doctest.testmod(rollouts_module).failed == 0


def test_overlong_penalties_by_hand():
    # Lmax 10, Lc 4: free up to 6 tokens, then -p/4 per token: 7 -> -0.25, 9 -> -0.75, 10 -> -1
    assert overlong_penalties([0, 6, 7, 9, 10], max_tokens=10, buffer=4, penalty=1.0) == [0, 0, -0.25, -0.75, -1.0]
    assert overlong_penalties([7, 10], max_tokens=10, buffer=4, penalty=2.0) == [-0.5, -2.0]
    # Lc 1: only a response of exactly Lmax pays, all of p
    assert overlong_penalties([9, 10], max_tokens=10, buffer=1, penalty=0.5) == [0.0, -0.5]
    assert overlong_penalties([12], max_tokens=10, buffer=4, penalty=1.0) == [-1.0]  # longer than Lmax: bounded
    assert overlong_penalties([10, 3], max_tokens=10, buffer=0, penalty=1.0) == [0.0, 0.0]  # off


def test_informative_groups():
    assert informative_groups([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], group_size=2) == [False, True, False]
    assert informative_groups([0.2, 0.2, 0.2, 0.2], group_size=4) == [False]
    assert informative_groups([1.0, 0.8], group_size=2) == [True]


def test_mask_truncated_rows_zeroes_whole_rows_only():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    out = mask_truncated_rows(mask, ["length", "stop"])
    assert out.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert out.dtype == mask.dtype and mask[0].sum() == 2  # the input is left alone


def rollout(group, row, response, finish="stop", text=""):
    return Rollout(prompt_index=row, group=group, prompt_ids=[1, 2], response_ids=response,
                   response_logprobs=[-0.5] * len(response), text=text, finish_reason=finish, weight_version=0,
                   answer="")


def test_make_batch_masks_truncated_rows_and_keeps_advantages():
    rollouts = [rollout(0, 5, [3, 4, 5], "length"), rollout(0, 5, [6]), rollout(1, 6, [7, 8]), rollout(1, 6, [9])]
    rewards = [-1.0, 1.0, 0.0, 1.0]
    plain = make_batch(rollouts, rewards, AlgoConfig(group_size=2))
    masked = make_batch(rollouts, rewards, AlgoConfig(group_size=2, mask_truncated=True))
    assert plain.loss_mask[0].tolist() == [0, 0, 1, 1, 1]
    assert masked.loss_mask.tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert torch.equal(masked.loss_mask[1:], plain.loss_mask[1:])
    # the truncated row still counts in its group: A = (-1 - 0) / std([-1, 1]) = -1/sqrt(2)
    assert torch.equal(masked.advantages, plain.advantages)
    assert torch.allclose(masked.advantages[:2], torch.tensor([-0.7071068, 0.7071068]))
    for name in ("input_ids", "attention_mask", "gen_logprobs", "rewards"):
        assert torch.equal(getattr(masked, name), getattr(plain, name)), name


# collect() with fakes. Prompt row `r` is sampled G times; sample k of row r has the reward
# REWARDS[r][k] (default 1.0: a group that teaches nothing) and LENGTHS[r][k] response tokens.

G = 2


class Fake:
    """generate and score as the loop's groups give them, deterministic, recording every call."""

    def __init__(self, rewards: dict, lengths: dict | None = None, truncated: set = frozenset()):
        self.rewards, self.lengths, self.truncated = rewards, lengths or {}, truncated
        self.generate_calls, self.score_calls = [], []

    def generate(self, requests, n, seed):
        self.generate_calls.append((requests, n, seed))
        return [rollout(group, row, [7] * self.lengths.get(row, [3] * n)[k],
                        "length" if (row, k) in self.truncated else "stop", text=f"{row}:{k}")
                for group, row, ids, answer in requests for k in range(n)]

    def score(self, rollouts):
        self.score_calls.append(rollouts)
        results = []
        for r in rollouts:
            row, k = map(int, r.text.split(":"))
            reward = self.rewards.get(row, [1.0] * G)[k]
            results.append(RewardResult(reward=reward, accuracy=reward, format=1.0, timed_out=False))
        return results


class Stream:
    """prompts.next(): the next prompts_per_step rows, 100, 101, ..."""

    def __init__(self, n):
        self.n, self.row = n, 100

    def next(self):
        out = [Prompt(index=self.row + i, text=f"q{self.row + i}", ids=[self.row + i], question="", answer="")
               for i in range(self.n)]
        self.row += self.n
        return out


def config(*overrides):
    # 4 prompts x G 2 = 8 rows; mini-batches of 4 rows = 2 groups
    return load_config(None, ["algo.group_size=2", "data.prompts_per_step=4", "learner.mini_batch_size=4",
                              "learner.micro_batch_size=2", "generator.max_tokens=10", "generator.max_model_len=32",
                              "trainer.seed=7", *overrides])


def rows(got):
    return [p.index for p in got.prompts]


def check_layout(got, cfg):
    """Groups 0..n-1 in order, each from its prompt; make_batch accepts it; whole mini-batches."""
    assert [r.group for r in got.rollouts] == [g for g in range(len(got.prompts)) for _ in range(G)]
    assert [r.prompt_index for r in got.rollouts] == [p.index for p in got.prompts for _ in range(G)]
    batch = make_batch(got.rollouts, got.rewards, cfg.algo)
    assert len(batch) % cfg.learner.mini_batch_size == 0 and len(batch) > 0
    return batch


def test_collect_options_off_calls_generate_and_score_once_as_the_loop_did():
    cfg, stream = config(), Stream(4)
    fake = Fake({100: [1.0, 0.0]}, lengths={101: [10, 9]})
    first = stream.next()
    got = collect(first, stream.next, fake.generate, fake.score, cfg, step=3)
    assert len(fake.generate_calls) == 1 and len(fake.score_calls) == 1 and stream.row == 104
    requests, n, seed = fake.generate_calls[0]
    assert requests == [p.request(g) for g, p in enumerate(first)] and n == 2 and seed == (7, 3)
    rollouts = fake.score_calls[0]
    assert got.rollouts is rollouts and got.prompts is first  # nothing copied, nothing renumbered
    assert got.rewards == [s.reward for s in got.scores] == [1.0, 0.0] + [1.0] * 6
    assert got.metrics == {"dapo/groups": 4, "dapo/fill_rounds": 0, "dapo/dropped_groups": 0,
                           "dapo/surplus_groups": 0, "dapo/fallback": 0.0, "dapo/overlong_penalty_mean": 0.0,
                           "dapo/truncated_masked": 0}
    check_layout(got, cfg)


def test_collect_overlong_shapes_rewards_but_not_the_scores():
    cfg, stream = config("algo.overlong_buffer=4", "algo.overlong_penalty=0.5"), Stream(4)
    fake = Fake({}, lengths={101: [10, 8]})  # -0.5 at Lmax; 8 tokens: 0.5 * (6 - 8) / 4 = -0.25
    got = collect(stream.next(), stream.next, fake.generate, fake.score, cfg, step=0)
    assert got.rewards == [1.0, 1.0, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [s.reward for s in got.scores] == [1.0] * 8
    assert got.metrics["dapo/overlong_penalty_mean"] == -0.75 / 8


def test_collect_refills_until_full_and_renumbers_groups():
    cfg, stream = config("algo.dynamic_sampling=true"), Stream(4)
    # round 0 (rows 100-103): 101 and 103 informative; round 1 (104-107): 104, 105, 107
    fake = Fake({101: [1.0, 0.0], 103: [0.0, 1.0], 104: [0.0, 1.0], 105: [1.0, 0.0], 107: [0.5, 0.0]})
    got = collect(stream.next(), stream.next, fake.generate, fake.score, cfg, step=5)
    assert [seed for _, _, seed in fake.generate_calls] == [(7, 5), (7, 5, 1, 0)]
    assert [g for g, *_ in fake.generate_calls[1][0]] == [0, 1, 2, 3]  # each round numbers its own requests
    assert rows(got) == [101, 103, 104, 105]  # 107: the 5th informative group, one too many
    assert got.rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert got.metrics == {"dapo/groups": 4, "dapo/fill_rounds": 1, "dapo/dropped_groups": 3,
                                "dapo/surplus_groups": 1, "dapo/fallback": 0.0, "dapo/overlong_penalty_mean": 0.0,
                                "dapo/truncated_masked": 0}
    batch = check_layout(got, cfg)
    assert bool((batch.advantages != 0).all())


def test_collect_short_after_the_last_round_is_cut_to_whole_mini_batches():
    cfg, stream = config("algo.dynamic_sampling=true", "algo.max_fill_rounds=2"), Stream(4)
    fake = Fake({100: [1.0, 0.0], 105: [0.0, 1.0], 111: [1.0, 0.0]})  # one informative group a round
    got = collect(stream.next(), stream.next, fake.generate, fake.score, cfg, step=0)
    assert len(fake.generate_calls) == len(fake.score_calls) == 3 and stream.row == 112  # the bound: 2 extra rounds
    assert rows(got) == [100, 105]  # 3 informative; a mini-batch is 2 groups: 111 is cut
    assert got.metrics["dapo/groups"] == 2 and got.metrics["dapo/fill_rounds"] == 2
    assert got.metrics["dapo/surplus_groups"] == 1 and got.metrics["dapo/dropped_groups"] == 9
    assert got.metrics["dapo/fallback"] == 0.0
    assert len(check_layout(got, cfg)) == 4


def test_collect_without_enough_signal_trains_on_the_last_round():
    for signal in ({}, {102: [1.0, 0.0]}):  # no informative group; one, under a mini-batch (2 groups)
        cfg, stream = config("algo.dynamic_sampling=true", "algo.max_fill_rounds=1"), Stream(4)
        fake = Fake(signal)
        got = collect(stream.next(), stream.next, fake.generate, fake.score, cfg, step=0)
        assert rows(got) == [104, 105, 106, 107]  # the last round as it is
        assert got.rollouts is fake.score_calls[-1]
        assert got.metrics["dapo/fallback"] == 1.0 and got.metrics["dapo/groups"] == 4
        assert got.metrics["dapo/dropped_groups"] + got.metrics["dapo/surplus_groups"] == 4  # round 0's groups
        check_layout(got, cfg)


def test_collect_drops_on_shaped_rewards_and_counts_masked_truncations():
    cfg = config("algo.dynamic_sampling=true", "algo.max_fill_rounds=0", "algo.overlong_buffer=4",
                 "algo.mask_truncated=true")
    # all rewards 1.0: only the overlong term sets 100 and 102 apart (10 tokens, truncated: 0.0)
    fake = Fake({}, lengths={100: [10, 3], 102: [3, 10]}, truncated={(100, 0), (102, 1)})
    stream = Stream(4)
    got = collect(stream.next(), stream.next, fake.generate, fake.score, cfg, step=0)
    assert rows(got) == [100, 102] and got.rewards == [0.0, 1.0, 1.0, 0.0]
    assert got.metrics["dapo/truncated_masked"] == 2 and got.metrics["dapo/overlong_penalty_mean"] == -0.5
    batch = check_layout(got, cfg)
    assert batch.loss_mask.sum(dim=1).tolist() == [0, 3, 3, 0]


def test_refill_round_seeds_never_repeat_a_chunk_seed():
    seeds = [chunk_seed(*round_seed(7, step, rnd), chunk) for step in range(3) for rnd in range(4)
             for chunk in range(16)]
    assert len(set(seeds)) == len(seeds)


# ---------------------------------------------------------------- through the real loop

def test_dynamic_sampling_in_a_real_run_trains_only_on_groups_with_signal(ray_cluster, tmp_path):
    """configs/toy.yaml early on: most samples score 0, so some groups of 16 are all 0 and are
    dropped; refills bring the batch back to 16 informative groups."""
    from pathlib import Path

    from rlsys.config import load_config
    from rlsys.loops.train import train
    from rlsys.observe.metrics import read_jsonl

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "toy.yaml",
                      [f"trainer.output_dir={tmp_path}", "trainer.total_steps=6", "trainer.progress=false",
                       "algo.dynamic_sampling=true", "algo.max_fill_rounds=3"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    assert sum(r["dapo/dropped_groups"] for r in rows) > 0, "the toy task should start with groups of equal rewards"
    assert max(r["dapo/fill_rounds"] for r in rows) >= 1
    filled = [r for r in rows if not r["dapo/fallback"]]
    assert filled, "every step fell back to groups without signal: the invariant below was never checked"
    for r in filled:
        assert r["groups/all_equal_frac"] == 0.0  # only groups with signal were trained on
        assert r["rollouts/count"] == r["dapo/groups"] * 16 and r["rollouts/count"] % 64 == 0


def test_truncated_responses_masked_and_shaped_in_a_real_run(ray_cluster, tmp_path):
    """configs/tiny.yaml (a random model: most answers run to max_tokens=16): with mask_truncated
    every truncated answer is counted as masked, and the overlong term is paid by them."""
    from pathlib import Path

    from rlsys.config import load_config
    from rlsys.loops.train import train
    from rlsys.observe.metrics import read_jsonl

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml",
                      [f"trainer.output_dir={tmp_path}", "trainer.total_steps=2", "trainer.progress=false",
                       "algo.mask_truncated=true", "algo.overlong_buffer=4"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    for r in rows:
        truncated = round(r["truncated_frac"] * r["rollouts/count"])
        assert truncated > 0 and r["dapo/truncated_masked"] == truncated
        assert r["dapo/overlong_penalty_mean"] <= -truncated / r["rollouts/count"]  # -1 each at max_tokens
        assert math.isfinite(r["loss"])
