import os
import signal
import time

import pytest

from rlsys.config import RewardConfig
from rlsys.reward_worker import RewardWorker
from rlsys.types import RewardResult
from rlsys.rewards import combine, score

# Scorers must be module-level (the child process unpickles them by name).


def hang_on_marker(completion, gold, cfg):
    """Scores normally, except that it never returns on a completion containing HANG."""
    if "HANG" in completion:
        while True:
            time.sleep(3600)
    return score(completion, gold, cfg)


def raise_on_marker(completion, gold, cfg):
    if "BOOM" in completion:
        raise ValueError("scorer exploded")
    return score(completion, gold, cfg)


def die_on_marker(completion, gold, cfg):
    if "DIE" in completion:
        os.kill(os.getpid(), signal.SIGKILL)
    return score(completion, gold, cfg)


def make_cfg(timeout_s=30.0, require_answer_tag=True):
    # Every field the results depend on is pinned: the tests must not follow changes of defaults.
    return RewardConfig(timeout_s=timeout_s, require_answer_tag=require_answer_tag,
                        accuracy_weight=0.8, format_weight=0.2, verifier="math")


def tagged(answer):
    return f" <think> work </think> <answer> {answer} </answer>"


SAMPLES = [
    (tagged("4"), "4"),                                       # right, formatted
    (tagged("5"), "4"),                                       # wrong, formatted
    (" 4", "4"),                                              # right but no tags
    (tagged("\\frac{1}{2}"), "0.5"),                          # equivalent forms
    (" <think> x </think> <answer> 1 </answer> <answer> 2 </answer>", "1"),  # hedging: 0 and 0
]


def expected(samples, cfg):
    out = []
    for completion, gold in samples:
        acc, fmt = score(completion, gold, cfg)
        out.append(RewardResult(reward=combine(acc, fmt, cfg), accuracy=acc, format=fmt, timed_out=False))
    return out


def test_real_worker_matches_direct_scoring():
    cfg = make_cfg()
    with RewardWorker(cfg) as worker:
        got = worker.score(SAMPLES)
        assert got == expected(SAMPLES, cfg)
        assert [r.reward for r in got] == pytest.approx([1.0, 0.2, 0.0, 1.0, 0.0])
        assert worker.score([]) == []
        assert worker.score(SAMPLES[:1]) == expected(SAMPLES[:1], cfg)  # the child lives on
    free = make_cfg(require_answer_tag=False)  # the child scores with the worker's cfg
    with RewardWorker(free) as worker:
        got = worker.score(SAMPLES)
        assert got == expected(SAMPLES, free)
        assert [r.reward for r in got] == pytest.approx([1.0, 0.2, 0.8, 1.0, 0.0])


def test_hanging_scorer_times_out_and_scoring_continues():
    cfg = make_cfg(timeout_s=1.0)
    worker = RewardWorker(cfg, scorer=hang_on_marker)
    try:
        ok = (tagged("4"), "4")
        hang = (tagged("4") + " HANG", "4")
        first_pid = worker._proc.pid
        got = worker.score([ok, hang, ok])
        assert [r.timed_out for r in got] == [False, True, False]
        assert got[1] == RewardResult(reward=0.0, accuracy=0.0, format=0.0, timed_out=True)
        assert got[0] == got[2] == expected([ok], cfg)[0]
        assert worker._proc.pid != first_pid  # the hung child was replaced
        # Still scores correctly afterwards, and a batch of hangs does not stall either.
        assert worker.score(SAMPLES) == expected(SAMPLES, cfg)
        assert [r.timed_out for r in worker.score([hang, hang, ok])] == [True, True, False]
    finally:
        worker.close()


def test_raising_scorer_raises_with_sample_index():
    worker = RewardWorker(make_cfg(), scorer=raise_on_marker)
    try:
        batch = [(tagged("4"), "4"), (tagged("4"), "4"), (tagged("4") + " BOOM", "4")]
        with pytest.raises(RuntimeError, match=r"sample 2") as info:
            worker.score(batch)
        msg = str(info.value)
        assert "scorer exploded" in msg and "ValueError" in msg  # the child's traceback
        assert "<think> work </think>" in msg                     # start of the completion
        # The worker stays usable.
        assert worker.score(batch[:1]) == expected(batch[:1], make_cfg())
    finally:
        worker.close()


def test_child_death_raises_then_recovers():
    cfg = make_cfg()
    worker = RewardWorker(cfg, scorer=die_on_marker)
    try:
        with pytest.raises(RuntimeError, match=r"died unexpectedly.*sample 1"):
            worker.score([(tagged("4"), "4"), (tagged("4") + " DIE", "4")])
        assert worker.score(SAMPLES[:2]) == expected(SAMPLES[:2], cfg)
    finally:
        worker.close()


def test_close_is_idempotent():
    worker = RewardWorker(make_cfg())
    pid = worker._proc.pid
    worker.close()
    worker.close()
    assert worker._proc is None
    with pytest.raises(ProcessLookupError):  # the child exited and was reaped
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        worker.score(SAMPLES[:1])
    worker.__del__()  # what garbage collection does; must not raise either


def test_unpicklable_scorer_is_rejected():
    with pytest.raises(TypeError, match="picklable"):
        RewardWorker(RewardConfig(), scorer=lambda c, g, cfg: (0.0, 0.0))


def test_real_verifier_blowup_cannot_stall():
    # math-verify/sympy on a power tower runs for a long time (it did with math-verify 0.9.0):
    # whatever it does, the sample scores 0 and the ones around it score normally.
    cfg = make_cfg(timeout_s=1.0)
    ok = (tagged("7"), "7")
    tower = (tagged("10^{10^{10^{10}}}"), "2")
    with RewardWorker(cfg) as worker:
        got = worker.score([ok, tower, ok])
    assert got[0] == got[2] == expected([ok], cfg)[0]
    assert got[1].accuracy == 0.0


def test_streamed_samples_queued_behind_a_hang_or_an_error_are_neither_lost_nor_stale():
    # More samples than are queued in the child at once, a hang in the middle: the ones queued
    # behind it in the killed child are sent again to the fresh one.
    cfg = make_cfg(timeout_s=1.0)
    ok, hang = (tagged("4"), "4"), (tagged("4") + " HANG", "4")
    worker = RewardWorker(cfg, scorer=hang_on_marker)
    try:
        got = worker.score([ok] * 5 + [hang] + [ok] * 12)
        assert [r.timed_out for r in got] == [False] * 5 + [True] + [False] * 12
        assert all(r == expected([ok], cfg)[0] for r in got if not r.timed_out)
    finally:
        worker.close()
    # An error with samples still queued behind it: the next call must not read their replies.
    worker = RewardWorker(make_cfg(), scorer=raise_on_marker)
    try:
        boom = (tagged("4") + " BOOM", "4")
        with pytest.raises(RuntimeError, match=r"sample 1"):
            worker.score([ok, boom] + [ok] * 10)
        wrong = (tagged("5"), "4")
        assert worker.score([wrong, ok]) == expected([wrong, ok], make_cfg())
    finally:
        worker.close()
