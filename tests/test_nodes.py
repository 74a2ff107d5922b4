"""rlsys on nodes that share nothing (rlsys/cluster/isolation.py): a head, a rollout node and a
learner node, each with its own address, disk, home and cores. Jobs are submitted from the host's
side of the cluster network, as from a laptop; nothing is shared unless a test mounts it.

What it proves: a submitted job whose model rlsys builds (tiny) runs to the end with no shared
storage: every node builds the model itself and checks it against the driver's digest; the
metrics and the checkpoints reach the run folder on the driver's node (the head).

Run alone with `pytest -m multinode tests/test_nodes.py`; skipped where namespaces are not allowed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, LocalNodes, clean_env
from rlsys.observe.metrics import read_jsonl

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(available() is not None, reason=str(available()))]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    nodes = LocalNodes(tmp_path_factory.mktemp("nodes"), isolated=True)
    try:
        nodes.head()
        nodes.worker("rollout", 4, {"rollout": 1}, cores=[0])  # logical CPUs: two 2-CPU engines on one core
        nodes.worker("learner", 4, {"learner": 1}, cores=[1])  # 2 learner ranks and the reward workers
        yield nodes
    finally:
        nodes.stop()


def host(nodes: LocalNodes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command on the host's side of the cluster network."""
    return subprocess.run(nodes.host_command([str(BIN / "rlsys"), *args]), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def follow(nodes: LocalNodes, job: str, timeout: float = 360) -> str:
    deadline, state = time.time() + timeout, ""
    while time.time() < deadline:
        status = host(nodes, "jobs", "status", job, "--address", nodes.dashboard)
        assert status.returncode == 0, status.stderr
        state = status.stdout.split()[0]
        if state not in ("PENDING", "RUNNING"):
            return state
        time.sleep(3)
    logs = host(nodes, "jobs", "logs", job, "--address", nodes.dashboard).stdout
    raise TimeoutError(f"job {job} still {state} after {timeout:.0f}s:\n{logs[-6000:]}")


def test_a_job_without_shared_storage_builds_the_model_on_every_node(nodes):
    run_dir = "/tmp/runs/tiny"  # on the head's own disk: the job's driver runs there
    submitted = host(nodes, "submit", "configs/tiny.yaml", "trainer.progress=false", "trainer.total_steps=2",
                     "generator.num_cpus=2", "cluster.placement=disaggregated", f"trainer.output_dir={run_dir}",
                     *[f"deadlines.{phase}_s=150" for phase in ("start", "generate", "score", "train", "sync", "save")],
                     "--address", nodes.dashboard)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    state = follow(nodes, job)
    logs = host(nodes, "jobs", "logs", job, "--address", nodes.dashboard).stdout
    assert state == "SUCCEEDED", logs[-5000:]
    run = nodes.view("head", run_dir)
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1]
    assert (run / "checkpoints" / "step_2" / "config.json").is_file()
    roles = {a["role"]: a["ip"] for a in json.loads((run / "placement.json").read_text())}
    ip = {name: box.ip for name, box in nodes.iso.boxes.items()}
    assert roles["generator"] == ip["rollout"] and roles["learner"] == ip["learner"], roles
    # each actor's node built its own copy (its own home's cache), the driver's digest checked on it
    for node in ("rollout", "learner"):
        built = list(nodes.view(node, Path.home() / ".cache" / "rlsys").glob("tiny-*/model.safetensors"))
        assert len(built) == 1, (node, built)
    assert not Path(run_dir).exists(), "the host should not see the head's disk"
