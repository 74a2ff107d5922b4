"""The asynchronous loop (trainer.max_staleness > 0, rlsys.loops.async_train): admission keeps every
batch within the staleness bound, and a real run overlaps generation with learning and still learns."""

import statistics
import threading
import types
from pathlib import Path

import pytest

from rlsys.config import load_config, off_policy_band
from rlsys.data.prompts import Prompt
from rlsys.loops.async_train import Producer
from rlsys.observe.metrics import read_jsonl
from rlsys.types import RewardResult, Rollout


class FakeStream:
    """Prompts 0, 1, 2, ...; its position is the count drawn."""

    def __init__(self):
        self.drawn = 0
        self.skipped = []

    def next(self):
        out = [Prompt(self.drawn + i, f"q{self.drawn + i}", [1, 2], f"q{self.drawn + i}", "0") for i in range(2)]
        self.drawn += 2
        return out

    def state(self):
        return {"drawn": self.drawn}


@pytest.mark.parametrize("bound", [1, 2])
def test_admission_starts_batch_j_only_once_version_j_minus_bound_is_served(bound):
    served = {"version": 0}
    started: dict[int, int] = {}     # batch (its first prompt / 2) -> version served when it was sampled

    def generate(requests, n, seed):
        batch = requests[0][1] // 2
        started[batch] = served["version"]
        return [Rollout(row, g, [1, 2], [3], [-1.0], "x", "stop", served["version"], "0")
                for g, row, _, _ in requests for _ in range(n)]

    def score(rollouts):
        return [RewardResult(float(i % 2), 0.0, 0.0, False) for i in range(len(rollouts))]

    cfg = load_config(None, ["algo.group_size=2", "data.prompts_per_step=2", "learner.mini_batch_size=4",
                             "learner.micro_batch_size=1", f"trainer.max_staleness={bound}", "trainer.total_steps=6"])
    run = types.SimpleNamespace(cfg=cfg, prompts=FakeStream(),
                                groups=types.SimpleNamespace(generators=types.SimpleNamespace(generate=generate),
                                                             rewards=types.SimpleNamespace(score=score)))
    producer = Producer(run, start=0, version=0)
    producer.start()
    try:
        for step in range(6):
            made = producer.take(step)
            # batch `step` is trained at version `step`: every rollout within the bound
            assert all(step - r.weight_version <= bound for r in made.got.rollouts)
            # the producer runs ahead to batch step + bound (admitted by version step) and no further
            ahead = min(step + bound, 5)
            for _ in range(500):
                if ahead in started:
                    break
                threading.Event().wait(0.01)
            assert ahead in started and max(started) == ahead, (step, started)
            assert producer.position(step + 1) == {"drawn": 2 * (step + 1)}  # a resume takes batch step+1's prompts
            served["version"] = step + 1  # the push
            producer.advance(step + 1)
    finally:
        producer.stop()
    assert started == {j: max(0, j - bound) for j in range(6)}  # batch j sampled by version j - bound


def test_a_failing_producer_stops_the_loop_with_its_error():
    def generate(requests, n, seed):
        raise ValueError("engine exploded")

    cfg = load_config(None, ["algo.group_size=2", "data.prompts_per_step=2", "learner.mini_batch_size=4",
                             "learner.micro_batch_size=1", "trainer.max_staleness=1"])
    run = types.SimpleNamespace(cfg=cfg, prompts=FakeStream(),
                                groups=types.SimpleNamespace(generators=types.SimpleNamespace(generate=generate),
                                                             rewards=types.SimpleNamespace(score=None)))
    producer = Producer(run, start=0, version=0)
    producer.start()
    with pytest.raises(RuntimeError, match="producer failed before batch 0") as info:
        producer.take(0)
    assert "engine exploded" in str(info.value.__cause__)
    producer.stop()


def test_asynchronous_run_overlaps_generation_and_still_learns(ray_cluster, tmp_path):
    """configs/toy.yaml as in test_learning, with staleness 1: every step's rollouts within the bound,
    most of them one version behind (generation of the next batch ran during the update), corrected
    by importance weights, and the reward rises as in the synchronous run."""
    from rlsys.loops.train import train

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "toy.yaml",
                      [f"trainer.output_dir={tmp_path}", "trainer.total_steps=100", "trainer.progress=false",
                       "trainer.max_staleness=1"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    assert [r["weight_version"] for r in rows] == list(range(1, 101))
    assert all(r["staleness/0"] + r["staleness/1"] == pytest.approx(1.0) for r in rows)
    assert rows[0]["staleness/0"] == 1.0  # the first batch is sampled by the initial weights, trained at them
    assert statistics.fmean(r["staleness/1"] for r in rows[1:]) > 0.5, "generation did not overlap learning"
    # stale_frac is the stale rows' share of the response tokens (the toy's answers are 1 token each:
    # the rows' share), staleness/1 theirs of the rollouts, both from the same rows
    assert all(r["stale_frac"] == pytest.approx(r["staleness/1"], abs=1e-9) for r in rows)
    # every token of a fresh row weighs exactly 1 (algo.off_policy_rows=stale); a stale row's weight
    # min(rho, cap) lies in (0, cap]
    cap = off_policy_band(cfg.algo)[1]
    assert all(r["is_weight_mean"] == 1.0 for r in rows if r["staleness/1"] == 0)
    assert all(0 < r["is_weight_mean"] <= cap for r in rows)
    assert any(r["is_weight_mean"] != 1.0 for r in rows), "no stale token was ever reweighted"
    rewards = [r["reward/mean"] for r in rows]
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-10:])
    assert first < 0.2 and last > 0.8, f"reward {first:.3f} -> {last:.3f}: the asynchronous run did not learn"


def test_requeue_mode_runs_and_logs_the_chunks_sampled_again(ray_cluster, tmp_path):
    """trainer.in_flight=requeue end to end on the toy task: the loop marks the push, the pool sends
    chunks that were still sampling on the old weights again (how many depends on timing; the
    pool's own test pins the behaviour), every step logs the count, the bound still holds."""
    from rlsys.loops.train import train

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "toy.yaml",
                      [f"trainer.output_dir={tmp_path}", "trainer.total_steps=8", "trainer.progress=false",
                       "trainer.max_staleness=1", "trainer.in_flight=requeue"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    assert [r["weight_version"] for r in rows] == list(range(1, 9))
    # 16 prompts on 2 engines: 2 chunks a batch, and with staleness 1 one batch in flight at a push,
    # whose chunks are each sampled again at most once (the second time on the new weights)
    assert all(r["generate/requeued_chunks"] in (0.0, 1.0, 2.0) for r in rows), [r["generate/requeued_chunks"] for r in rows]
    assert all(r["rollouts/count"] == 16 * 16 for r in rows)  # nothing lost or doubled by a chunk sent again
    assert all(r["staleness/0"] + r["staleness/1"] == pytest.approx(1.0) for r in rows)


def test_shared_cores_names_the_nodes_where_generators_and_learners_share_cpus():
    from rlsys.loops.async_train import shared_cores

    def rec(role, node, ip, gpus=()):
        return {"role": role, "node_id": node, "ip": ip, "gpu_ids": list(gpus)}

    one_node = [rec("generator", "a", "10.0.0.1"), rec("learner", "a", "10.0.0.1"), rec("reward", "a", "10.0.0.1")]
    assert shared_cores(one_node) == ["10.0.0.1"]
    split = [rec("generator", "a", "10.0.0.1"), rec("generator", "b", "10.0.0.2"), rec("learner", "c", "10.0.0.3")]
    assert shared_cores(split) == []
    gpus = [rec("generator", "a", "10.0.0.1", ["0"]), rec("learner", "a", "10.0.0.1", ["1"])]
    assert shared_cores(gpus) == []  # one node, but each has a GPU of its own
