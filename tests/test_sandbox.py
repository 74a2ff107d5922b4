"""The sandbox holds: code that tries to break out ends with the sandbox intact, nothing it started
still running, nothing written outside its scratch folder, and a verdict that says what happened.
Each run is bounded by the sandbox's own deadline (a few seconds)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rlsys.sandbox.execute import Limits, Sandbox, SandboxUnavailable, processes_of, reap

REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits(wall_s=6.0, cpu_s=2, memory_mb=256, processes=8, output_bytes=64 << 10)
UID_BASE = 61000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox tests check per-run uids, which need root")


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(uid_base=UID_BASE, concurrency=2)
    yield box
    box.close()


def nothing_left(sandbox) -> None:
    """No process of any sandbox uid, no scratch folder, and a plain program still runs."""
    assert [processes_of(uid) for uid in range(UID_BASE, UID_BASE + 2)] == [[], []]
    assert list(sandbox.scratch_root.iterdir()) == []
    assert sandbox.python_source("print(6 * 7)", LIMITS).stdout == "42\n"


def test_a_program_runs_with_its_files_and_input(sandbox):
    # -I (isolated mode): the script's folder is not on sys.path, so files are read, not imported
    run = sandbox.python_source("import sys\nprint(int(open('data.txt').read()) + int(sys.stdin.read()))\nsys.exit(3)",
                                LIMITS, stdin=b"5", files={"data.txt": "37\n"})
    assert (run.verdict, run.returncode, run.stdout) == ("exit", 3, "42\n")
    assert sandbox.python_source("print(open('/work/main.py').read()[:5])", LIMITS).stdout == "print\n"
    nothing_left(sandbox)


def test_an_infinite_loop_is_stopped_by_the_cpu_limit(sandbox):
    run = sandbox.python_source("while True: pass", LIMITS)
    # RLIMIT_CPU: SIGXCPU at the soft limit; the wall deadline only if the machine is too busy to give 2 CPU s
    assert run.verdict in ("signal", "timeout") and not run.ok, run
    assert run.seconds < LIMITS.wall_s + 3
    nothing_left(sandbox)


def test_a_sleep_that_ignores_sigterm_is_killed_at_the_deadline(sandbox):
    start = time.monotonic()
    run = sandbox.python_source("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                "print('sleeping', flush=True)\ntime.sleep(600)", Limits(wall_s=2.0))
    assert (run.verdict, run.stdout) == ("timeout", "sleeping\n")
    assert run.reason == "past the wall-clock deadline"
    assert time.monotonic() - start < 6
    nothing_left(sandbox)


def test_a_fork_bomb_meets_the_process_limit_and_leaves_nothing(sandbox):
    run = sandbox.python_source(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(600)\n"
        "        n += 1\nexcept OSError as e:\n    print(n, e.errno, flush=True)\ntime.sleep(600)", Limits(wall_s=3.0, processes=8))
    assert run.verdict == "timeout"
    forked, errno = map(int, run.stdout.split())
    assert forked < 8 and errno == 11  # EAGAIN: the process limit, counted for this run's uid only
    nothing_left(sandbox)


def test_a_memory_bomb_fails_inside_the_sandbox(sandbox):
    run = sandbox.python_source("x = bytearray(1 << 31)", LIMITS)
    assert run.verdict == "exit" and "MemoryError" in run.stderr
    nothing_left(sandbox)


def test_writes_outside_the_scratch_folder_fail(sandbox, tmp_path):
    targets = [REPO / f"escape-{uuid.uuid4().hex}", tmp_path / "escape", Path("/tmp") / f"escape-{uuid.uuid4().hex}"]
    src = "import sys\nfor t in sys.argv[1:]:\n    try:\n        open(t, 'w').write('x')\n        print('wrote', t)\n" \
          "    except OSError as e:\n        print('refused', t, type(e).__name__)\n"
    run = sandbox.run([sandbox.python, "-I", "main.py", *map(str, targets)], {"main.py": src}, LIMITS)
    assert run.ok
    # /tmp inside is the sandbox's own tmpfs: the write succeeds there and vanishes with it
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["refused", "refused", "wrote"]
    assert not any(t.exists() for t in targets)
    # nothing of the host beyond /usr is visible: not the project, not /root, not the run folder
    run = sandbox.python_source(f"import os\nfor p in {[str(REPO), '/root', str(tmp_path), '/etc/passwd']!r}:\n"
                                "    print(os.path.exists(p))", LIMITS)
    assert run.stdout.split() == ["False"] * 4
    nothing_left(sandbox)


def test_the_workers_environment_and_secrets_are_not_readable(sandbox, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLSYS_TEST_SECRET", secret)
    run = sandbox.python_source(
        "import os\nprint(sorted(os.environ))\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError as e:\n"
        "        print(pid, e)\n", LIMITS)
    assert run.ok and secret not in run.stdout
    assert run.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONDONTWRITEBYTECODE']"
    nothing_left(sandbox)


def test_no_network_reaches_the_host_or_another_namespace(sandbox, tmp_path):
    from rlsys.cluster import isolation

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    src = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
           "    print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    run = sandbox.run([sandbox.python, "-I", "main.py", "127.0.0.1", str(port)], {"main.py": src}, LIMITS)
    assert run.stdout.strip() == "ConnectionRefusedError"  # its loopback is its own: nothing listens there
    server.close()
    if isolation.available():
        pytest.skip(f"the other-namespace half needs the node harness: {isolation.available()}")
    iso = isolation.Isolation(tmp_path, ro=[])
    try:
        ns, ip, _ = iso.host
        listener = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                     "import socket; s = socket.socket(); s.bind(('0.0.0.0', 8765)); s.listen();"
                                     "print('up', flush=True); c, _ = s.accept(); c.close()"],
                                    stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "up"
        client_ns, _, _ = iso._netns("client")  # a namespace on the same bridge reaches it: the address is live
        reach = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, "-c", src, ip, "8765"],
                               capture_output=True, text=True, timeout=30)
        assert reach.stdout.strip() == "connected", reach.stderr
        run = sandbox.run([sandbox.python, "-I", "main.py", ip, "8765"], {"main.py": src}, LIMITS)
        assert run.stdout.strip() == "OSError"  # ENETUNREACH: no route out of the sandbox's namespace
        listener.kill()
        listener.wait()
    finally:
        iso.close()
    nothing_left(sandbox)


def test_killing_the_parent_or_everything_it_can_signal_harms_nobody_outside(sandbox):
    outside = subprocess.Popen(["sleep", "60"])
    try:
        run = sandbox.python_source(
            f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, {outside.pid}, 1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n        print(pid, 'sent')\n    except OSError as e:\n"
            "        print(pid, type(e).__name__)\nos.kill(-1, signal.SIGKILL)\n", LIMITS)
        # the test and the outside process live on; the host pids do not exist in the sandbox's PID namespace
        assert outside.poll() is None
        # (the sandbox's own pids are single digits: a host pid is not one of them)
        assert f"{outside.pid} ProcessLookupError" in run.stdout and f"{os.getpid()} ProcessLookupError" in run.stdout
    finally:
        outside.kill()
        outside.wait()
    nothing_left(sandbox)


def test_megabytes_of_output_are_capped(sandbox):
    run = sandbox.python_source("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", LIMITS)
    assert run.verdict == "output_limit" and run.reason == "past the output cap"
    assert len(run.stdout) <= LIMITS.output_bytes
    nothing_left(sandbox)


def test_a_daemon_does_not_outlive_its_run(sandbox):
    run = sandbox.python_source(
        "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    os.close(1); os.close(2)\n"
        "    time.sleep(600)\nprint('parent gone', flush=True)", LIMITS)
    assert run.ok and run.stdout == "parent gone\n"
    nothing_left(sandbox)


def test_crashing_the_interpreter_is_a_signal_verdict(sandbox):
    run = sandbox.python_source("import ctypes\nctypes.string_at(0)", LIMITS)
    assert (run.verdict, run.returncode, run.reason) == ("signal", -signal.SIGSEGV, "killed by SIGSEGV")
    nothing_left(sandbox)


def test_a_machine_without_namespaces_is_refused_with_the_way_out():
    folder = Path(tempfile.mkdtemp(prefix="rlsys-fake-bwrap-"))  # under /tmp: the sandbox uid must run it
    try:
        folder.chmod(0o755)
        fake = folder / "bwrap"  # what bwrap prints where the kernel forbids unprivileged user namespaces
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        with pytest.raises(SandboxUnavailable, match="No permissions.*unsafe_rlimits_only"):
            Sandbox(bwrap=str(fake))
    finally:
        shutil.rmtree(folder)
    weak = Sandbox(mode="unsafe_rlimits_only")  # chosen explicitly: the limits, no isolation
    try:
        run = weak.python_source("x = bytearray(1 << 31)", LIMITS)
        assert run.verdict == "exit" and "MemoryError" in run.stderr
    finally:
        weak.close()


def test_a_scratch_root_other_users_cannot_enter_is_refused(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(SandboxUnavailable, match="closed to other users"):
        Sandbox(scratch_root=str(closed))


def test_a_uid_still_used_by_a_dying_run_is_not_given_to_the_next(sandbox):
    """A worker killed mid-run frees its uid's lock at once, but its run's processes die and are reaped
    a moment later (by whoever adopted them): the next run takes another uid, not one whose processes
    would count against its own process limit or be taken for its escapees; once they are reaped the
    uid serves again."""
    uid = "import os; print(os.getuid())"
    owner = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom rlsys.sandbox.execute import Limits, Sandbox\n"
        f"box = Sandbox(uid_base={UID_BASE}, concurrency=2)\nprint(box.scratch_root, flush=True)\n"
        "box.python_source('import time; time.sleep(30)', Limits(wall_s=60))")], stdout=subprocess.PIPE, text=True)
    scratch = owner.stdout.readline().strip()
    try:
        deadline = time.monotonic() + 10
        while not processes_of(UID_BASE):  # its run started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        owner.kill()  # SIGKILL mid-run: its sandbox dies with it (bwrap --die-with-parent), adopted by this process
        owner.wait()
        assert processes_of(UID_BASE)  # dying or dead, not yet reaped
        assert sandbox.python_source(uid, LIMITS).stdout == f"{UID_BASE + 1}\n"
        reap(UID_BASE)  # their adopter (this process, a subreaper) waits for them
        assert sandbox.python_source(uid, LIMITS).stdout == f"{UID_BASE}\n"  # gone: the uid serves again
        nothing_left(sandbox)
    finally:
        owner.kill()
        shutil.rmtree(scratch, ignore_errors=True)  # the killed owner's, which its exit did not remove
