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
