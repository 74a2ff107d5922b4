"""No remote call waits forever: results gathered with a deadline, failing fast, and the stacks of
stuck actors written into the run folder.

`get_all` is `ray.get` over several calls with two differences: the first call that fails raises
at once (a learner rank that died leaves its peers blocked in a collective: waiting for them in
order would wait for the collective's own timeout, or forever), and a phase that outlives its
deadline raises PhaseTimeout naming the actors still busy. A lost actor raises ActorLost naming it.

Stacks: every actor registers faulthandler on SIGUSR1 when it starts (`install_stack_dump`, from
rlsys.cluster.remote.Placed); `dump_stacks` runs a tiny task on each actor's node that sends the
signal and reads back what the actor wrote (all threads, Python frames), which works even while
the actor is stuck in a C call such as a collective. No ptrace, no dashboard needed. faulthandler
prints at most the innermost 100 frames of a thread and marks a cut with a line "  ..."; a stack that
deep (a torch.compile under way, say) loses the outermost frames, the ones that say which rlsys
call it is in, so a cut dump is followed by py-spy's full one (ray[default] installs py-spy; it
needs ptrace, which a container may forbid: then the file says why it is missing).
SIGUSR1 kills a process without the handler, and a recorded pid may since belong to another
process (a replaced reward worker's, say), so only a live actor of the run that is still the
process that installed the handler is signalled (see `dump_stacks`).
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def describe(error: Exception) -> str:
    """An actor's error in one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


class PhaseTimeout(RuntimeError):
    def __init__(self, phase: str, stuck: list[str], timeout_s: float, setting: str):
        self.phase, self.stuck = phase, stuck
        super().__init__(f"{phase}: no result within {timeout_s:g}s ({setting}) from {', '.join(stuck)}")


class ActorLost(RuntimeError):
    def __init__(self, name: str, phase: str, cause: Exception):
        self.name, self.phase = name, phase
        self.where = where_lost(cause)  # "" when Ray's message names no node
        super().__init__(f"{name} died during {phase} ({describe(cause)}{self.where})")


def located(error: ActorLost, placement: list[dict]) -> str:
    """The error, with the node the lost actor ran on when Ray's message did not say (an actor whose
    connection closed first reports no address): from the run's placement records, and whether
    Ray has declared that node dead."""
    if error.where:
        return str(error)
    role, _, rank = error.name.rpartition(" ")
    role = {"reward worker": "reward"}.get(role, role)
    found = [r for r in placement if r.get("role") == role and str(r.get("rank")) == rank]
    if not found:
        return str(error)
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    node = found[0]
    return (f"{error} (it ran on node {node['ip']}"
            + (", which Ray has declared dead)" if node["node_id"] in dead else ")"))


def where_lost(cause: Exception) -> str:
    """Where a dead actor was, from Ray's message ("ip: ..."), and whether its whole node went: a
    user on a cluster needs the node before the exception type."""
    text = str(cause)
    ip = re.search(r"\bip: (\S+)", text)
    if ip is None:
        return ""
    if "node has died" in text or "node was terminated" in text:
        return f"; its node {ip.group(1)} is gone"
    return f"; on node {ip.group(1)}"


def get_all(refs: list, names: list[str], phase: str, timeout_s: float, setting: str) -> list:
    """Every result, in order; raises as soon as one call fails, ActorLost when its actor died,
    PhaseTimeout (naming the callers still running) after timeout_s. `setting` names the config
    key of the deadline, for the message."""
    pending = {ref: i for i, ref in enumerate(refs)}
    out: list = [None] * len(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise PhaseTimeout(phase, [names[i] for i in sorted(pending.values())], timeout_s, setting)
        i = pending.pop(ready[0])
        try:
            out[i] = ray.get(ready[0])
        except LOST as e:
            raise ActorLost(names[i], phase, e) from e
        except ray.exceptions.RayTaskError:
            # A peer's death often shows first as this actor's error (a collective that lost a
            # member); name the dead actor when there is one, it is the cause.
            lost = _first_lost(pending, names, phase)
            if lost is not None:
                raise lost from None
            raise
    return out


def _first_lost(pending: dict, names: list[str], phase: str, grace_s: float = 5.0) -> ActorLost | None:
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace_s)
    for ref in ready:
        try:
            ray.get(ref)
        except LOST as e:
            return ActorLost(names[pending[ref]], phase, e)
        except ray.exceptions.RayTaskError:
            continue
    return None


def stack_file(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / "rlsys-stacks" / f"{pid}.txt"


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None
    when no process has that pid. A pid and its start tick name one process: the kernel hands a
    pid out again only after its process is gone, and not within the tick it started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # no such process, or it exited while read
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3


def install_stack_dump() -> None:
    """In an actor's process: SIGUSR1 writes every thread's Python stack to stack_file(pid). The
    file's first line records this process's start tick, so that dump_stacks can tell this
    process from a later one that gets the same pid (the file outlives its process)."""
    pid = os.getpid()
    path = stack_file(pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "w")  # kept open for later signals
    out.write(f"# rlsys stack dump of pid {pid}, process start tick {process_start(pid)}\n")
    out.flush()  # faulthandler writes to the descriptor itself, after this line
    faulthandler.register(signal.SIGUSR1, file=out, all_threads=True)


def signal_and_read(pid: int, wait_s: float) -> str:
    """On the actor's node: SIGUSR1 to `pid` and the stack it writes; or, without signalling,
    why not. The signal goes only to the very process that installed the handler: the one whose
    start tick the stack file records (a process that reused the pid has another start tick and
    would be killed by SIGUSR1). Between the check and the kill lie microseconds, far less than
    it takes the kernel to hand the pid out again."""
    path = stack_file(pid)
    if not path.is_file():
        return f"(process {pid} registered no stack dump on this node)"
    with open(path) as f:
        header = re.fullmatch(r"# rlsys stack dump of pid \d+, process start tick (\d+)\n", f.readline())
    if header is None:
        return f"(the stack file of process {pid}, {path}, does not say which process installed it: not signalled)"
    installed, now = int(header[1]), process_start(pid)
    if now != installed:
        is_now = "gone" if now is None else f"another process (started at tick {now}, the actor's at {installed})"
        return f"(process {pid} that installed the stack dump is {is_now}: not signalled)"
    before = path.stat().st_size
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with open(path) as f:
            f.seek(before)
            text = f.read()
        if text.endswith("\n") and "File" in text:
            time.sleep(0.2)  # the rest of the threads
            with open(path) as f:
                f.seek(before)
                text = f.read()
            if FAULTHANDLER_CUT in text.splitlines():
                text += full_stack(pid)
            return text
    return f"(process {pid} wrote no stack within {wait_s:g}s)"


FAULTHANDLER_CUT = "  ..."  # the line faulthandler writes in place of the frames past its 100th


def full_stack(pid: int, timeout_s: float = 10.0) -> str:
    """Every thread's whole Python stack of process `pid`, read from outside by py-spy (ptrace), for
    when faulthandler's dump was cut; or, when py-spy cannot read it, the reason. timeout_s keeps
    the signal, the read and this within the wait_s + 20 s that dump_stacks gives each node."""
    head = "\n# faulthandler cut a stack at 100 frames; py-spy's full dump:\n"
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.is_file():
        return f"{head}(no py-spy beside {sys.executable}: install ray[default] or py-spy)\n"
    try:
        done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"{head}(py-spy gave no dump within {timeout_s:g}s)\n"
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]
        return f"{head}(py-spy could not read process {pid}: {why}; it needs ptrace: CAP_SYS_PTRACE in a container)\n"
    return head + done.stdout


def run_actors() -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(node id, pid) of this job's live actors, and of its dead ones, from Ray's actor table
    (the GCS itself, so no dashboard needed)."""
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    table = ray._private.state.actors(job_id=job).values()
    alive = {(a["Address"]["NodeID"], a["Pid"]) for a in table if a["State"] == "ALIVE"}
    dead = {(a["Address"]["NodeID"], a["Pid"]) for a in table if a["State"] == "DEAD"}
    return alive, dead


def dump_stacks(records: list[dict], folder: Path, wait_s: float = 5.0) -> Path:
    """The Python stacks of the actors in `records` (placement.json entries: role, rank, node_id,
    pid) into folder/<role>-<rank>.txt; an actor that cannot be reached, or is not signalled, gets
    the reason instead. Signalled: an actor that Ray's actor table shows alive in this job at that
    node and pid, where no actor of this job that died had the same pid (then the record may name
    the dead one: a record is not updated when its actor is replaced, and records carry no actor
    id), and whose process is still the one that installed the handler (signal_and_read)."""
    folder.mkdir(parents=True, exist_ok=True)
    alive, dead = run_actors()
    texts, refs = {}, {}
    for i, rec in enumerate(records):
        at = (rec["node_id"], rec["pid"])
        if at not in alive:
            texts[i] = (f"(no live actor of this run has pid {rec['pid']} on this node: it died or was replaced; "
                        f"not signalled)")
        elif at in dead:
            texts[i] = (f"(pid {rec['pid']} on this node was also the pid of an actor of this run that died: which of "
                        f"the two this record means is unknown; not signalled)")
        else:
            where = NodeAffinitySchedulingStrategy(rec["node_id"], soft=False)
            refs[_signal_and_read.options(scheduling_strategy=where).remote(rec["pid"], wait_s)] = i
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s + 20) if refs else ([], [])
    for ref in ready + late:
        try:
            texts[refs[ref]] = ray.get(ref) if ref in ready else "(its node did not answer)"
        except ray.exceptions.RayError as e:
            texts[refs[ref]] = f"(could not reach it: {type(e).__name__}: {e})"
    for i, rec in enumerate(records):
        (folder / f"{rec['role']}-{rec['rank']}.txt").write_text(
            f"# {rec['role']} {rec['rank']}, pid {rec['pid']} on node {rec['node_id']}\n{texts[i]}")
    return folder


_signal_and_read = ray.remote(num_cpus=0)(signal_and_read)
