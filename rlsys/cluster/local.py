"""A multi-node Ray cluster on one machine, for tests, benchmarks and trying placement: each node
a `ray start --block` in a session of its own.

With `isolated=True` (root) every node is a machine of its own as far as it can tell
(rlsys/cluster/isolation.py): its own address on a bridge, its own /tmp, home and cache, the
project read-only, its own cores, and only the folders given as `shared` in common with the host.
Commands then run ON a node (`command(name, args)`: a driver on the head, as on a real cluster)
or from the host's side of the cluster network (`host_command`: `rlsys submit`, `rlsys jobs`), and
faults act on nodes by name (`cut`, `heal`, `shape`, `kill`). Without isolation the nodes share
everything and listen on 127.0.0.1.

`LocalNodes` starts a head (no CPUs: only drivers run there; optionally with an autoscaler over
Ray's fake multi-node provider, whose worker nodes are raylets on this machine) and worker nodes
with their own logical CPUs and custom resources (`rollout`, `learner`), and stops them by
killing their process trees: never `ray stop`, which kills every Ray process on the machine
(other people's clusters too). Every node of one LocalNodes uses a Ray temp dir of its own.
cluster/start_local.sh does the same from the shell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from rlsys.cluster.isolation import Isolation

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def project_folders() -> list[Path]:
    """What a node image would hold: the project (source and .venv), and the Python the venv is
    made from when it lives elsewhere (a venv's python is a link to it)."""
    base = Path(sys.base_prefix).resolve()
    return [REPO] + ([] if base.is_relative_to(REPO) or base == Path("/usr") else [base])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """No Ray address or job variables from whoever ran pytest; the repo's .venv/bin first on PATH
    (job drivers and fake nodes run `rlsys`/`ray` from it); auth off (this machine only)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RLSYS_BASE_DIR")}
    return env | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"} | extra


def fake_autoscaling_config(gcs_port: int, node_types: dict, idle_timeout_minutes: float = 0.1) -> dict:
    """A cluster config for Ray's fake multi-node provider (what ray.cluster_utils.AutoscalingCluster
    writes, without its `ray stop --force`): a head with no resources and these worker node types."""
    return {
        "cluster_name": f"rlsys-test-{gcs_port}", "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **{name: {"node_config": {}, **t} for name, t in node_types.items()}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


class LocalNodes:
    def __init__(self, folder: Path, isolated: bool = False, env: dict[str, str] | None = None):
        """env: variables for every node and for the probes run on the head (alive, drain) over
        clean_env's: token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) or another PATH."""
        self.folder = Path(folder)  # the nodes' `ray start` logs
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.iso: Isolation | None = None
        if isolated:
            # Each node has its own ports and /tmp: Ray's defaults, as on a real cluster.
            self.iso = Isolation(self.folder, ro=project_folders())
            self.gcs_port, self.dashboard_port = 6379, 8265
            self.temp_dir = Path("/tmp/ray")
        else:
            self.gcs_port = free_port()
            self.dashboard_port = free_port()
            # A temp dir of its own: `ray start --head` writes its address into <temp dir>/ray_current_cluster,
            # and Ray's job supervisor connects every job driver to the cluster named there. Under the
            # shared /tmp/ray, two clusters on one machine (two test sessions) would swap job drivers.
            self.temp_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))

    @property
    def head_ip(self) -> str:
        return self.iso.boxes["head"].ip if self.iso else "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def command(self, name: str, args: list[str], cwd: str | Path | None = None) -> tuple[list[str], object]:
        """(argv, preexec_fn) that run args on node `name`: its network, files and cores. cwd: the
        working directory there (isolated, a process on a node starts in its / otherwise; give
        the same to Popen for the plain nodes, where it is the caller's)."""
        if self.iso is None:
            return args, None
        return self.iso.command(name, args, cwd=cwd), self.iso.preexec(name)

    def host_command(self, args: list[str]) -> list[str]:
        """args run on the host, reaching the nodes by their addresses (outside every node)."""
        return self.iso.host_command(args) if self.iso else args

    def node_env(self, **extra: str) -> dict[str, str]:
        """The environment for a command run on a node (with command()): clean_env, the nodes' env,
        extra. An isolated node gets no cache folder of the host's (RLSYS_CACHE: the test session's,
        read-only there): what it builds goes to its own home, as on a machine of its own."""
        env = clean_env(**(self.env | extra))
        if self.iso is not None:
            env.pop("RLSYS_CACHE", None)
        return env

    def view(self, name: str, path: str | Path) -> Path:
        """Where the host reads a file as node `name` sees it."""
        return self.iso.boxes[name].view(path) if self.iso else Path(path)

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None,
               cores: list[int] | None = None, shared: dict | None = None, disks: dict | None = None) -> None:
        log = self.folder / f"{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *args]
        if self.iso is not None:
            box = self.iso.add(name, cores=cores, shared=shared, disks=disks)
            cmd, pin = self.iso.command(name, [*cmd, f"--node-ip-address={box.ip}"]), self.iso.preexec(name)
        else:
            if shared or disks:
                raise ValueError(f"node {name}: shared folders and disks of its own need LocalNodes(isolated=True)")
            cmd.append(f"--dashboard-agent-listen-port={free_port()}")
            # Pinned: the node's raylet, and every worker process it starts, inherit this CPU affinity.
            pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
        node_env = self.node_env(**(env or {}))
        with open(log, "w") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                                env=node_env, preexec_fn=pin)
        self._wait(f"node {name}", lambda: "Ray runtime started" in log.read_text())

    def head(self, *args: str, autoscaling: dict | None = None, shared: dict | None = None) -> None:
        """A head with no CPUs and the dashboard (job API) on 127.0.0.1; autoscaling: worker node
        types for an autoscaler over Ray's fake multi-node provider ({name: {resources, min_workers,
        max_workers}})."""
        env = {}
        extra = []
        if autoscaling is not None and self.iso is not None:
            raise ValueError("Ray's fake autoscaler starts its nodes inside the head's process tree: not isolated")
        if autoscaling is not None:
            config = self.folder / "autoscaling.json"
            config.write_text(json.dumps(fake_autoscaling_config(self.gcs_port, autoscaling)))
            extra = [f"--autoscaling-config={config}"]
            # A node that left on its own (drained, then idle) is terminated by the autoscaler once
            # its heartbeats stop for AUTOSCALER_HEARTBEAT_TIMEOUT_S (30 s by default).
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}
        ports = [] if self.iso else [f"--ray-client-server-port={free_port()}"]
        self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                             f"--dashboard-host={'0.0.0.0' if self.iso else '127.0.0.1'}",
                             f"--dashboard-port={self.dashboard_port}", *ports,
                             "--object-store-memory=300000000", *extra, *args], env, shared=shared)
        # `Ray runtime started` can come before the dashboard's job API answers: a submission right
        # after would fail to connect instead of testing what it means to.
        self._wait("the head's job API", self._jobs_api_up)

    def _jobs_api_up(self) -> bool:
        """The dashboard's job API answers where clients reach it from (the host's side), with the
        nodes' token when authentication is on."""
        probe = ("import os, sys, urllib.request; token = os.environ.get('RAY_AUTH_TOKEN'); "
                 "urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/api/jobs/', headers="
                 "{'Authorization': 'Bearer ' + token} if token else {}), timeout=10)")
        done = subprocess.run(self.host_command([sys.executable, "-c", probe, self.dashboard]), capture_output=True,
                              timeout=60, env=clean_env(**self.env))
        return done.returncode == 0

    def worker(self, name: str, num_cpus: int, resources: dict | None = None, cores: list[int] | None = None,
               shared: dict | None = None, disks: dict | None = None) -> None:
        """cores: pin the node (raylet and workers) to these CPU cores, as if it were a machine of its own;
        shared {host folder: path on the node} and disks {path: MiB}: isolated nodes only."""
        before = set(self.alive())
        self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}", "--object-store-memory=300000000",
                           *([f"--resources={json.dumps(resources)}"] if resources else [])], cores=cores,
                    shared=shared, disks=disks)
        new = self._wait(f"node {name} registered", lambda: set(self.alive()) - before)
        self.node_ids[name] = new.pop()

    def alive(self) -> dict[str, dict]:
        """node id -> total resources of every alive node (asked of the GCS by a short-lived driver)."""
        probe = ("import json, ray; ray.init(address='%s', log_to_driver=False); "
                 "print('NODES ' + json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
                 % self.address)
        argv, pin = self.command("head", [sys.executable, "-c", probe])  # a driver runs on a node
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=clean_env(**self.env),
                             preexec_fn=pin)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NODES ")), None)
        if line is None:
            raise RuntimeError(f"could not list the nodes:\n{out.stderr[-2000:]}")
        return json.loads(line[len("NODES "):])

    def _wait(self, what: str, ready, timeout: float = 180.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of {name} exited with {proc.returncode} while waiting for {what}:\n"
                                       f"{(self.folder / f'{name}.log').read_text()[-3000:]}")
            got = ready()
            if got:
                return got
            time.sleep(1.0)
        raise TimeoutError(f"{what}: not within {timeout:.0f}s")

    def drain(self, node_id: str) -> None:
        """What a cloud's spot-preemption handler does: tell Ray the node goes in 10 minutes."""
        argv, pin = self.command("head", [
            str(BIN / "ray"), "drain-node", "--address", self.address, "--node-id", node_id, "--reason",
            "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption notice (test)",
            "--deadline-remaining-seconds", "600"])
        drained = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env(**self.env),
                                 preexec_fn=pin)
        if drained.returncode != 0:
            raise RuntimeError(f"ray drain-node {node_id} failed:\n{drained.stderr[-2000:]}")

    def kill(self, name: str) -> None:
        """The node goes at once, as a preempted machine does (its whole process tree; isolated: every
        process of the node, its files and its address with it)."""
        proc = self.procs.pop(name)
        if self.iso is not None:
            self.iso.kill(name)
        else:
            kill_tree(proc.pid)
        proc.wait(timeout=30)

    def cut(self, name: str) -> None:
        self._isolated("cut").cut(name)

    def heal(self, name: str) -> None:
        self._isolated("heal").heal(name)

    def block(self, name: str, other: str) -> None:
        self._isolated("block").block(name, other)

    def unblock(self, name: str) -> None:
        self._isolated("unblock").unblock(name)

    def shape(self, name: str, loss_pct: float = 0.0, rate_mbit: float | None = None) -> None:
        self._isolated("shape").shape(name, loss_pct=loss_pct, rate_mbit=rate_mbit)

    def delay(self, name: str, ms: float) -> None:
        self._isolated("delay").delay(name, ms)

    def _isolated(self, fault: str) -> Isolation:
        if self.iso is None:
            raise ValueError(f"{fault}: network faults need LocalNodes(isolated=True)")
        return self.iso

    def stop(self) -> None:
        """Workers first, then the head; safe to call twice and after a failed start."""
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            self.kill(name)
        if self.iso is not None:
            self.iso.close()  # namespaces, links and cgroups; every process of every node is gone
            return
        # anything that escaped the trees (forked between the snapshot and the kill, or reparented)
        # still names our temp dir on its command line; no other cluster's process does
        for pid in self.leftovers():
            kill_tree(pid)
        if self.leftovers():
            raise RuntimeError(f"Ray processes of {self.temp_dir} still alive after stop: {self.leftovers()}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # sockets and logs of processes now gone

    def leftovers(self) -> list[int]:
        mine = str(self.temp_dir)
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mine in arg for arg in p.info["cmdline"] or ()):
                    out.append(p.info["pid"])
            except psutil.Error:  # gone or not ours to read while we looked
                continue
        return out


class Background:
    """A command running beside the caller (a training run next to which a test drains a node or
    kills an actor), in a process group of its own, its output in a file: a pipe nobody reads
    while it runs fills up and blocks it. Killed with its children on leaving the `with` if it
    still runs.

        with Background([...], log, cwd) as run:
            run.wait_until("the first step", lambda: ..., timeout=400)
            ...
            code = run.wait(timeout=600)
        out = run.output()
    """

    def __init__(self, args: list[str], log: Path, cwd: Path, preexec_fn=None, env: dict[str, str] | None = None):
        """preexec_fn: from LocalNodes.command, for a command that runs on a node; env: its
        environment (LocalNodes.node_env for one on a node; clean_env() if not given)."""
        self.args, self.log, self.cwd, self.preexec_fn, self.env = args, Path(log), cwd, preexec_fn, env

    def __enter__(self) -> "Background":
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env or clean_env(),
                                     preexec_fn=self.preexec_fn)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
        finally:
            self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_until(self, what: str, ready, timeout: float) -> None:
        """Poll ready() while the command runs; it ending first, or the time running out, is an error."""
        deadline = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what}: the command exited with {self.proc.returncode} first:\n"
                                   f"{self.output()[-4000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f}s:\n{self.output()[-4000:]}")
            time.sleep(0.5)


def kill_tree(pid: int) -> None:
    """SIGKILL a process, all its descendants (Ray's workers run in process groups of their own)
    and its own process group; waits until they are gone."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(tree, timeout=60)


USAGE = """python -m rlsys.cluster.local [--isolated] [--pools] [--folder DIR]
A head (0 CPUs, dashboard) and one worker node of 8 logical CPUs, or with --pools a `rollout` and a
`learner` node of 8; --isolated (root): every node in namespaces of its own (isolation.py).
Runs until SIGTERM or Ctrl-C, then stops every node; cluster/start_local.sh runs it in the background."""


def serve(folder: Path, isolated: bool, pools: bool, out=sys.stdout) -> None:
    """Start the nodes, print how to reach them and write them to <folder>/cluster.json, then hold
    them until SIGTERM or SIGINT (the harness lives as long as this process: an isolated cluster's
    namespaces are taken down by it, or by the next harness's cleanup_stale once it is gone)."""
    def stop_on(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_on)
    nodes = LocalNodes(folder, isolated=isolated)
    try:
        nodes.head()
        if pools:
            nodes.worker("rollout", 8, {"rollout": 1})
            nodes.worker("learner", 8, {"learner": 1})
        else:
            nodes.worker("worker", 8)
        placement = " cluster.placement=disaggregated" if pools else ""
        driver = nodes.command("head", [], cwd=REPO)[0]  # where a driver runs: the head (as-is without isolation)
        host = nodes.host_command([])  # where `rlsys submit` runs: the host's side of the cluster network
        state = {"address": nodes.address, "dashboard": nodes.dashboard, "isolated": isolated, "pid": os.getpid(),
                 "on_head": driver, "on_host": host,
                 "nodes": {name: box.ip for name, box in nodes.iso.boxes.items()} if nodes.iso else {}}
        (nodes.folder / "cluster.json").write_text(json.dumps(state, indent=1))
        on_head, on_host = (" ".join(driver) + " " if driver else ""), (" ".join(host) + " " if host else "")
        print(f"cluster up (logs in {nodes.folder}): {on_head}{BIN / 'rlsys'} train configs/tiny.yaml "
              f"cluster.address={nodes.address}{placement}", file=out)
        print(f"       or: {on_host}{REPO / 'cluster' / 'submit.sh'} {nodes.dashboard} configs/tiny.yaml{placement}",
              file=out)
        print(f"       or: {on_host}{BIN / 'rlsys'} submit configs/tiny.yaml{placement} "
              f"trainer.output_dir=/tmp/runs/local --address {nodes.dashboard}", file=out)
        if nodes.iso:
            print(f"nodes: {', '.join(f'{n} {ip}' for n, ip in state['nodes'].items())}; the run folder of a "
                  f"submitted job is on the head's own disk: {nodes.view('head', '/tmp/runs/local')}", file=out)
        out.flush()
        while True:
            for name, proc in nodes.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"node {name} exited with {proc.returncode}: {nodes.folder / f'{name}.log'}")
            time.sleep(2.0)
    except KeyboardInterrupt:
        print("stopping the nodes", file=out, flush=True)
    finally:
        nodes.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlsys.cluster.local", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isolated", action="store_true", help="every node in namespaces of its own (root)")
    parser.add_argument("--pools", action="store_true", help="a rollout and a learner node instead of one worker")
    parser.add_argument("--folder", type=Path, default=REPO / ".cache" / "local-cluster" / "nodes",
                        help="the nodes' logs and cluster.json")
    args = parser.parse_args(argv)
    if args.isolated:
        from rlsys.cluster.isolation import available

        reason = available()
        if reason is not None:
            print(f"--isolated: {reason}", file=sys.stderr)
            return 2
    serve(args.folder, args.isolated, args.pools)
    return 0


if __name__ == "__main__":
    sys.exit(main())
