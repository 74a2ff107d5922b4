"""Ray nodes on this machine for benchmarks: each a `ray start --block` in a session of its own.

The approach of tests/raynodes.py (benchmarks do not import from tests/): a head and worker nodes
with their own logical CPUs and custom resources, stopped by killing their process trees. Never
`ray stop`, which kills every Ray process on the machine (other sessions' clusters too). Every
node of one `LocalNodes` uses a Ray temp dir of its own: `ray start --head` writes its address
into <temp dir>/ray_current_cluster, which a plain ray.init() elsewhere would otherwise attach to.
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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """No Ray address or job variables from the caller (a driver must reach exactly this cluster);
    this interpreter's bin first on PATH (`ray`, `rlsys`); auth off (this machine only)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RLSYS_BASE_DIR")}
    return env | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"} | extra


class LocalNodes:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.gcs_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        # short (Unix socket paths have a ~107-byte limit) and ours alone
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = self.folder / f"{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={free_port()}", *args]
        with open(log, "w") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                                env=clean_env())
        self._wait(f"node {name}", lambda: "Ray runtime started" in log.read_text())

    def head(self) -> None:
        """A head with no CPUs: only the driver runs there, every actor on a worker node."""
        self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}", "--object-store-memory=200000000"])

    def worker(self, name: str, num_cpus: float, resources: dict | None = None) -> None:
        before = set(self.alive())
        self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus:g}", "--object-store-memory=200000000",
                           *([f"--resources={json.dumps(resources)}"] if resources else [])])
        new = self._wait(f"node {name} registered", lambda: set(self.alive()) - before)
        self.node_ids[name] = new.pop()

    def alive(self) -> dict[str, dict]:
        """node id -> total resources of every alive node (asked of the GCS by a short-lived driver)."""
        probe = ("import json, ray; ray.init(address='%s', log_to_driver=False); "
                 "print('NODES ' + json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
                 % self.address)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env=clean_env())
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NODES ")), None)
        if line is None:
            raise RuntimeError(f"could not list the nodes of {self.address}:\n{out.stderr[-2000:]}")
        return json.loads(line[len("NODES "):])

    def _wait(self, what: str, ready, timeout: float = 180.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` of {name} exited with {proc.returncode} while waiting for "
                                       f"{what}:\n"
                                       f"{(self.folder / f'{name}.log').read_text()[-3000:]}")
            got = ready()
            if got:
                return got
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout:.0f}s")

    def kill(self, name: str) -> None:
        """The node and everything under it (raylet, GCS, actor workers) at once."""
        proc = self.procs.pop(name)
        kill_tree(proc.pid)
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Workers first, then the head; safe to call twice and after a failed start."""
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            self.kill(name)
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
