"""vLLM's sleep mode around the weight push (generator.sleep_level): the order of the engine's calls.

Only vLLM's CUDA builds have sleep mode, so here the engine's vLLM is a stand-in that records
what the Generator asks of it: what a GPU would show (the memory freed while the learner trains,
the weights right after waking) is in tests/gpu/. The real CPU path (an engine without sleep mode
that says so and stays awake) runs in tests/test_sync.py's zero3-bf16-collective case."""

from __future__ import annotations

import sys
import types

import pytest

from rlsys.actors.generator import Generator, usable_sleep_level
from rlsys.config import ConfigError, load_config, sleep_level


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
