"""An engine and a learner rank taking turns with one GPU: vLLM's sleep mode around the weight push
(generator.sleep_level) and the learner's state in host memory while the engines generate
(learner.offload_states); the order of the calls each side makes.

Only vLLM's CUDA builds have sleep mode and only a GPU rank has state to offload, so here the
engine's vLLM and the rank's DeepSpeed engine are stand-ins that record what they are asked: what
a GPU would show (the memory freed, the weights right after waking) is in tests/gpu/. The real
CPU path (an engine without sleep mode and a CPU rank, each saying so and going on) runs in
tests/test_sync.py's zero3-bf16-collective case."""

from __future__ import annotations

import sys
import types

import pytest

from rlsys.actors.generator import Generator, usable_sleep_level
from rlsys.actors.learner import Learner, resident
from rlsys.config import ConfigError, load_config, offload_states, sleep_level


class RecordingLLM:
    """Records the calls the Generator makes; collective_rpc answers like one worker."""

    def __init__(self):
        self.calls: list[tuple] = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        return True

    def collective_rpc(self, method, args=()):
        self.calls.append((method,))
        return [[1, 2, 3]]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate",))
        return []


@pytest.fixture(autouse=True)
def no_vllm(monkeypatch):
    """generate() imports SamplingParams: a stand-in, so that this process never imports vLLM (which
    fixes engine settings from the environment at import: tests/test_vllm_api.py)."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=lambda **kw: kw))


def engine(level: int) -> Generator:
    gen = Generator.__new__(Generator)  # without starting vLLM
    gen.llm, gen.sleep_level, gen.asleep, gen.version = RecordingLLM(), level, False, 0
    gen.cfg = load_config(None, []).generator
    return gen


@pytest.mark.parametrize("level", [1, 2])
def test_a_sleeping_engine_wakes_its_weights_receives_then_wakes_its_cache(level):
    gen = engine(level)
    assert gen.sleep() is True and gen.sleep() is True  # a second call while asleep does nothing
    assert gen.receive_weights([], version=1) == (1, [[1, 2, 3]])
    # level 2 dropped the weights: their memory comes back (empty) before the push fills it, and the
    # KV cache only after, so the push never competes with the cache for the GPU
    assert gen.llm.calls == [("sleep", level), ("wake_up", ["weights"]), ("rlsys_receive",), ("wake_up", ["kv_cache"]),
                             ("reset_prefix_cache",)]
    assert not gen.asleep and gen.version == 1
    gen.llm.calls.clear()
    gen.generate([], n=2)
    assert gen.llm.calls == [("generate",)]  # awake: nothing to wake


def test_an_engine_asleep_wakes_whole_before_it_generates():
    gen = engine(2)
    gen.sleep()
    gen.generate([], n=2)
    assert gen.llm.calls == [("sleep", 2), ("wake_up", None), ("generate",)]


def test_level_0_never_sleeps():
    gen = engine(0)
    assert gen.sleep() is False
    gen.receive_weights([], version=3)
    assert gen.llm.calls == [("rlsys_receive",), ("reset_prefix_cache",)]


def test_without_sleep_mode_the_engine_says_so_and_stays_awake(capsys):
    assert usable_sleep_level(2, available=False) == 0
    assert "generator.sleep_level=2: this vLLM build has no sleep mode" in capsys.readouterr().out
    assert usable_sleep_level(1, available=True) == 1


def test_the_sleep_level_follows_placement_and_device():
    def level(*overrides, gpu):
        return sleep_level(load_config(None, list(overrides)), gpu)

    assert level("cluster.placement=colocated", gpu=True) == 2  # an engine and a learner rank share each GPU
    assert level("cluster.placement=colocated", gpu=False) == 0  # CPU: nothing to give back
    assert level("cluster.placement=disaggregated", gpu=True) == 0  # the engine's GPUs are its own
    assert level("cluster.placement=colocated", "trainer.max_staleness=1", gpu=True) == 0  # asynchronous
    assert level("generator.sleep_level=1", gpu=False) == 1  # asked for: the engine says if it cannot
    with pytest.raises(ConfigError, match="generator.sleep_level=2 needs trainer.max_staleness=0"):
        load_config(None, ["generator.sleep_level=2", "trainer.max_staleness=1"])
    with pytest.raises(ConfigError, match="generator.sleep_level must be 0, 1, 2"):
        load_config(None, ["generator.sleep_level=3"])


class RecordingDeepSpeed:
    def __init__(self):
        self.calls: list[str] = []

    def offload_states(self):
        self.calls.append("offload_states")

    def reload_states(self):
        self.calls.append("reload_states")


def rank(backend: str) -> Learner:
    learner = Learner.__new__(Learner)  # without DeepSpeed
    learner.engine, learner.backend, learner.rank = RecordingDeepSpeed(), backend, 0
    learner.offloaded = learner.said_no_offload = False
    return learner


def test_an_offloaded_rank_brings_its_state_back_before_it_touches_it():
    learner, touched = rank("nccl"), []

    @resident
    def update(self):
        touched.append(list(self.engine.calls))

    learner.engine.offload_states = lambda include: learner.engine.calls.append(
        "offload_states" if sorted(include) == ["contiguous_grad_buffer", "hp_params", "lp_grads", "optim_states"]
        else f"offload_states{sorted(include)}")  # everything but the weights (lp_params)
    assert learner.offload() is True and learner.offload() is True  # once
    update(learner)
    update(learner)  # resident already: nothing to bring back
    assert touched == [["offload_states", "reload_states"]] * 2
    # every method the driver calls that reads or writes the offloaded state is guarded; the ones
    # that read the model's weights alone (which stay on the GPU) are not: the push runs offloaded
    guard = resident(lambda self: None).__code__
    for name in ("train", "train_profiled", "train_sft", "save", "load_state", "upload_part"):
        assert getattr(Learner, name).__code__ is guard, name
    for name in ("broadcast_weights", "share_weights", "broadcast_raw", "full_state_dict"):
        assert getattr(Learner, name).__code__ is not guard, name
    # save_files stays a plain generator function (Ray streams it); it saves through `save`
    import inspect
    assert inspect.isgeneratorfunction(Learner.save_files)


def test_a_cpu_rank_has_nothing_to_offload_and_says_so_once(capsys):
    learner = rank("gloo")
    assert learner.offload() is False and learner.offload() is False
    assert learner.engine.calls == []
    assert capsys.readouterr().out.count("this rank runs on CPUs, where its state is in host memory already") == 1


def test_offloading_follows_placement_device_and_stage():
    def on(*overrides, gpu):
        return offload_states(load_config(None, list(overrides)), gpu)

    assert on("cluster.placement=colocated", "learner.zero_stage=3", gpu=True) is True
    assert on("cluster.placement=colocated", "learner.zero_stage=3", gpu=False) is False
    assert on("cluster.placement=disaggregated", "learner.zero_stage=3", gpu=True) is False
    assert on("cluster.placement=colocated", "learner.zero_stage=3", "trainer.max_staleness=1", gpu=True) is False
    with pytest.raises(ConfigError, match="learner.offload_states=true needs learner.zero_stage >= 1"):
        load_config(None, ["learner.offload_states=true"])
