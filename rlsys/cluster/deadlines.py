"""No remote call waits forever: results gathered with a deadline, failing fast, and the stacks of
stuck actors written into the run folder.

`get_all` is `ray.get` over several calls with two differences: the first call that fails raises
at once (a learner rank that died leaves its peers blocked in a collective: waiting for them in
order would wait for the collective's own timeout, or forever), and a phase that outlives its
deadline raises PhaseTimeout naming the actors still busy. A lost actor raises ActorLost naming it.

Stacks: every actor registers faulthandler on SIGUSR1 when it starts (`install_stack_dump`, from
rlsys.cluster.remote.Placed); `dump_stacks` runs a tiny task on each actor's node that sends the
signal and reads back what the actor wrote (all threads, Python frames), which works even while
the actor is stuck in a C call such as a collective. No ptrace, no dashboard needed.
"""

from __future__ import annotations

import faulthandler
import os
import signal
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
        super().__init__(f"{name} died during {phase} ({describe(cause)})")


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


def install_stack_dump() -> None:
    """In an actor's process: SIGUSR1 writes every thread's Python stack to stack_file(pid)."""
    path = stack_file(os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    faulthandler.register(signal.SIGUSR1, file=open(path, "w"), all_threads=True)  # kept open for later signals


@ray.remote(num_cpus=0)
def _signal_and_read(pid: int, wait_s: float) -> str:
    path = stack_file(pid)
    if not path.is_file():
        return f"(process {pid} registered no stack dump on this node)"
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
                return f.read()
    return f"(process {pid} wrote no stack within {wait_s:g}s)"


def dump_stacks(records: list[dict], folder: Path, wait_s: float = 5.0) -> Path:
    """The Python stacks of the actors in `records` (placement.json entries: role, rank, node_id,
    pid) into folder/<role>-<rank>.txt; an actor that cannot be reached gets the reason instead."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = {}
    for rec in records:
        where = NodeAffinitySchedulingStrategy(rec["node_id"], soft=False)
        refs[_signal_and_read.options(scheduling_strategy=where).remote(rec["pid"], wait_s)] = rec
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s + 20)
    for ref in ready + late:
        rec = refs[ref]
        try:
            text = ray.get(ref) if ref in ready else "(its node did not answer)"
        except ray.exceptions.RayError as e:
            text = f"(could not reach it: {type(e).__name__}: {e})"
        (folder / f"{rec['role']}-{rec['rank']}.txt").write_text(
            f"# {rec['role']} {rec['rank']}, pid {rec['pid']} on node {rec['node_id']}\n{text}")
    return folder
