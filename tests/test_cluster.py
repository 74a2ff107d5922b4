"""The cluster edge on a real multi-node Ray cluster on this machine: a head node with no CPUs
(the driver attaches to it) and a worker node with 8 (every actor lands there), each a
`ray start --block` process in its own session.

What it proves: a run given cluster.address places every actor on the other node and still
writes complete checkpoints into the driver's run folder (streamed, or written by rank 0 with
cluster.shared_storage; shared storage that is not shared stops the run); a job submitted with
cluster/submit.sh writes its run folder where it was submitted from, and a plain `ray job submit`
with a relative run folder is refused; a plain `rlsys train` beside that cluster starts its own;
GPU placement works from the cluster's resources.

Where mount namespaces are allowed (root here), the worker node runs in one of its own with an
empty tmpfs over a "driver-only" folder: storage the driver has and the worker node does not, as
on a real cluster without shared storage. Runs there get their checkpoints only if they are sent.

The cluster is stopped by killing its process groups, never with `ray stop` (which stops every
Ray process on the machine: other test sessions' clusters too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from rlsys.observe.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the repo's .venv/bin: rlsys, ray
RAY_TMP = Path("/tmp/ray")  # Ray's default temp dir
MARKER = RAY_TMP / "ray_current_cluster"  # where `ray start` leaves the address a plain ray.init() connects to
pytestmark = pytest.mark.multinode
TIMEOUT_S = 600  # any one command; a run here takes about a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """What every process of these tests sees: no auth (local only), the repo's .venv/bin first on
    PATH (job drivers run `rlsys`), and no Ray address or job variables from whoever ran pytest."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RLSYS_BASE_DIR")}
    return env | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"} | extra


def _run(args: list[str], cwd: Path = REPO, timeout: float = TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _tails(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (f"exit {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-n:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-n:]}")


# The tiny random model earns no reward in a step or two (zero advantages, zero gradient): weight
# decay moves every weight at every optimizer step, so a checkpoint shows whether it holds the
# learner's weights of that step.
DECAY = "learner.weight_decay=0.1"


def _rlsys_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return _run([str(BIN / "rlsys"), "train", "configs/tiny.yaml", "trainer.progress=false", DECAY, *args], cwd=cwd)


def _tail_file(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    members: list[psutil.Process] = field(default_factory=list)  # its process tree, taken before the kill


@dataclass
class LocalCluster:
    gcs_port: int
    dashboard_port: int
    head: Node
    worker: Node
    driver_only: Path | None
    """A folder the worker node's processes see empty (None where mount namespaces are not allowed)."""
    previous_marker: str | None
    head_node_id: str = ""
    worker_node_id: str = ""
    session_dir: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} `ray start` output (tail) ---\n{_tail_file(n.log, 1500)}"
                         for n in (self.head, self.worker))

    def nodes(self) -> list[dict]:
        """The nodes the dashboard's state API lists (alive and dead)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100&detail=true", timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]


def _agent_port() -> list[str]:
    """Every node's dashboard agent listens on 52365 unless told otherwise: the second node on a
    machine (or any beside another cluster) would run without its agent's HTTP server, which
    serves job submission on the head."""
    return [f"--dashboard-agent-listen-port={_free_port()}"]


def _start_node(name: str, args: list[str], folder: Path, hide: Path | None = None) -> Node:
    """hide: a folder this node's processes see empty (a tmpfs over it in a mount namespace of
    their own): storage the driver has and this node does not."""
    log = folder / f"{name}.log"
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args]
    if hide is not None:  # sh execs ray: the pid, and so the process group, stays the one we kill
        cmd = [*UNSHARE, "sh", "-c", 'mount -t tmpfs rlsys-test "$0" && exec "$@"', str(hide), *cmd]
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    return Node(name, proc, log)


UNSHARE = ["unshare", "--mount", "--propagation", "private"]


def _can_hide(folder: Path) -> bool:
    """Mount namespaces (root, or a container that allows them): then the worker node can be
    kept from seeing the driver's run folders, as on a cluster without shared storage."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run([*UNSHARE, "sh", "-c", 'mount -t tmpfs rlsys-test "$0" && test ! -e "$0/seen"', str(folder)],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _wait(what: str, ready, cluster_or_nodes, timeout: float = 120.0):
    """Poll ready() until it returns something truthy; fail early if a `ray start` process died."""
    nodes = cluster_or_nodes if isinstance(cluster_or_nodes, list) else [cluster_or_nodes.head, cluster_or_nodes.worker]
    deadline = time.time() + timeout
    last_error = None
    while time.time() < deadline:
        for n in nodes:
            if n.proc.poll() is not None:
                raise RuntimeError(f"`ray start` of the {n.name} exited with {n.proc.returncode} while waiting for "
                                   f"{what}:\n{_tail_file(n.log)}")
        try:
            got = ready()
            if got:
                return got
        except OSError as e:  # the dashboard is not up yet
            last_error = e
        time.sleep(1.0)
    logs = "\n".join(f"--- {n.name} ---\n{_tail_file(n.log)}" for n in nodes)
    raise TimeoutError(f"{what} not ready within {timeout:.0f}s (last error: {last_error})\n{logs}")


def _members(node: Node) -> list[psutil.Process]:
    """The `ray start` process and everything it started: gcs, raylet, dashboard, and the
    workers and job drivers under the raylet (those run in process groups of their own)."""
    try:
        root = psutil.Process(node.proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _stray(cluster: LocalCluster) -> list[str]:
    """Processes of this cluster still alive: its nodes' process trees, and anything on this
    machine that names its session folder or runs for one of its nodes (RAY_NODE_ID)."""
    node_ids = {cluster.head_node_id, cluster.worker_node_id} - {""}
    ours = lambda p: (cluster.session_dir and cluster.session_dir in " ".join(p.info["cmdline"] or [])  # noqa: E731
                      or (p.info["environ"] or {}).get("RAY_NODE_ID") in node_ids)
    candidates = [*cluster.head.members, *cluster.worker.members,
                  *(p for p in psutil.process_iter(["cmdline", "environ"]) if ours(p))]
    out = {}
    for p in candidates:
        try:  # is_running() also tells a reused pid from the process that had it
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = f"{p.pid} {' '.join(p.cmdline())[:160] or p.name()}"
        except psutil.Error:  # gone meanwhile
            pass
    return list(out.values())


def _restore_marker(gcs_port: int, previous: str | None) -> None:
    """The marker names a dead cluster once ours is gone: put back the one it replaced, or none."""
    if MARKER.is_file() and MARKER.read_text().strip().endswith(f":{gcs_port}"):
        if previous is None:
            MARKER.unlink()
        else:
            MARKER.write_text(previous)


def _stop(cluster: LocalCluster) -> None:
    """SIGKILL each node's process group (raylet and gcs ignore SIGTERM), then wait until every
    process of the cluster is gone; the address marker goes back to what it was before."""
    for node in (cluster.worker, cluster.head):
        node.members = _members(node)
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.proc.wait(timeout=30)
    # Workers and job drivers have process groups of their own; they exit when their raylet dies.
    psutil.wait_procs(cluster.head.members + cluster.worker.members, timeout=60)
    deadline = time.time() + 60
    while (left := _stray(cluster)) and time.time() < deadline:
        time.sleep(1.0)
    _restore_marker(cluster.gcs_port, cluster.previous_marker)
    assert not left, "processes of the test cluster outlived its teardown:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-nodes")
    gcs, dash = _free_port(), _free_port()
    previous_marker = MARKER.read_text() if MARKER.is_file() else None
    head = _start_node("head", [
        "--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", *_agent_port(),
        "--object-store-memory=500000000"], folder)
    started = [head]
    c = None
    try:
        _wait("the head node", lambda: "Ray runtime started" in head.log.read_text(), [head])
        driver_only = tmp_path_factory.mktemp("driver-only")
        (driver_only / "seen").touch()
        hidden = _can_hide(driver_only)
        worker = _start_node("worker", [
            f"--address=127.0.0.1:{gcs}", "--num-cpus=8", *_agent_port(), "--object-store-memory=1000000000"], folder,
            hide=driver_only if hidden else None)
        started.append(worker)
        c = LocalCluster(gcs, dash, head, worker, driver_only if hidden else None, previous_marker)

        def two_nodes():
            alive = [n for n in c.nodes() if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        alive = _wait("both nodes in the state API", two_nodes, c)
        heads = [n for n in alive if n["is_head_node"]]
        workers = [n for n in alive if not n["is_head_node"]]
        assert len(heads) == 1 and len(workers) == 1, alive
        assert heads[0]["resources_total"].get("CPU", 0) == 0, heads[0]["resources_total"]
        assert workers[0]["resources_total"]["CPU"] == 8, workers[0]["resources_total"]
        c.head_node_id, c.worker_node_id = heads[0]["node_id"], workers[0]["node_id"]
        if hidden:  # the worker node's own view of the folder (its mount namespace, via /proc)
            worker_raylet = next(p for p in _members(worker) if p.name() == "raylet")
            assert not Path(f"/proc/{worker_raylet.pid}/root{driver_only}/seen").exists()
        # The session folder, from the head's raylet (its sockets live there).
        raylet = next(p for p in _members(head) if p.name() == "raylet")
        c.session_dir = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--session_dir="))
        assert Path(c.session_dir).parent == RAY_TMP, c.session_dir
        assert MARKER.is_file() and MARKER.read_text().strip().endswith(f":{gcs}"), \
            "the head should leave its address where a plain ray.init() finds it"
        _wait("the job API", lambda: urllib.request.urlopen(f"{c.dashboard}/api/jobs/", timeout=10).status == 200, c)
    except BaseException:
        for n in started:  # a half-started cluster must not outlive the test either
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _restore_marker(gcs, previous_marker)
        raise
    yield c
    _stop(c)


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


def _driver_only(cluster: LocalCluster, tmp_path: Path, name: str) -> Path:
    """A folder for a run whose checkpoints must come to the driver: one the worker node cannot
    see where the machine allows it (then rank 0 writing there itself would lose them)."""
    return (cluster.driver_only or tmp_path) / name


def test_run_on_another_node_streams_checkpoints_to_the_driver(cluster, tmp_path, initial_weights):
    run_dir = _driver_only(cluster, tmp_path, f"run-{uuid.uuid4().hex[:8]}")
    try:
        proc = _rlsys_train(f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=2", "trainer.save_every=1")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        placement = _placement(run_dir)
        assert len(placement) == 6
        assert {p["node_id"] for p in placement} == {cluster.worker_node_id}, placement
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
        proc = _rlsys_train(f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=3", "trainer.save_every=1", "trainer.resume=auto")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        assert f"resuming from {ckpts / 'step_2'}: step 2" in proc.stdout, _tails(proc)
        assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
        third = _assert_trained_checkpoint(ckpts / "step_3", initial_weights)
        assert any(not torch.equal(second[k], third[k]) for k in second), "step_3 holds step_2's weights"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_shared_storage_run_writes_checkpoints_from_rank_0(cluster, tmp_path, initial_weights):
    run_dir = tmp_path / "run"
    try:
        proc = _rlsys_train(f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
                            "trainer.total_steps=1", "cluster.shared_storage=true")
        assert proc.returncode == 0, _tails(proc) + "\n" + cluster.logs()
        assert {p["node_id"] for p in _placement(run_dir)} == {cluster.worker_node_id}
        assert "learner rank 0 runs on node" not in proc.stdout, _tails(proc)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_1"]
        _assert_trained_checkpoint(run_dir / "checkpoints" / "step_1", initial_weights)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_shared_storage_that_is_not_shared_stops_the_run(cluster):
    """cluster.shared_storage=true, but the worker node does not see the run folder: rank 0's
    checkpoint lands on its own disk, and the run must not end as if it had been saved."""
    if cluster.driver_only is None:
        pytest.skip("no mount namespaces here: the worker node sees every folder the driver sees")
    run_dir = cluster.driver_only / f"run-{uuid.uuid4().hex[:8]}"
    try:
        proc = _rlsys_train(f"cluster.address={cluster.address}", f"trainer.output_dir={run_dir}",
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


def _job_logs(cluster: LocalCluster, job_id: str | None) -> str:
    if not job_id:
        return "(no job id)"
    proc = _run([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, job_id], timeout=60)
    return f"--- ray job logs {job_id} (exit {proc.returncode}) ---\n{proc.stdout[-4000:]}{proc.stderr[-1000:]}"


def _in_ray_session(cluster: LocalCluster, name: str) -> list[Path]:
    """Run folders named `name` inside Ray's copies of job working dirs (where they must not be)."""
    return list(Path(cluster.session_dir).glob(f"runtime_resources/working_dir_files/*/runs/{name}"))


def test_submitted_job_writes_its_run_folder_where_it_was_submitted_from(cluster, tmp_path, initial_weights):
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    cwd = _driver_only(cluster, tmp_path, f"submitter-{name}")
    cwd.mkdir()
    proc = _run([str(REPO / "cluster" / "submit.sh"), cluster.dashboard, "configs/tiny.yaml",
                 f"trainer.output_dir=runs/{name}", "trainer.total_steps=2", "trainer.progress=false", DECAY], cwd=cwd)
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


def test_plain_job_with_a_relative_run_folder_is_refused(cluster):
    name = f"cluster-test-{uuid.uuid4().hex[:8]}"
    job_id = f"rlsys-test-{uuid.uuid4().hex[:8]}"
    proc = _run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
                 "--working-dir", str(REPO), "--", "rlsys", "train", "configs/tiny.yaml",
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


def test_plain_run_beside_a_ray_start_cluster_starts_its_own(cluster, tmp_path):
    """Before init_ray used address="local", `ray.init(num_cpus=...)` found the cluster's address
    marker and failed: "When connecting to an existing cluster, num_cpus and num_gpus must not be
    provided"."""
    run_dir = tmp_path / "run"
    try:
        proc = _rlsys_train("trainer.total_steps=1", f"trainer.output_dir={run_dir}")
        assert proc.returncode == 0, _tails(proc)
        used = {p["node_id"] for p in _placement(run_dir)}
        assert used and not used & {n["node_id"] for n in cluster.nodes()}, used
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


GPU_PROBE = textwrap.dedent("""
    import json
    import ray
    from rlsys.cluster.groups import Placed, resolve_backend

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
    proc = _run([sys.executable, "-c", GPU_PROBE], timeout=300)
    assert proc.returncode == 0, _tails(proc)
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["backend"] == "nccl"
    first, second = result["gpu"]
    assert len(first) == 1 and len(second) == 1 and {first[0], second[0]} == {"0", "1"}, result
    assert result["cpu"] == []
