"""The rollout pool's own logic: the autoscaling policy against hand-made step histories, and
chunks of an engine that dies mid-step going to the others (real Ray actors standing in for
vLLM engines, on the session's local cluster)."""

from __future__ import annotations

import json
import os
import time

import pytest

from rlsys.cluster.placement import MARKER, generator_bundle, layout, node_can_host
from rlsys.cluster.pool import Engine, GeneratorPool, StepLoad, chunk_size, decide
from rlsys.config import AutoscaleConfig, load_config
from rlsys.types import Rollout

CFG = AutoscaleConfig(enabled=True, min_generators=1, max_generators=3, grow_above=0.5, patience=2)


def busy(share: float) -> StepLoad:
    return StepLoad(share, idle=0)


def test_policy_grows_only_after_patience_steps_of_dominant_generation():
    assert decide([busy(0.8)], 1, 0, CFG, prompts=8) == 0  # one step is not a trend
    assert decide([busy(0.8), busy(0.8)], 1, 0, CFG, prompts=8) == +1
    assert decide([busy(0.8), busy(0.4)], 1, 0, CFG, prompts=8) == 0  # not above grow_above every step
    assert decide([busy(0.8), busy(0.8)], 1, 1, CFG, prompts=8) == 0  # an engine is still starting
    assert decide([busy(0.8), busy(0.8)], 3, 0, CFG, prompts=8) == 0  # at max_generators


def test_policy_never_grows_into_an_engine_that_would_get_no_prompts():
    # 2 prompts: chunk_size(2, 3) = 1 -> 2 chunks for 3 engines: the third would idle.
    assert chunk_size(2, 3) == 1
    assert decide([busy(0.9), busy(0.9)], 2, 0, CFG, prompts=2) == 0
    assert decide([busy(0.9), busy(0.9)], 1, 0, CFG, prompts=2) == +1  # 2 chunks for 2 engines


def test_policy_shrinks_an_idle_pool_but_not_below_min():
    idle = StepLoad(0.9, idle=1)
    assert decide([idle, idle], 3, 0, CFG, prompts=2) == -1
    assert decide([busy(0.9), idle], 3, 0, CFG, prompts=2) == 0  # idle in one step only
    one_idle = StepLoad(0.9, idle=1)
    assert decide([one_idle, one_idle], 1, 0, CFG, prompts=0) == 0  # min_generators


def test_role_bundles_follow_the_placement_mode():
    cfg = load_config("configs/tiny.yaml", ["cluster.placement=disaggregated", "generator.tensor_parallel_size=2",
                                            "learner.num_ranks=4", "cluster.learners_per_node=2",
                                            "learner.mini_batch_size=32"])
    lay = layout(cfg, gpu=True)
    learner_bundles, strategy = lay.groups["rlsys-learners"]
    assert strategy == "STRICT_SPREAD" and learner_bundles == [{"CPU": 2.0, "GPU": 2, "learner": MARKER}] * 2
    assert [(s.rank, s.bundle, s.num_gpus) for s in lay.of("learner")] == [(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]
    assert generator_bundle(cfg, gpu=True) == {"CPU": 1.0, "GPU": 2, "rollout": MARKER}
    assert [lay.groups[s.group] for s in lay.of("generator")] == [([generator_bundle(cfg, True)], "PACK")] * 2
    assert node_can_host({"CPU": 16, "GPU": 8, "rollout": 1}, generator_bundle(cfg, True))
    assert not node_can_host({"CPU": 16, "GPU": 8, "learner": 1}, generator_bundle(cfg, True))

    colo = layout(load_config("configs/tiny.yaml", ["cluster.placement=colocated"]), gpu=True)
    assert list(colo.groups) == ["rlsys-colocated"]
    assert colo.groups["rlsys-colocated"] == ([{"CPU": 2.0, "GPU": 1}] * 2, "PACK")
    # learner rank i and generator i share bundle i, half a GPU each
    assert sorted((s.bundle, s.role, s.num_gpus) for s in colo.slots) == [
        (0, "generator", 0.5), (0, "learner", 0.5), (1, "generator", 0.5), (1, "learner", 0.5)]

    plain = layout(load_config("configs/tiny.yaml"), gpu=False)
    assert all("rollout" not in b and "learner" not in b for bundles, _ in plain.groups.values() for b in bundles)


def test_bad_placement_configs_are_refused_with_the_keys_named():
    from rlsys.config import ConfigError

    with pytest.raises(ConfigError, match="generator.num_engines"):
        load_config("configs/tiny.yaml", ["cluster.placement=colocated", "generator.num_engines=3"])
    with pytest.raises(ConfigError, match="cluster.learners_per_node"):
        load_config("configs/tiny.yaml", ["cluster.learners_per_node=3"])
    with pytest.raises(ConfigError, match=r"autoscale: generator.num_engines=5"):
        load_config("configs/tiny.yaml", ["autoscale.enabled=true", "generator.num_engines=5"])


def fake_engine_class():
    """Defined in a function so that Ray ships the class by value (workers cannot import test modules)."""

    class FakeEngine:
        """Stands in for a vLLM engine: n rollouts per prompt, tagged with who made them; dies (the
        whole process, as when its node goes) on its `die_on`-th call."""

        def __init__(self, name: str, die_on: int = 0, delay: float = 0.0, versions: tuple[int, ...] = (3,)):
            """versions: the weight version of its 1st, 2nd, ... call (the last one from then on)."""
            self.name, self.die_on, self.delay, self.calls, self.versions = name, die_on, delay, 0, versions

        def generate(self, prompts, n, **sampling):
            self.calls += 1
            time.sleep(self.delay)
            if self.calls == self.die_on:
                os._exit(1)
            version = self.versions[min(self.calls, len(self.versions)) - 1]
            return [Rollout(prompt_index=row, group=group, prompt_ids=list(ids), response_ids=[1], response_logprobs=[0.0],
                            text=f"{self.name} call {self.calls}", finish_reason="stop", weight_version=version,
                            answer=answer)
                    for group, row, ids, answer in prompts for _ in range(n)]

        def receive(self) -> int:
            """Stands in for a weight receive: how many chunks this engine has been handed."""
            return self.calls

        def whereami(self):
            import ray

            return {"node_id": ray.get_runtime_context().get_node_id()}

    return FakeEngine


def test_an_engine_lost_mid_step_hands_its_chunk_to_another(ray_cluster):
    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    # steady is slower by far: doomed finishes its first chunk and takes a second (then dies) before
    # steady is done with its first, however loaded the machine (at 0.5 s steady once won on a Zen 1 in the suite)
    steady = Actor.options(max_restarts=0).remote("steady", delay=2.0)
    doomed = Actor.options(max_restarts=0).remote("doomed", die_on=2, delay=0.05)
    node = ray.get(steady.whereami.remote())
    pool = GeneratorPool([Engine(0, steady, None, 0.0, where=node), Engine(1, doomed, None, 0.0, where=node)],
                         chunks_per_engine=2)
    prompts = [(g, 100 + g, [5, 6, g], str(g)) for g in range(8)]  # chunk_size(8, 2, 2) = 2 -> 4 chunks
    rollouts = pool.generate(prompts, n=3)
    # every prompt exactly n times, in prompt order, all from this step's weights
    assert [(r.group, r.prompt_index) for r in rollouts] == [(g, 100 + g) for g in range(8) for _ in range(3)]
    assert {r.weight_version for r in rollouts} == {3}
    assert [e.index for e in pool.engines] == [0], "the lost engine leaves the pool"
    [lost] = pool.lost_this_step
    assert lost["engine"] == 1 and lost["chunk_requeued"] in range(4)
    events = pool.between_steps(1, 0.5, len(prompts), join=lambda new: pytest.fail("nothing should join"))
    assert [e["event"] for e in events["events"]] == ["lost"] and list(events["engines"]) == [0]
    ray.kill(steady)


@pytest.mark.parametrize("requeue", [False, True])
def test_a_chunk_sampled_on_the_old_weights_is_sampled_again_when_asked(ray_cluster, requeue):
    """trainer.in_flight: the engine's first call runs on version 3 (it was in flight when version
    4 was pushed), its later calls on 4. finish keeps that chunk as it is; requeue sends it again."""
    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    engine = Actor.options(max_restarts=0).remote("e", versions=(3, 4))
    pool = GeneratorPool([Engine(0, engine, None, 0.0, where=ray.get(engine.whereami.remote()))], chunks_per_engine=2)
    if requeue:
        pool.requeue_older_than(4)
    prompts = [(g, 100 + g, [5, 6, g], str(g)) for g in range(4)]  # 2 chunks of 2 prompts
    rollouts = pool.generate(prompts, n=2)
    assert [(r.group, r.prompt_index) for r in rollouts] == [(g, 100 + g) for g in range(4) for _ in range(2)]
    if requeue:  # chunk 0 (call 1, version 3) dropped, sent again first (call 2), then chunk 1 (call 3): version 4
        assert [r.weight_version for r in rollouts] == [4] * 8
        assert [r.text for r in rollouts] == ["e call 2"] * 4 + ["e call 3"] * 4
        assert pool.take_requeued() == 1 and pool.take_requeued() == 0
    else:
        assert [r.weight_version for r in rollouts] == [3] * 4 + [4] * 4
        assert pool.take_requeued() == 0
    ray.kill(engine)


def test_an_engine_without_prompts_is_given_back_and_the_autoscaler_told(ray_cluster):
    """3 engines, 2 prompts (2 chunks): one engine idles; with patience 1 the pool gives it back
    at the step boundary and asks the autoscaler for room for 2 engines only."""
    from ray.autoscaler._private.commands import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    actors = [Actor.remote(f"e{i}", delay=0.2) for i in range(3)]
    node = ray.get(actors[0].whereami.remote())
    cfg = AutoscaleConfig(enabled=True, min_generators=1, max_generators=3, grow_above=0.5, patience=1)
    pool = GeneratorPool([Engine(i, a, None, 0.0, where=node) for i, a in enumerate(actors)], autoscale=cfg,
                         bundle={"CPU": 1.0, "rollout": MARKER})
    prompts = [(g, g, [1, 2], "0") for g in range(2)]
    assert len(pool.generate(prompts, n=2)) == 4
    [idle] = [i for i, (chunks, _) in pool.last_load.items() if chunks == 0]
    state = pool.between_steps(0, 0.9, len(prompts), join=lambda new: pytest.fail("nothing should join"))
    assert [(e["event"], e["engine"]) for e in state["events"]] == [("shrink", idle)]
    assert sorted(state["engines"]) == sorted({0, 1, 2} - {idle})
    # what the (v1) autoscaler reads: one resource dict per bundle
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == [{"CPU": 1.0, "rollout": MARKER}] * 2
    pool.shutdown()
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []


def test_more_losses_than_max_actor_restarts_stop_the_run(ray_cluster):
    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    steady, doomed = Actor.remote("steady", delay=0.3), Actor.options(max_restarts=0).remote("doomed", die_on=1)
    node = ray.get(steady.whereami.remote())
    pool = GeneratorPool([Engine(0, steady, None, 0.0, where=node), Engine(1, doomed, None, 0.0, where=node)],
                         max_restarts=0)
    assert len(pool.generate([(g, g, [1], "0") for g in range(4)], n=1)) == 4  # the lost chunk went to "steady"
    with pytest.raises(RuntimeError, match=r"lost 1 times in this run, more than cluster.max_actor_restarts=0"):
        pool.between_steps(1, 0.5, 4, join=lambda new: None)
    pool.shutdown()


def test_an_engine_found_dead_by_two_threads_leaves_once(ray_cluster):
    """The asynchronous loop's producer (generate) and its main thread (drop_dead before a push)
    can both find one engine dead: it leaves the pool once, recorded once, and neither thread fails."""
    from concurrent.futures import ThreadPoolExecutor

    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    alive, dead = Actor.options(max_restarts=0).remote("alive"), Actor.options(max_restarts=0).remote("dead")
    node = ray.get(alive.whereami.remote())
    pool = GeneratorPool([Engine(0, alive, None, 0.0, where=node), Engine(1, dead, None, 0.0, where=node)])
    ray.kill(dead)
    with ThreadPoolExecutor(4) as threads:
        list(threads.map(lambda _: pool.drop_dead(), range(4)))  # re-raises what any thread raised
    assert [e.index for e in pool.engines] == [0]
    assert [lost["engine"] for lost in pool.lost_this_step] == [1]
    ray.kill(alive)


def test_a_push_first_lets_the_chunks_in_flight_finish_and_hands_out_none_until_it_is_done(ray_cluster):
    """The asynchronous loop's push, phase one (GeneratorPool.paused): while the producer thread
    generates, the pool hands out no chunk and waits for the ones in flight; phase two (inside)
    finds the engine free, so its receive runs at once instead of queueing behind a chunk with
    the learners' broadcast already posted. Generation goes on after, every prompt once."""
    import threading

    ray = ray_cluster
    Actor = ray.remote(num_cpus=0)(fake_engine_class())
    engine = Actor.options(max_restarts=0).remote("e", delay=0.4)
    pool = GeneratorPool([Engine(0, engine, None, 0.0, where=ray.get(engine.whereami.remote()))], chunks_per_engine=4)
    prompts = [(g, g, [1, 2], "0") for g in range(8)]  # 4 chunks of 2, one engine: 4 calls in a row
    out: list = []
    producer = threading.Thread(target=lambda: out.extend(pool.generate(prompts, n=1)))
    producer.start()
    time.sleep(0.6)  # the producer is in its chunks
    with pool.paused():
        assert pool.in_flight == 0  # the chunk in flight came back before the push's second phase
        handed = ray.get(engine.receive.remote(), timeout=5)  # the engine takes the "receive" at once
        time.sleep(1.0)  # longer than two chunks: none may start while the push runs
        assert ray.get(engine.receive.remote()) == handed
        assert producer.is_alive()
    producer.join(timeout=30)
    assert not producer.is_alive() and 1 <= handed < 4
    assert sorted(r.prompt_index for r in out) == list(range(8))
    assert ray.get(engine.receive.remote()) == 4  # the remaining chunks went after the push
    ray.kill(engine)
