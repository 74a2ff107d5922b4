"""Runs the rule rewards with a per-sample timeout that a hanging verifier cannot escape, and a
verifier that raises or crashes on model text cannot stop.

math-verify's own timeouts (signal.alarm) are off, since they fail outside the main thread
(see rlsys.math.rewards). Instead the accuracy check (rlsys.math.rewards.accuracy) runs in a child process
that the parent kills when a sample takes longer than ``RewardConfig.timeout_s``. The format
score (rlsys.math.rewards.format_score, a regex) is computed here in the parent, so whatever happens
to the accuracy check, the format score is paid.

What a sample gets when the accuracy check fails (accuracy 0, ``reward = combine(0, format)``):

- it runs over ``timeout_s``: ``timed_out=True``; the child is killed and replaced;
- it raises: ``error`` = the exception's last line; the child lives on;
- it kills the child (a segfault, os._exit, the OOM killer): ``error`` = "verifier process died
  (exit code N)"; a fresh child takes over.

Each is logged (``logging.warning``) and scoring goes on with the next sample: training never
stalls or stops on model text. What still raises, since it is a broken component or bad data and
not bad model text: a child that cannot start (RuntimeError: import error, startup crash), a
gold answer the verifier cannot use (ValueError; rlsys.math.rewards.check_golds finds those up front).

Plain class, no Ray here (Ray wraps it elsewhere). Calls from several threads are serialised
by a lock. The child is started with the 'spawn' method, so a script that builds a RewardWorker
at import time needs the usual ``if __name__ == "__main__":`` guard (Ray actors and pytest are
fine as they are).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import traceback
from multiprocessing.connection import wait
from typing import Callable

from rlsys.config import RewardConfig
from rlsys.math.rewards import VERIFIERS, GoldError, accuracy, combine, format_score, language_score
from rlsys.types import RewardResult

__all__ = ["RewardResult", "RewardWorker", "Scorer"]

log = logging.getLogger(__name__)

Scorer = Callable[[str, str, RewardConfig], float]
"""``scorer(completion, gold, cfg) -> accuracy``: what the child runs (rlsys.math.rewards.accuracy)."""

START_TIMEOUT_S = 120.0
"""Longest wait for a child to start (spawn a Python, import the scorer and the verifier).
Startup is not charged to the first sample's timeout."""
IN_FLIGHT = 8
"""Samples queued in the child at once: enough to hide the pipe round trip, few enough that the
pipe's buffers never fill on either side (both sides would block)."""
CLOSE_TIMEOUT_S = 2.0
"""How long close() lets the child exit by itself before killing it."""
ERROR_CHARS = 500
"""RewardResult.error keeps at most this much of the exception's last line."""


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process with SIGKILL when its parent dies, whatever the way
    (kill -9, ray.kill of the actor, its node's OOM killer): a child stuck in a verifier's busy
    loop never outlives its reward worker. (The signal follows the parent THREAD that started the
    child: a RewardWorker starts its children from the thread that scores, which lives as long as
    the process in a Ray actor.)"""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl: nobody would kill us
        os._exit(1)


def _child_main(conn, scorer_bytes: bytes, cfg: RewardConfig, parent: int) -> None:
    """The child's loop: ("ready",) once, then one reply per (index, completion, gold) request.

    Replies: ("ok", index, accuracy) | ("error", index, traceback text) | ("gold", index,
    traceback text) for a GoldError. A startup failure replies ("fatal", traceback text) and
    exits. None or a closed pipe ends the loop.
    """
    # Ctrl-C goes to the whole process group; the parent decides when this child ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _die_with(parent)
        scorer = pickle.loads(scorer_bytes)
        from rlsys.math.rewards import _math_verify

        _math_verify()  # import once, before the first sample's clock starts
        if cfg.verifier == "reasoning_gym":
            import reasoning_gym  # noqa: F401 - likewise (seconds)
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
            reply = ("ok", index, float(scorer(completion, gold, cfg)))
        except GoldError:  # bad data: the parent raises it
            reply = ("gold", index, traceback.format_exc())
        except Exception:  # noqa: BLE001 - the parent scores the sample 0 and logs this
            reply = ("error", index, traceback.format_exc())
        conn.send(reply)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return (lines[-1] if lines else "unknown error")[:ERROR_CHARS]


class RewardWorker:
    """Plain class (Ray is applied elsewhere). Owns one child process (multiprocessing, 'spawn'
    context: safe inside a threaded Ray actor) that runs the accuracy check. Samples stream over
    a Pipe (IN_FLIGHT queued ahead); the parent waits at most cfg.timeout_s for each answer and
    computes each sample's format score itself. A timeout, an exception or the child's death costs
    that sample its accuracy only (see the module doc); scoring continues with the next sample.

    ``scorer(completion, gold, cfg) -> accuracy`` must be picklable (a top-level function). The
    child starts in ``__init__`` and lives across calls; after a timeout or a death a new one is
    started when the next sample needs it.
    """

    def __init__(self, cfg: RewardConfig, scorer: Scorer = accuracy) -> None:
        self._proc = None
        self._conn = None
        self._lock = threading.RLock()
        self._closed = False
        self.cfg = cfg
        try:
            self._scorer_bytes = pickle.dumps(scorer)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"scorer {scorer!r} must be picklable (a module-level function): {e}") from e
        # A config error would otherwise reach every sample as an error (accuracy) or every call.
        if cfg.verifier not in VERIFIERS:
            raise ValueError(f"reward.verifier must be resolved to one of {VERIFIERS} before a RewardWorker "
                             f"starts (rlsys.data.datasets.resolve_verifier), got {cfg.verifier!r}")
        format_score("", cfg)  # raises ValueError for an unknown format_mode
        self._ctx = mp.get_context("spawn")
        self._start()

    # -- child lifecycle ---------------------------------------------------------------------

    def _start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_child_main, args=(child_conn, self._scorer_bytes, self.cfg, os.getpid()),
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
            # The rules that need no verifier (format, language) run here: whatever happens to the check, they pay.
            rules = [(format_score(completion, self.cfg), language_score(completion, self.cfg))
                     for completion, _ in samples]
            results: list[RewardResult] = []
            while len(results) < len(samples):  # each pass ends at a timeout or a death (child replaced) or at the end
                results += self._stream(samples, rules, len(results))
            return results

    def _failed(self, rules: tuple[float, float | None], timed_out: bool = False, error: str | None = None
                ) -> RewardResult:
        fmt, lang = rules
        return RewardResult(reward=combine(0.0, fmt, self.cfg, lang), accuracy=0.0, format=fmt, timed_out=timed_out,
                            error=error, language=lang)

    def _stream(self, samples: list[tuple[str, str]], rules: list[tuple[float, float | None]], first: int
                ) -> list[RewardResult]:
        """Scores samples[first:] with up to IN_FLIGHT of them queued in the child, so the child never
        waits for a round trip through the parent. Sample i's clock starts when the parent begins
        waiting for its reply, i.e. once reply i - 1 is in: the child starts i at that moment (it is
        already queued), so each sample gets its full timeout_s. Returns after the last sample, or at
        the first timeout or death of the child (that sample's accuracy 0, the child killed: the
        caller streams the rest to a fresh one). Any other way out (bad data, a bug) kills the child
        too: no stale reply can reach the next call."""
        if self._proc is None:
            self._start()
        conn, proc = self._conn, self._proc
        results: list[RewardResult] = []
        sent = first
        can_send = True
        finished = False
        try:
            while first + len(results) < len(samples):
                while can_send and sent < len(samples) and sent - first - len(results) < IN_FLIGHT:
                    try:
                        conn.send((sent, *samples[sent]))
                    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                        can_send = False  # the child died: below, on the sample it was scoring
                        break
                    sent += 1
                index = first + len(results)
                completion, paid = samples[index][0], rules[index]  # (format, language): never lost
                if not wait([conn, proc.sentinel], timeout=self.cfg.timeout_s):  # a hanging verifier
                    self._kill()
                    log.warning("reward: the verifier ran over %.1f s on sample %d (completion starts %r): "
                                "accuracy 0, its process replaced", self.cfg.timeout_s, index, completion[:200])
                    results.append(self._failed(paid, timed_out=True))
                    finished = True
                    return results
                try:
                    msg = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # replies come in order: the child died scoring this sample
                    error = f"verifier process died (exit code {self._kill()})"
                    log.warning("reward: %s on sample %d (completion starts %r): accuracy 0, a fresh one "
                                "takes over", error, index, completion[:200])
                    results.append(self._failed(paid, error=error))
                    finished = True
                    return results
                kind, got_index = msg[0], msg[1]
                if got_index != index:
                    raise RuntimeError(f"reward worker child answered sample {got_index}, expected {index}")
                if kind == "ok":
                    acc = msg[2]
                    fmt, lang = paid
                    results.append(RewardResult(reward=combine(acc, fmt, self.cfg, lang), accuracy=acc, format=fmt,
                                                timed_out=False, language=lang))
                elif kind == "error":
                    log.warning("reward: the verifier raised on sample %d (completion starts %r): accuracy 0\n%s",
                                index, completion[:200], msg[2])
                    results.append(self._failed(paid, error=_last_line(msg[2])))
                elif kind == "gold":
                    raise ValueError(f"the gold answer of sample {index} cannot be used by the verifier (a data "
                                     f"bug; rlsys.math.rewards.check_golds finds these up front):\n{msg[2]}")
                else:
                    raise RuntimeError(f"reward worker child sent {msg!r}")
            finished = True
            return results
        finally:
            if not finished:  # samples may still be queued in the child: its replies must not outlive this call
                self._kill()

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
