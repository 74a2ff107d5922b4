"""The node harness (rlsys/cluster/isolation.py) gives each node what a machine of its own has,
and its faults do what they say. No Ray here: plain processes on the nodes, sockets between them.
Skipped, with the reason, where namespaces are not allowed (not root); CI runs as root."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsys.cluster.isolation import OWNERS, Isolation, available, cleanup_stale
from rlsys.cluster.local import project_folders

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))
REPO = Path(__file__).resolve().parent.parent

SERVE = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(50)
while True:
    c, _ = s.accept(); c.sendall(b"x" * 1_000_000); c.close()
"""
FETCH = """
import socket, sys, time
t = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], 7777), timeout=float(sys.argv[2]))
except OSError as e:
    print("ERR", type(e).__name__); raise SystemExit
n = 0
while (d := s.recv(65536)):
    n += len(d)
print(n, time.monotonic() - t)
"""


@pytest.fixture
def iso(tmp_path):
    iso = Isolation(tmp_path, ro=project_folders())
    yield iso
    iso.close()


def on(iso: Isolation, node: str, *args: str, background: bool = False):
    argv = iso.command(node, list(args))
    if background:
        return subprocess.Popen(argv, preexec_fn=iso.preexec(node), stdout=subprocess.DEVNULL)
    done = subprocess.run(argv, preexec_fn=iso.preexec(node), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def fetch(iso: Isolation, node: str, ip: str, timeout: float = 3.0) -> tuple[str, float]:
    out = on(iso, node, sys.executable, "-c", FETCH, ip, str(timeout)).split()
    return (out[0], 0.0) if out[0] == "ERR" else (out[0], float(out[1]))


def test_each_node_has_its_own_address_files_cores_and_processes(iso, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("hi")
    a = iso.add("a", cores=[0], shared={shared: shared}, disks={Path("/tmp/disk"): 4})
    b = iso.add("b", cores=[0])
    assert on(iso, "a", "hostname") == "a" and a.ip != b.ip
    assert a.ip in on(iso, "a", "ip", "-br", "addr") and b.ip not in on(iso, "a", "ip", "-br", "addr")
    # its own /tmp and home: a file one node writes, no other node (nor the host) sees
    on(iso, "a", "sh", "-c", "echo mine > /tmp/note && echo mine > $HOME/note")
    assert on(iso, "b", "sh", "-c", "ls /tmp; ls $HOME") == ""
    assert not Path("/tmp/note").exists() and a.view("/tmp/note").read_text() == "mine\n"
    # only the folders bound in are shared, and the project is there read-only
    assert on(iso, "a", "cat", str(shared / "from-host")) == "hi"
    on(iso, "a", "sh", "-c", f"echo back > {shared}/from-a")
    assert (shared / "from-a").read_text() == "back\n"
    assert on(iso, "b", "sh", "-c", f"test -e {shared} || echo absent") == "absent"
    assert "Read-only" in on(iso, "a", "sh", "-c", f"touch {REPO}/x 2>&1 || true")
    assert on(iso, "a", sys.executable, "-c", "import rlsys, os; print(os.sched_getaffinity(0))") == "{0}"
    # a disk of its own fills up
    assert "No space left" in on(iso, "a", "sh", "-c", "dd if=/dev/zero of=/tmp/disk/f bs=1M count=8 2>&1 || true")
    # losing the node: every process it ran, at once
    sleeper = on(iso, "b", "sleep", "600", background=True)
    # nsenter execs sleep in its own pid once it has entered the node: killed before that, nsenter
    # would lose the node it enters and exit 1 on its own
    for _ in range(100):
        if Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep":
            break
        time.sleep(0.05)
    iso.kill("b")
    assert sleeper.wait(timeout=10) == -9


def test_loopback_is_a_nodes_own_and_the_link_faults_act(iso):
    a, b = iso.add("a"), iso.add("b")
    server = on(iso, "b", sys.executable, "-c", SERVE, background=True)
    try:
        for _ in range(50):  # the server is up
            if fetch(iso, "a", b.ip)[0] != "ERR":
                break
            time.sleep(0.2)
        assert fetch(iso, "a", b.ip)[0] == "1000000"
        assert fetch(iso, "a", "127.0.0.1")[0] == "ERR"  # b listens on its own loopback, not a's
        assert fetch(iso, "b", "127.0.0.1")[0] == "1000000"
        iso.cut("b")  # a partition: silence, not a refusal
        assert fetch(iso, "a", b.ip, timeout=2.0)[0] == "ERR"
        iso.heal("b")
        assert fetch(iso, "a", b.ip)[0] == "1000000"
        iso.shape("b", rate_mbit=16)  # 8 Mbit of payload at 16 Mbit/s: at least 0.5 s
        n, seconds = fetch(iso, "a", b.ip, timeout=10)
        assert n == "1000000" and seconds > 0.45, seconds
        # TCP gets everything through, retransmitting (with backoff: at 30% loss both ways a single
        # segment could wait past 10 s, so 10% and a generous timeout)
        iso.shape("b", loss_pct=10)
        assert fetch(iso, "a", b.ip, timeout=60)[0] == "1000000"
        drops = on(iso, "b", "nft", "list", "ruleset")
        assert "numgen random mod 10000 < 1000 drop" in drops
        iso.shape("b")
        assert on(iso, "b", "nft", "list", "ruleset") == ""
        # 50 ms on everything b sends (a relay process, the kernel has no netem): the handshake's
        # SYN-ACK and the data wait each, so a fetch takes over 0.1 s; a partition still acts
        iso.delay("b", 50)
        assert b.port != b.veth_switch and b.relay.poll() is None
        n, seconds = fetch(iso, "a", b.ip, timeout=10)
        assert n == "1000000" and seconds > 0.1, seconds
        iso.cut("b")
        assert fetch(iso, "a", b.ip, timeout=2.0)[0] == "ERR"
        iso.heal("b")
        relay = b.relay
        iso.delay("b", 0)
        assert relay.poll() is not None and b.port == b.veth_switch
        assert fetch(iso, "a", b.ip)[0] == "1000000"
    finally:
        server.kill()


def test_a_mount_point_outside_the_nodes_own_folders_is_refused(iso):
    with pytest.raises(ValueError, match="cannot be mounted without changing the host's root"):
        iso.add("a", disks={Path("/rlsys-no-such-disk"): 4})
    assert not Path("/rlsys-no-such-disk").exists()


def test_cleanup_removes_only_what_a_dead_harness_left(iso):
    """A live harness's switch and host namespaces run no process, and must survive another
    harness's cleanup; those of a harness that died (its recorded pid gone) are removed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = "rl250-left"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    OWNERS.mkdir(parents=True, exist_ok=True)
    (OWNERS / "rl250").write_text(str(dead.pid))
    removed = cleanup_stale()
    assert removed == [stale] and not (OWNERS / "rl250").exists()
    assert {iso.switch, iso.host[0]} <= set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                           text=True).stdout.split())
