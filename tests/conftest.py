"""One local Ray cluster for the whole test session (starting one costs seconds)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RLSYS_CACHE", str(REPO / ".cache" / "rlsys"))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": a new cluster even when one started with `ray start` runs on this machine
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_report_header(config):
    # The default selection leaves the multi-node tier out (pyproject.toml's addopts): say so at the top.
    if config.option.markexpr == "not multinode":
        return "tier: core (tests marked multinode left out; `-m multinode` runs them, docs/tests.md)"
    return f"tier: -m {config.option.markexpr!r}" if config.option.markexpr else "tier: every test"
