"""The Ray edge's pure decisions: which collective backend, when a verifier counts as broken."""

import pytest

from rlsys.cluster.placement import resolve_backend
from rlsys.cluster.rewards import check_verifier
from rlsys.types import RewardResult


def result(error=None) -> RewardResult:
    return RewardResult(reward=0.2, accuracy=0.0, format=1.0, timed_out=False, error=error)


def test_some_verifier_errors_are_scored_and_the_run_goes_on():
    results = [result("ValueError: odd text"), result(), result()]
    assert check_verifier(results) is results
    assert check_verifier([result("ValueError: one sample")]) == [result("ValueError: one sample")]


def test_a_verifier_that_fails_on_every_sample_stops_the_run():
    with pytest.raises(RuntimeError, match=r"failed on all 3 samples .*first: ImportError: no sympy"):
        check_verifier([result("ImportError: no sympy")] * 3)


def test_backend_follows_the_clusters_gpus_not_the_drivers():
    assert resolve_backend("auto", {"CPU": 2.0}) == "gloo"  # e.g. a CPU-only head, no GPU workers
    assert resolve_backend("auto", {"CPU": 64.0, "GPU": 8.0}) == "nccl"
    assert resolve_backend("gloo", {"GPU": 8.0}) == "gloo" and resolve_backend("nccl", {}) == "nccl"

