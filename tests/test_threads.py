"""How CPU engines get their OpenMP cores: disjoint slices of a node's cores per engine, one core
list per tensor-parallel worker, and nothing bound for an in-process engine."""

from __future__ import annotations

import doctest

import pytest

import rlsys.actors.generator as generator
from rlsys.actors.generator import cpu_thread_binding, engine_cores, engine_env
from rlsys.cluster.remote import threads
from rlsys.config import GeneratorConfig


def test_doctests():
    assert doctest.testmod(generator).failed == 0


@pytest.mark.parametrize("cores, engines, slices", [
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ([0, 1, 2, 3, 4, 5, 6], 3, [[0, 1, 2], [3, 4], [5, 6]]),
    ([5, 4, 7, 6], 2, [[4, 5], [6, 7]]),            # the order affinity came in does not matter
    ([0, 1], 2, [[0], [1]]),
    ([0, 1], 3, [[0], [1], [0]]),                   # fewer cores than engines: shared round-robin
])
def test_engines_on_one_node_get_disjoint_cores(cores, engines, slices):
    got = [engine_cores(cores, engines, i) for i in range(engines)]
    assert got == slices
    if len(cores) >= engines:
        flat = [c for s in got for c in s]
        assert sorted(flat) == sorted(cores) and len(set(flat)) == len(flat)
    with pytest.raises(ValueError):
        engine_cores(cores, engines, engines)


def test_tensor_parallel_engines_bind_their_own_slice():
    cfg = GeneratorConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5)
    cores = list(range(8))
    binds = [engine_env(cfg, local_index=i, local_engines=2, node_cores=cores)["VLLM_CPU_OMP_THREADS_BIND"]
             for i in range(2)]
    assert binds == ["0,1|2,3", "4,5|6,7"]
    # on 2 cores, two TP=2 engines: each worker one core, the two engines' workers on the same two cores
    assert [engine_env(cfg, i, 2, [0, 1])["VLLM_CPU_OMP_THREADS_BIND"] for i in range(2)] == ["0|0", "1|1"]
    # without its place on the node, the engine binds from its own affinity at start (Generator), as before
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(cfg)
    assert cpu_thread_binding([0, 1, 2, 3], 2) == "0,1|2,3"


def test_in_process_engine_binds_nothing():
    env = engine_env(GeneratorConfig(gpu_memory_utilization=0.5), local_index=1, local_engines=2, node_cores=[0, 1])
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_omp_threads_follow_the_actors_cpus():
    assert threads(1) == {"OMP_NUM_THREADS": "1"}
    assert threads(0.5) == {"OMP_NUM_THREADS": "1"}
    assert threads(4) == {"OMP_NUM_THREADS": "4"}
