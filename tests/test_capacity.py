"""A local run that cannot fit this machine's memory stops before any actor starts, with the numbers."""

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.cluster import capacity
from rlsys.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_estimate_by_hand():
    assert doctest.testmod(capacity).failed == 0
    cfg = load_config("configs/tiny.yaml", ["model.dtype=bfloat16", "learner.zero_stage=1", "algo.beta=0"])
    need = capacity.memory_need(cfg, 10**9)
    gib = capacity.GIB
    # bf16 weights (2 GB); per rank: 0.7 + weights and gradients 4 GB + (Adam 8 GB + fp32 master 4 GB) / 2 ranks
    assert need["learners"] == pytest.approx(2 * (0.7 * gib + 4e9 + 12e9 / 2))
    assert need["generators"] == pytest.approx(2 * (0.9 * gib + 1 * gib + 2e9))


def test_check_names_the_keys_and_the_numbers():
    cfg = load_config("configs/tiny.yaml", ["generator.num_engines=64"])
    with pytest.raises(ConfigError, match=r"generator.num_engines=64 .* 24.0 GiB is available"):
        capacity.check_fits(cfg, 10**6, 24 * capacity.GIB)
    capacity.check_fits(load_config("configs/tiny.yaml"), 10**6, 24 * capacity.GIB)  # the tiny run fits


def test_too_many_engines_for_this_machine_stop_before_any_actor(tmp_path):
    """As a new user tried: 64 engines on a small machine used to start engines and thrash."""
    proc = subprocess.run([str(Path(sys.executable).with_name("rlsys")), "train", "configs/tiny.yaml",
                           "generator.num_engines=64", f"trainer.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "generator.num_engines=64" in proc.stderr and "GiB is available" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "nothing may be written before the run is known to fit"
