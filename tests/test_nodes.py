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


def doctor(nodes: LocalNodes, *args: str) -> subprocess.CompletedProcess:
    """`rlsys doctor` where a user runs it: on the head, a driver of the cluster."""
    argv, pin = nodes.command("head", [str(BIN / "rlsys"), "doctor", "configs/tiny.yaml", *args,
                                       "--address", nodes.address, "--timeout", "90"], cwd=REPO)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=nodes.node_env(),
                          preexec_fn=pin)


def test_doctor_passes_a_sound_cluster_and_names_a_missing_resource_and_a_blocked_link_with_their_fixes(nodes):
    ip = {name: box.ip for name, box in nodes.iso.boxes.items()}
    sound = ["generator.num_cpus=2", "cluster.placement=disaggregated"]
    ok = doctor(nodes, *sound)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = {name: next(ln for ln in ok.stdout.splitlines() if f"({ip[name]})" in ln) for name in ip}
    for name, row in rows.items():  # every node answered and reached the two others
        assert row.startswith(f"{name} ({ip[name]})") and row.endswith(" 2/2"), row
    assert "rollout=1" in rows["rollout"] and "learner=1" in rows["learner"]
    assert re.search(r"rlsys-learners: .*'learner': 0\.001.* -> 1 node\(s\) can hold one", ok.stdout), ok.stdout
    assert "no problems found" in ok.stdout

    # The learner pool's nodes lack the resource the config names, and the rollout node cannot open
    # a connection to the learner node (the learner node can still open one to it).
    nodes.block("rollout", "learner")
    try:
        bad = doctor(nodes, *sound, "cluster.learner_resource=trainer")
    finally:
        nodes.unblock("rollout")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    problems = bad.stdout[bad.stdout.index("problem(s):"):]
    assert "2 problem(s)" in bad.stdout, problems
    assert re.search(r"rlsys-learners asks for .*'trainer': 0\.001.* no node can hold it: no alive node declares "
                     r"trainer\n +fix: start the nodes for the learners with `ray start --resources='\{\"trainer\": 1\}'`",
                     problems), problems
    assert re.search(rf"node rollout \({ip['rollout']}\) cannot reach node learner \({ip['learner']}\) on a fresh "
                     rf"port \({ip['learner']}:\d+: .*\)\n +fix: open TCP between the cluster's nodes", problems), problems
    rows = {name: next(ln for ln in bad.stdout.splitlines() if f"({ip[name]})" in ln) for name in ip}
    assert rows["rollout"].endswith(" 1/2") and rows["learner"].endswith(" 2/2") and rows["head"].endswith(" 2/2")
