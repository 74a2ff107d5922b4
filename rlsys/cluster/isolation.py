"""Nodes that share nothing, on one machine: what makes a LocalNodes node behave like a machine of
its own, and the faults a real cluster has.

Each node gets (root only; `available()` says why not elsewhere):
- a network namespace with one veth link to a bridge that lives in a switch namespace of the
  cluster's own, and an address 10.213.<k>.<n> on it. Nothing reaches a node through 127.0.0.1:
  its loopback is its own. The host reaches the nodes from a client namespace (`host`) on the same
  bridge, as a laptop on the cluster's network would. Only these addresses and loopback are used.
- a mount namespace: an empty /tmp, /var/tmp, /dev/shm and home folder (tmpfs: what a node writes
  there no other node sees), the rest of the root read-only as a node image would be, the project
  folder (and its .venv) read-only, and only the folders the harness binds in shared with the host
  (as an NFS mount would be). A `disk` is a size-limited tmpfs, for a disk that fills up.
- a UTS namespace (hostname = the node's name) and a cpuset cgroup: the node's own cores, and the
  list of every process the node runs, so that losing a node kills exactly its processes.

Faults: `cut`/`heal` a node's link (silent: its frames no longer cross the bridge, as in a
partition, not a link-down the kernel would report), `shape` (loss by nftables, rate by tc tbf, both
directions), `delay` (everything the node sends held a fixed time: a relay process, delay.py, since
kernels without tc netem, this one's among them, are common in VMs), `kill` (every process of the
node at once), and a `disk` to fill.

The namespaces are named rl<k>-<node>; `cleanup_stale()` removes those of a harness that died.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/cpuset")
SUBNET = "10.213"  # 10.213.<k>.0/24, one per cluster; only inside namespaces this module makes
NETNS = Path("/run/netns")
OWNERS = Path("/run/rlsys-nodes")  # rl<k>: the pid of the harness that made the namespaces rl<k>-*


def available() -> str | None:
    """None when nodes can be isolated here, else the reason (for a skip)."""
    if os.geteuid() != 0:
        return "isolated nodes need root (network and mount namespaces, a cpuset cgroup)"
    for tool in ("ip", "tc", "nft", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"isolated nodes need `{tool}` (iproute2, nftables, util-linux: ./dev.sh setup installs them as root)"
    if not (CGROUP / "cpuset.cpus").is_file():
        return f"isolated nodes need the cpuset cgroup (v1) at {CGROUP}"
    probe = subprocess.run(["unshare", "--mount", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"namespaces are not allowed here: {probe.stderr.strip()}"
    return None


def _tool(name: str) -> str:
    """A tool's full path as the harness finds it: the argv of command()/host_command() then runs
    whatever PATH the caller gives the process (a node may be started with a PATH of its own)."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"isolated nodes need `{name}` on PATH (./dev.sh setup installs it as root)")
    return found


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _netns_names() -> set[str]:
    return {p.name for p in NETNS.iterdir()} if NETNS.is_dir() else set()


def _owner_alive(prefix: str) -> bool:
    """Whether the harness that made the namespaces rl<k>-* is still running (its pid, recorded in
    OWNERS/<prefix> when it made them, names a live process)."""
    try:
        pid = int((OWNERS / prefix).read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cleanup_stale() -> list[str]:
    """Namespaces and cgroups of clusters whose harness is gone (killed before its close()). A
    live harness's namespaces are left alone, even the ones no process runs in (its switch and
    host namespaces), whoever runs it."""
    removed = []
    for name in sorted(_netns_names()):
        prefix = name.split("-", 1)[0]
        if prefix.startswith("rl") and prefix[2:].isdigit() and not _owner_alive(prefix):
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    root = CGROUP / "rlsys"
    if root.is_dir():
        for cluster in sorted(root.glob("rl*")):
            if _owner_alive(cluster.name):
                continue
            for group in [*sorted(cluster.glob("*/")), cluster]:  # the nodes' groups, then the cluster's
                if not (group / "cgroup.procs").read_text().split():
                    try:
                        group.rmdir()
                    except OSError:  # a node group still there; removed on the next pass
                        continue
    for owner in sorted(OWNERS.glob("rl*")) if OWNERS.is_dir() else []:
        if not _owner_alive(owner.name):
            owner.unlink()
    return removed


@dataclass
class Box:
    """One node's namespaces: the named network namespace, the holder process that keeps its mount
    and UTS namespaces alive (every command of the node enters those), and its cgroup."""
    name: str
    netns: str
    ip: str
    veth_switch: str  # the link's end in the switch namespace (faults act on both ends)
    cgroup: Path
    holder: subprocess.Popen | None = None
    relay: subprocess.Popen | None = None  # delay.py, between veth_switch and the bridge, while delayed

    @property
    def tap(self) -> str:
        """The delay relay's TAP device in the switch namespace: r<k>s<n> -> r<k>d<n>."""
        return self.veth_switch.replace("s", "d", 1)

    @property
    def port(self) -> str:
        """What is on the bridge for this node: its link's end, or the relay's TAP device."""
        return self.tap if self.relay is not None else self.veth_switch

    def pids(self) -> list[int]:
        if not self.cgroup.is_dir():
            return []
        return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]

    def view(self, path: str | Path) -> Path:
        """The host's view of a path as this node sees it (its mount namespace, through /proc)."""
        assert self.holder is not None and self.holder.poll() is None, f"node {self.name} is not running"
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).relative_to("/")


# Inside the holder, in its fresh mount namespace: stage the host folders to bind back, cover
# what a node owns with empty tmpfs, bind the staged folders at their paths, root read-only.
SETUP = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs rlsys-stage /mnt
i=0
for spec in $BINDS; do
  src=${spec%%=*}; i=$((i+1)); mkdir -p /mnt/b$i; mount --bind "$src" /mnt/b$i
done
for dir in /tmp /var/tmp /dev/shm "$HOME"; do mount -t tmpfs -o mode=1777 rlsys-node "$dir"; done
i=0
for spec in $BINDS; do
  rest=${spec#*=}; dst=${rest%%=*}; mode=${rest#*=}; i=$((i+1))
  mkdir -p "$dst"; mount --move /mnt/b$i "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
for spec in $DISKS; do
  dst=${spec%%=*}; mb=${spec#*=}; mkdir -p "$dst"; mount -t tmpfs -o size=${mb}m rlsys-disk "$dst"
done
umount /mnt
mount -o remount,bind,ro /
hostname "$NODE"
echo ready
exec sleep infinity
"""


class Isolation:
    """The network and the boxes of one cluster. `ro`: host folders every node sees read-only, at
    the same path (the node image); `add(..., shared=..., disks=...)`: a node's own."""

    def __init__(self, folder: Path, ro: list[Path]):
        reason = available()
        if reason:
            raise RuntimeError(reason)
        cleanup_stale()
        self.folder = Path(folder)
        taken = {n[2:n.index("-")] for n in _netns_names() if n.startswith("rl") and "-" in n}
        self.k = next(k for k in range(1, 250) if str(k) not in taken)
        self.prefix = f"rl{self.k}"
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.prefix).write_text(str(os.getpid()))  # cleanup_stale leaves ours alone while we live
        self.ro = [Path(p).resolve() for p in ro]
        self.boxes: dict[str, Box] = {}
        self.cgroup = CGROUP / "rlsys" / self.prefix
        self.switch = f"{self.prefix}-switch"
        for parent in (self.cgroup.parent, self.cgroup):
            parent.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):  # a child cpuset starts empty: copy the parent's
                if not (parent / knob).read_text().strip():
                    (parent / knob).write_text((parent.parent / knob).read_text())
        sh("ip", "netns", "add", self.switch)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        sh("ip", "link", "set", "br0", "up", ns=self.switch)
        sh("ip", "link", "set", "lo", "up", ns=self.switch)
        self.n = 1
        self.host = self._netns("host")  # where the host reaches the cluster from (rlsys submit)

    def _netns(self, name: str) -> tuple[str, str, str]:
        """A network namespace on the bridge: (namespace, address, switch-side link)."""
        ns, ip = f"{self.prefix}-{name}", f"{SUBNET}.{self.k}.{self.n}"
        node_end, switch_end = f"r{self.k}n{self.n}", f"r{self.k}s{self.n}"  # link names: 15 characters at most
        self.n += 1
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", node_end, "type", "veth", "peer", "name", switch_end)
        sh("ip", "link", "set", node_end, "netns", ns, "name", "eth0")
        sh("ip", "link", "set", switch_end, "netns", self.switch)
        sh("ip", "link", "set", switch_end, "master", "br0", "up", ns=self.switch)
        sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        return ns, ip, switch_end

    def add(self, name: str, cores: list[int] | None = None, shared: dict[Path, Path] | None = None,
            disks: dict[Path, int] | None = None) -> Box:
        """A node: cores (None: all of the machine's), shared {host folder: path on the node} bound
        read-write, disks {path: MiB} size-limited tmpfs."""
        pairs = [(p, p, "ro") for p in self.ro] + [(Path(h).resolve(), Path(d), "rw") for h, d in (shared or {}).items()]
        home = Path(os.environ.get("HOME", "/root"))
        for src, dst, _ in pairs:  # the set-up script splits on spaces and '='
            if any(c in str(p) for p in (src, dst) for c in " ="):
                raise ValueError(f"node {name}: a folder bound into a node may not contain ' ' or '=': {src} -> {dst}")
        for dst in [d for _, d, _ in pairs] + list(disks or {}):
            # A mount point made on the shared root would appear, empty, on the host and every node.
            owned = any(Path(dst).is_relative_to(d) for d in (Path("/tmp"), Path("/var/tmp"), home))
            if not owned and not Path(dst).is_dir():
                raise ValueError(f"node {name}: {dst} is neither under the node's own /tmp, /var/tmp or {home} nor an "
                                 f"existing folder: it cannot be mounted without changing the host's root")
        ns, ip, switch_end = self._netns(name)
        box = Box(name, ns, ip, switch_end, self.cgroup / name)
        box.cgroup.mkdir()
        (box.cgroup / "cpuset.mems").write_text((self.cgroup / "cpuset.mems").read_text())
        (box.cgroup / "cpuset.cpus").write_text(",".join(map(str, cores)) if cores is not None
                                                else (self.cgroup / "cpuset.cpus").read_text())
        binds = [f"{src}={dst}={mode}" for src, dst, mode in pairs]
        env = {"BINDS": " ".join(binds), "DISKS": " ".join(f"{d}={mb}" for d, mb in (disks or {}).items()),
               "NODE": name, "HOME": os.environ.get("HOME", "/root"), "PATH": os.environ["PATH"]}
        log = open(self.folder / f"{name}.holder.log", "w")
        box.holder = subprocess.Popen(
            ["nsenter", f"--net={NETNS / ns}", "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", SETUP], stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True, text=True,
            preexec_fn=lambda: (box.cgroup / "cgroup.procs").write_text(str(os.getpid())))
        self.boxes[name] = box  # from here on, close() takes it down
        first = box.holder.stdout.readline().strip()
        if first != "ready":
            self.kill(name)
            raise RuntimeError(f"node {name}: its namespaces could not be set up ({first!r}; "
                               f"{(self.folder / f'{name}.holder.log').read_text()[-2000:]})")
        return box

    def command(self, name: str, args: list[str], cwd: str | Path | None = None) -> list[str]:
        """args run on node `name` (its network, mounts and hostname); start it with `preexec(name)`.
        Entering the node's mount namespace leaves the caller's working directory behind (the
        process starts in the node's /): cwd is the one it gets, a path as the node sees it."""
        box = self.boxes[name]
        wd = [f"--wdns={cwd}"] if cwd is not None else []
        return [_tool("nsenter"), "-t", str(box.holder.pid), "--net", "--mount", "--uts", *wd, "--", *args]

    def preexec(self, name: str):
        """For Popen(preexec_fn=...): the process joins the node's cgroup (its cores, its process list)."""
        procs = self.boxes[name].cgroup / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def host_command(self, args: list[str]) -> list[str]:
        """args run on the host's side of the cluster network (the host's files, the client address)."""
        return [_tool("ip"), "netns", "exec", self.host[0], *args]

    # ---- faults -------------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        """Partition: the node's link leaves the bridge. Nothing it sends arrives and nothing reaches
        it, silently (its own side still looks up), as when a switch port or a route fails."""
        sh("ip", "link", "set", self.boxes[name].port, "nomaster", ns=self.switch)

    def heal(self, name: str) -> None:
        sh("ip", "link", "set", self.boxes[name].port, "master", "br0", ns=self.switch)

    def block(self, name: str, other: str) -> None:
        """A firewall between two nodes: TCP connections that `name` opens to `other` are dropped at
        their first packet (a SYN); connections `other` opens to `name` still work, and so does
        everything else either node says to the rest of the cluster. unblock takes it away."""
        rules = "\n".join(["table inet rlsys_block {",
                           f"  chain output {{ type filter hook output priority 0; "
                           f"ip daddr {self.boxes[other].ip} tcp flags & (syn | ack) == syn drop; }}", "}"])
        done = subprocess.run(["ip", "netns", "exec", self.boxes[name].netns, "nft", "-f", "-"], input=rules, text=True,
                              capture_output=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"node {name}: nft could not block connections to {other}: {done.stderr.strip()}")

    def unblock(self, name: str) -> None:
        sh("nft", "delete", "table", "inet", "rlsys_block", ns=self.boxes[name].netns, check=False)

    def delay(self, name: str, ms: float) -> None:
        """Hold every frame the node sends for `ms` before the bridge gets it (as tc netem on its
        eth0 would: between two delayed nodes a round trip takes 2 x ms); 0 takes the delay away.
        A relay process (delay.py) in the switch namespace sits between the node's link and the
        bridge, on a TAP device that takes the link's place there."""
        box = self.boxes[name]
        if box.relay is not None:  # back to the plain link first
            sh("ip", "link", "set", box.veth_switch, "master", "br0", ns=self.switch)
            box.relay.kill()
            box.relay.wait(timeout=10)
            box.relay = None
        if not ms:
            return
        if not Path("/dev/net/tun").exists():
            raise RuntimeError(f"node {name}: a delay needs /dev/net/tun (the tun module) for its relay")
        relay = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, str(Path(__file__).with_name("delay.py")),
             box.veth_switch, box.tap, str(ms)], stdout=subprocess.PIPE,
            stderr=open(self.folder / f"{name}.relay.log", "w"), text=True, start_new_session=True)
        if (first := relay.stdout.readline().strip()) != "ready":
            relay.kill()
            raise RuntimeError(f"node {name}: the delay relay did not start ({first!r}; "
                               f"{(self.folder / f'{name}.relay.log').read_text()[-2000:]})")
        try:
            sh("ip", "link", "set", box.tap, "master", "br0", "up", ns=self.switch)
            sh("ip", "link", "set", box.veth_switch, "nomaster", ns=self.switch)
        except RuntimeError:
            relay.kill()  # its TAP device goes with it; the link is on the bridge as before
            sh("ip", "link", "set", box.veth_switch, "master", "br0", ns=self.switch)
            raise
        box.relay = relay  # from here the TAP device is the node's port on the bridge

    def link_bytes(self, name: str) -> tuple[int, int]:
        """(bytes the node has received, bytes it has sent) over its link, as the switch's end counts
        them: a test watches a weight push arrive, or a generate call's result leave, with it."""
        stats = f"/sys/class/net/{self.boxes[name].veth_switch}/statistics"
        out = sh("cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes", ns=self.switch).stdout.split()
        return int(out[0]), int(out[1])

    def shape(self, name: str, loss_pct: float = 0.0, rate_mbit: float | None = None) -> None:
        """Loss (nftables: each packet in and out of the node dropped with this probability) and rate
        (tc tbf on both ends of its link). Delay: `delay`."""
        box = self.boxes[name]
        sh("nft", "delete", "table", "inet", "rlsys", ns=box.netns, check=False)
        if loss_pct:
            below = round(loss_pct * 100)  # numgen draws 0..9999 uniformly per packet
            rules = "\n".join([
                "table inet rlsys {",
                *(f"  chain {hook} {{ type filter hook {hook} priority 0; numgen random mod 10000 < {below} drop; }}"
                  for hook in ("input", "output")), "}"])
            done = subprocess.run(["ip", "netns", "exec", box.netns, "nft", "-f", "-"], input=rules, text=True,
                                  capture_output=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"node {name}: nft could not set {loss_pct}% loss: {done.stderr.strip()}")
        for dev, ns in (("eth0", box.netns), (box.veth_switch, self.switch)):
            if rate_mbit:
                # A burst of 1 ms at the rate (two frames at least: tbf splits a larger GSO segment
                # itself), so that even a small message pays the rate; a queue of 100 ms at the rate,
                # 64 KiB at least, so that a slow link delays rather than drops.
                per_s = rate_mbit * 1e6 / 8
                burst = max(3000, int(per_s / 1000))
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
                   "limit", str(burst + max(64 * 1024, int(per_s / 10))), ns=ns)
            else:
                sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)

    def kill(self, name: str, timeout: float = 60.0) -> None:
        """Every process of the node at once (SIGKILL), as when the machine goes; its mounts with
        them. The network namespace stays: `add` the node again to bring a fresh one up."""
        box = self.boxes.pop(name)
        if box.relay is not None:
            box.relay.kill()
            box.relay.wait(timeout=10)
        deadline = time.monotonic() + timeout
        while pids := box.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name}: processes {pids} outlived SIGKILL for {timeout:.0f}s")
            time.sleep(0.05)
        if box.holder is not None:
            box.holder.wait(timeout=10)
        box.cgroup.rmdir()
        sh("ip", "netns", "del", box.netns, check=False)

    def close(self) -> None:
        for name in list(self.boxes):
            self.kill(name)
        for ns in (self.host[0], self.switch):
            sh("ip", "netns", "del", ns, check=False)
        try:
            self.cgroup.rmdir()
        except FileNotFoundError:
            pass
        (OWNERS / self.prefix).unlink(missing_ok=True)
