"""Runs the rule rewards with a per-sample timeout that a hanging verifier cannot escape.

math-verify's own timeouts (signal.alarm) are off, since they fail outside the main thread
(see rlsys.rewards). Instead the scorer runs in a child process that the parent kills when a
sample takes longer than ``RewardConfig.timeout_s``: that sample scores 0 with
``timed_out=True``, a fresh child starts, and scoring goes on. Training never stalls.

Errors are not rewards: an exception in the scorer is raised in the parent as a RuntimeError
(sample index, start of the completion, the child's traceback), and so is a child that dies
without being killed by us.

Plain class, no Ray here (Ray wraps it elsewhere). Calls from several threads are serialised
by a lock. The child is started with the 'spawn' method, so a script that builds a RewardWorker
at import time needs the usual ``if __name__ == "__main__":`` guard (Ray actors and pytest are
fine as they are).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import threading
import traceback
from multiprocessing.connection import wait
from typing import Callable

from rlsys.config import RewardConfig
from rlsys.rewards import combine, score
from rlsys.types import RewardResult

__all__ = ["RewardResult", "RewardWorker"]

Scorer = Callable[[str, str, RewardConfig], tuple[float, float]]

START_TIMEOUT_S = 120.0
"""Longest wait for a child to start (spawn a Python, import the scorer and math_verify).
Startup is not charged to the first sample's timeout."""
IN_FLIGHT = 8
"""Samples queued in the child at once: enough to hide the pipe round trip, few enough that the
pipe's buffers never fill on either side (both sides would block)."""
CLOSE_TIMEOUT_S = 2.0
"""How long close() lets the child exit by itself before killing it."""


def _child_main(conn, scorer_bytes: bytes, cfg: RewardConfig) -> None:
    """The child's loop: ("ready",) once, then one reply per (index, completion, gold) request.

    Replies: ("ok", index, accuracy, format) | ("error", index, traceback text). A startup
    failure replies ("fatal", traceback text) and exits. None or a closed pipe ends the loop.
    """
    # Ctrl-C goes to the whole process group; the parent decides when this child ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        scorer = pickle.loads(scorer_bytes)
        from rlsys.rewards import _math_verify

        _math_verify()  # import once, before the first sample's clock starts
    except BaseException:  # noqa: BLE001 - reported to the parent, then this process exits
        conn.send(("fatal", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent gone
            return
        if msg is None:
            conn.close()
            return
        index, completion, gold = msg
        try:
            accuracy, fmt = scorer(completion, gold, cfg)
            reply = ("ok", index, float(accuracy), float(fmt))
        except Exception:  # noqa: BLE001 - sent to the parent, which raises it
            reply = ("error", index, traceback.format_exc())
        conn.send(reply)


class RewardWorker:
    """Plain class (Ray is applied elsewhere). Owns one child process (multiprocessing, 'spawn'
    context: safe inside a threaded Ray actor) that runs the scorer. Samples stream over a Pipe
    (IN_FLIGHT queued ahead); the parent waits at most cfg.timeout_s for each answer. On timeout: kill
    the child (SIGKILL, join), start a fresh one, the sample gets RewardResult(0, 0, 0,
    timed_out=True), and scoring continues with the next sample. Training never stalls on a
    hanging verifier.

    ``scorer(completion, gold, cfg) -> (accuracy, format)`` must be picklable (a top-level
    function). The child starts in ``__init__`` and lives across calls; after a timeout or an
    unexpected death a new one is started (the latter on the next call).
    """

    def __init__(self, cfg: RewardConfig, scorer: Scorer = score) -> None:
        self._proc = None
        self._conn = None
        self._lock = threading.RLock()
        self._closed = False
        self.cfg = cfg
        try:
            self._scorer_bytes = pickle.dumps(scorer)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"scorer {scorer!r} must be picklable (a module-level function): {e}") from e
        self._ctx = mp.get_context("spawn")
        self._start()

    # -- child lifecycle ---------------------------------------------------------------------

    def _start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_child_main, args=(child_conn, self._scorer_bytes, self.cfg),
                                 name="rlsys-reward-child", daemon=True)
        proc.start()
        child_conn.close()  # the child holds the other end; its death must read as EOF here
        self._proc, self._conn = proc, parent_conn
        ready = wait([parent_conn, proc.sentinel], timeout=START_TIMEOUT_S)
        msg = None
        if parent_conn in ready:
            try:
                msg = parent_conn.recv()
            except (EOFError, OSError):
                msg = None
        if msg == ("ready",):
            return
        exitcode = self._kill()
        if msg is not None and msg[0] == "fatal":
            raise RuntimeError(f"reward worker child failed to start:\n{msg[1]}")
        if not ready:
            raise RuntimeError(f"reward worker child did not start within {START_TIMEOUT_S:.0f} s")
        raise RuntimeError(f"reward worker child died during startup (exit code {exitcode}); see its stderr")

    def _kill(self) -> int | None:
        """SIGKILL and reap the child (if any); returns its exit code."""
        proc, conn = self._proc, self._conn
        self._proc, self._conn = None, None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join()
        exitcode = proc.exitcode
        proc.close()
        return exitcode

    # -- scoring -----------------------------------------------------------------------------

    def score(self, samples: list[tuple[str, str]]) -> list[RewardResult]:
        """Scores (completion, gold) pairs; results in the same order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardWorker is closed")
            results: list[RewardResult] = []
            while len(results) < len(samples):  # each pass ends at a timeout (fresh child) or at the end
                results += self._stream(samples, len(results))
            return results

    def _stream(self, samples: list[tuple[str, str]], first: int) -> list[RewardResult]:
        """Scores samples[first:] with up to IN_FLIGHT of them queued in the child, so the child never
        waits for a round trip through the parent. Sample i's clock starts when the parent begins
        waiting for its reply, i.e. once reply i - 1 is in: the child starts i at that moment (it is
        already queued), so each sample gets its full timeout_s. Returns at the first timeout (that
        sample scored 0, the child replaced; the caller streams the rest) or after the last sample.
        Any other way out (an error, a dead child) kills the child: no stale reply can reach the
        next call."""
        if self._proc is None:
            self._start()
        conn, proc = self._conn, self._proc
        results: list[RewardResult] = []
        sent = first
        finished = False
        try:
            while first + len(results) < len(samples):
                while sent < len(samples) and sent - first - len(results) < IN_FLIGHT:
                    try:
                        conn.send((sent, *samples[sent]))
                    except (BrokenPipeError, ConnectionResetError, EOFError) as e:
                        self._died(sent, samples[sent][0], f"send failed: {e}")
                    sent += 1
                index = first + len(results)
                completion = samples[index][0]
                if not wait([conn, proc.sentinel], timeout=self.cfg.timeout_s):  # a hanging verifier
                    self._kill()
                    self._start()
                    results.append(RewardResult(reward=0.0, accuracy=0.0, format=0.0, timed_out=True))
                    finished = True
                    return results
                try:
                    msg = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    msg = None
                if msg is None:
                    self._died(index, completion, "no reply")
                if msg[0] != "ok":
                    raise RuntimeError(f"reward scorer raised on sample {index} "
                                       f"(completion starts {completion[:200]!r}):\n{msg[2]}")
                _, got_index, accuracy, fmt = msg
                if got_index != index:
                    raise RuntimeError(f"reward worker child answered sample {got_index}, expected {index}")
                results.append(RewardResult(reward=combine(accuracy, fmt, self.cfg), accuracy=accuracy, format=fmt,
                                            timed_out=False))
            finished = True
            return results
        finally:
            if not finished:  # samples may still be queued in the child: its replies must not outlive this call
                self._kill()

    def _died(self, index: int, completion: str, what: str) -> None:
        exitcode = self._kill()  # the next call starts a fresh child
        raise RuntimeError(f"reward worker child died unexpectedly ({what}, exit code {exitcode}) "
                           f"while scoring sample {index} (completion starts {completion[:200]!r})")

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the child: asks it to exit, kills it after CLOSE_TIMEOUT_S. Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before anything was started
            return
        with lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            if proc is None:
                return
            try:
                conn.send(None)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass  # already gone; _kill reaps it
            proc.join(CLOSE_TIMEOUT_S)
            self._kill()

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
