"""The cluster edge on a real multi-node Ray cluster of nodes that share nothing
(rlsys/cluster/isolation.py through LocalNodes(isolated=True)): a head node with no CPUs (drivers
run there, as on a real cluster) and a worker node with 8 (every actor lands there), each with its
own address, /tmp, home and Ray temp dir. Two folders of the host are bound in: `shared`, on both
nodes (shared storage, for the tests that mean it), and `head_disk`, on the head only: storage the
driver (and whoever submits, from the host) has and the worker node does not, as on a real cluster
without shared storage. Runs there get their checkpoints only if they are sent.

What it proves: a run given cluster.address places every actor on the other node and still
writes complete checkpoints into the driver's run folder (streamed, or written by rank 0 with
cluster.shared_storage; shared storage that is not shared stops the run); a job submitted with
cluster/submit.sh (from the host's side of the cluster network) writes its run folder where it was
submitted from, and a plain `ray job submit` with a relative run folder is refused; a plain
`rlsys train` on the head, beside that cluster, starts its own; GPU placement works from the
cluster's resources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlsys.cluster.isolation import available
from rlsys.cluster.local import BIN, LocalNodes, clean_env
from rlsys.observe.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multinode
# every test with the cluster; the GPU placement test starts a cluster of its own and runs anywhere
needs_namespaces = pytest.mark.skipif(available() is not None, reason=str(available()))
TIMEOUT_S = 600  # any one command; a run here takes about a minute


def _tails(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (f"exit {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-n:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-n:]}")


# The tiny random model earns no reward in a step or two (zero advantages, zero gradient): weight
# decay moves every weight at every optimizer step, so a checkpoint shows whether it holds the
# learner's weights of that step.
DECAY = "learner.weight_decay=0.1"


@dataclass
class Cluster:
    nodes: LocalNodes
    shared: Path  # bound at the same path on the head and the worker (and seen by the host)
    head_disk: Path  # bound at the same path on the head only: the worker node sees it empty
    head_node_id: str
    worker_node_id: str

    @property
    def address(self) -> str:
        return self.nodes.address

    @property
    def dashboard(self) -> str:
        return self.nodes.dashboard

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-1500:]}"
                         for log in sorted(self.nodes.folder.glob("*.log")))

    def on_head(self, args: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        """args run on the head node (its network, files and cores), as a driver on a real cluster."""
        argv, pin = self.nodes.command("head", args, cwd=REPO)
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=self.nodes.node_env(), preexec_fn=pin)

    def on_host(self, args: list[str], cwd: Path = REPO, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        """args run on the host's side of the cluster network (its files, the nodes by address)."""
        return subprocess.run(self.nodes.host_command(args), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=clean_env())

    def session_dirs(self) -> list[Path]:
        """Ray's session folder on each node's own disk, as the host reads it."""
        out = []
        for name in ("head", "worker"):
            latest = self.nodes.view(name, "/tmp/ray/session_latest")
            out.append(self.nodes.view(name, os.readlink(latest)))  # the link names the node's own path
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    shared, head_disk = base / "shared", base / "head-disk"
    shared.mkdir()
    head_disk.mkdir()
    (head_disk / "seen").touch()
    nodes = LocalNodes(base / "nodes", isolated=True)
    try:
        nodes.head(shared={shared: shared, head_disk: head_disk})
        nodes.worker("worker", 8, shared={shared: shared})
        alive = nodes.alive()
        worker_id = nodes.node_ids["worker"]
        [head_id] = set(alive) - {worker_id}
        assert alive[head_id].get("CPU", 0) == 0, alive[head_id]
        assert alive[worker_id]["CPU"] == 8, alive[worker_id]
        # what each node sees of the two folders
        assert nodes.view("head", head_disk / "seen").exists()
        assert not nodes.view("worker", head_disk / "seen").exists()
        (shared / "probe").write_text("x")
        assert nodes.view("worker", shared / "probe").read_text() == "x"
        yield Cluster(nodes, shared, head_disk, head_id, worker_id)
    finally:
        nodes.stop()


def _rlsys_train(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    """`rlsys train` with a driver on the head node."""
    return cluster.on_head([str(BIN / "rlsys"), "train", "configs/tiny.yaml", "trainer.progress=false", DECAY, *args])


def _placement(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "placement.json").read_text())


def _assert_trained_checkpoint(ckpt: Path, initial: dict) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names, f"{ckpt}: {sorted(names)}"
    AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # a complete HF folder
    trained = load_file(ckpt / "model.safetensors")
    assert set(trained) == set(initial), f"{ckpt}: other tensors than the initial model's"
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), f"{ckpt} holds the untrained weights"
    return trained


@pytest.fixture(scope="module")
def initial_weights():
    from safetensors.torch import load_file

    from rlsys.config import load_config
    from rlsys.data.models import resolve_model

    return load_file(Path(resolve_model(load_config(REPO / "configs/tiny.yaml").model)) / "model.safetensors")


@needs_namespaces
def test_run_on_another_node_streams_checkpoints_to_the_driver(cluster, initial_weights):
    run_dir = cluster.head_disk / f"run-{uuid.uuid4().hex[:8]}"  # the worker node cannot see it
    try:
        proc = _rlsys_train(cluster, f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=2", "trainer.save_every=1")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        placement = _placement(run_dir)
        assert len(placement) == 6
        assert {p["node_id"] for p in placement} == {cluster.worker_node_id}, placement
        assert {p["ip"] for p in placement} == {cluster.nodes.iso.boxes["worker"].ip}, placement
        assert all(p["gpu_ids"] == [] for p in placement), placement
        ckpts = run_dir / "checkpoints"
        got = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
        assert got == ["latest", "step_1", "step_2"], f"{ckpts}: {got} (no .partial may be left)\n" + _tails(proc)
        first = _assert_trained_checkpoint(ckpts / "step_1", initial_weights)
        second = _assert_trained_checkpoint(ckpts / "step_2", initial_weights)
        assert any(not torch.equal(first[k], second[k]) for k in first), "step_2 holds step_1's weights"
        assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
        line = next((ln for ln in proc.stdout.splitlines() if "[rlsys] learner rank 0 runs on node" in ln), None)
        assert line and "checkpoints are sent to the driver" in line, _tails(proc)
        assert cluster.worker_node_id[:12] in line and f"the driver on {cluster.head_node_id[:12]}" in line, line
        # Every rank's learner state came with it, and a resume sends each rank the files it reads.
        assert (ckpts / "step_2" / "learner" / "state").is_dir() and (ckpts / "step_2" / "trainer_state.json").is_file()
        proc = _rlsys_train(cluster, f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=3", "trainer.save_every=1", "trainer.resume=auto")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        assert f"resuming from {ckpts / 'step_2'}: step 2" in proc.stdout, _tails(proc)
        assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
        third = _assert_trained_checkpoint(ckpts / "step_3", initial_weights)
        assert any(not torch.equal(second[k], third[k]) for k in second), "step_3 holds step_2's weights"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@needs_namespaces
def test_shared_storage_run_writes_checkpoints_from_rank_0(cluster, initial_weights):
    run_dir = cluster.shared / f"run-{uuid.uuid4().hex[:8]}"  # the head and the worker node both see it
    try:
        proc = _rlsys_train(cluster, f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=1", "cluster.shared_storage=true")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        assert {p["node_id"] for p in _placement(run_dir)} == {cluster.worker_node_id}
        assert "learner rank 0 runs on node" not in proc.stdout, _tails(proc)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_1"]
        _assert_trained_checkpoint(run_dir / "checkpoints" / "step_1", initial_weights)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@needs_namespaces
def test_shared_storage_that_is_not_shared_stops_the_run(cluster):
    """cluster.shared_storage=true, but the worker node does not see the run folder: rank 0's
    checkpoint lands on its own disk, and the run must not end as if it had been saved."""
    run_dir = cluster.head_disk / f"run-{uuid.uuid4().hex[:8]}"
    try:
        proc = _rlsys_train(cluster, f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=1", "cluster.shared_storage=true")
        assert proc.returncode != 0, _tails(proc)
        assert "the driver does not see it" in proc.stderr and "cluster.shared_storage=false" in proc.stderr, \
            _tails(proc)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _job_id(submit_output: str) -> str | None:
    for line in submit_output.splitlines():  # "Job 'raysubmit_...' submitted successfully"
        if "submitted successfully" in line and "'" in line:
            return line.split("'")[1]
    return None


def _job_logs(cluster: Cluster, job_id: str | None) -> str:
    if not job_id:
        return "(no job id)"
    proc = cluster.on_host([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, job_id], timeout=60)
    return f"--- ray job logs {job_id} (exit {proc.returncode}) ---\n{proc.stdout[-4000:]}{proc.stderr[-1000:]}"


def _in_ray_session(cluster: Cluster, name: str) -> list[Path]:
    """Run folders named `name` inside Ray's copies of job working dirs, on any node's disk (where
    they must not be)."""
    return [p for session in cluster.session_dirs()
            for p in session.glob(f"runtime_resources/working_dir_files/*/runs/{name}")]


@needs_namespaces
def test_submitted_job_writes_its_run_folder_where_it_was_submitted_from(cluster, initial_weights):
    """Submitted from the host's side, from a folder the head node shares with it (and the worker
    node does not): the driver writes the run there, the checkpoints come to it."""
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    cwd = cluster.head_disk / f"submitter-{name}"
    cwd.mkdir()
    proc = cluster.on_host([str(REPO / "cluster" / "submit.sh"), cluster.dashboard, "configs/tiny.yaml",
                            f"trainer.output_dir=runs/{name}", "trainer.total_steps=2", "trainer.progress=false",
                            DECAY], cwd=cwd)
    try:
        assert proc.returncode == 0, _tails(proc) + "\n" + _job_logs(cluster, _job_id(proc.stdout))
        run_dir = cwd / "runs" / name
        assert run_dir.is_dir(), f"no run folder at {run_dir}\n" + _tails(proc)
        assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_2"]
        _assert_trained_checkpoint(run_dir / "checkpoints" / "step_2", initial_weights)
        # The driver runs on the head node, every actor on the worker: checkpoints were streamed.
        assert {p["node_id"] for p in _placement(run_dir)} == {cluster.worker_node_id}
        assert "checkpoints are sent to the driver" in proc.stdout, _tails(proc)
        assert not _in_ray_session(cluster, name)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
        for stray in _in_ray_session(cluster, name):
            shutil.rmtree(stray, ignore_errors=True)


@needs_namespaces
def test_plain_job_with_a_relative_run_folder_is_refused(cluster):
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    job_id = f"rlsys-test-{uuid.uuid4().hex[:8]}"
    proc = cluster.on_host([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id",
                            job_id, "--working-dir", str(REPO), "--", "rlsys", "train", "configs/tiny.yaml",
                            f"trainer.output_dir=runs/{name}"])
    try:
        logs = _job_logs(cluster, job_id)
        assert proc.returncode != 0, _tails(proc) + "\n" + logs
        assert f"trainer.output_dir=runs/{name} is relative" in logs, logs
        assert "Ray's temporary copy of the job's working dir" in logs, logs
        assert "cluster/submit.sh" in logs, logs
        assert not _in_ray_session(cluster, name), "the refused job wrote a run folder"
    finally:
        for stray in _in_ray_session(cluster, name):
            shutil.rmtree(stray, ignore_errors=True)


@needs_namespaces
def test_plain_run_beside_a_ray_start_cluster_starts_its_own(cluster):
    """On the head node, where `ray start --head` left the cluster's address marker
    (/tmp/ray/ray_current_cluster, the head's own). Before init_ray used address="local",
    `ray.init(num_cpus=...)` found it and failed: "When connecting to an existing cluster, num_cpus
    and num_gpus must not be provided"."""
    assert cluster.address in cluster.nodes.view("head", "/tmp/ray/ray_current_cluster").read_text()
    run_dir = cluster.head_disk / f"run-{uuid.uuid4().hex[:8]}"
    try:
        proc = _rlsys_train(cluster, "trainer.total_steps=1", f"trainer.output_dir={run_dir}")
        assert proc.returncode == 0, _tails(proc)
        used = {p["node_id"] for p in _placement(run_dir)}
        assert used and not used & set(cluster.nodes.alive()), used
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


GPU_PROBE = textwrap.dedent("""
    import json
    import ray
    from rlsys.cluster.placement import resolve_backend
    from rlsys.cluster.remote import Placed

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Probe(Placed):
        pass

    with_gpu = [Probe.options(num_cpus=0, num_gpus=1).remote() for _ in range(2)]
    without = Probe.options(num_cpus=0, num_gpus=0).remote()
    print("RESULT " + json.dumps({
        "backend": resolve_backend("auto", ray.cluster_resources()),
        "gpu": [w["gpu_ids"] for w in ray.get([a.whereami.remote() for a in with_gpu])],
        "cpu": ray.get(without.whereami.remote())["gpu_ids"]}))
    ray.shutdown()
""")


def test_gpu_placement_from_the_clusters_resources_without_gpus():
    """A cluster that declares GPUs (none here): the backend is NCCL because the cluster has GPUs
    (not because the driver has CUDA), and each GPU actor reports the one GPU Ray gave it."""
    proc = subprocess.run([sys.executable, "-c", GPU_PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=clean_env())
    assert proc.returncode == 0, _tails(proc)
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["backend"] == "nccl"
    first, second = result["gpu"]
    assert len(first) == 1 and len(second) == 1 and {first[0], second[0]} == {"0", "1"}, result
    assert result["cpu"] == []
