import os
import signal
import time

import pytest

from rlsys.config import RewardConfig
from rlsys.actors.reward_worker import RewardWorker
from rlsys.types import RewardResult
from rlsys.math.rewards import accuracy, combine, score

HANG_S = 5.0
"""The per-sample timeout of the tests that hang a sample: what a hang costs them. A sample that does
not hang is scored in milliseconds; 5 s leaves a busy machine (CI, a test run beside a training run)
three orders of magnitude before a sound sample would count as hung."""

# Scorers must be module-level (the child process unpickles them by name). A scorer gives the
# accuracy only: the worker computes the format score itself, in the parent.


def hang_on_marker(completion, gold, cfg):
    """Scores normally, except that it never returns on a completion containing HANG."""
    if "HANG" in completion:
        while True:
            time.sleep(3600)
    return accuracy(completion, gold, cfg)


def raise_on_marker(completion, gold, cfg):
    if "BOOM" in completion:
        raise ValueError("scorer exploded")
    return accuracy(completion, gold, cfg)


def die_on_marker(completion, gold, cfg):
    if "DIE" in completion:
        os.kill(os.getpid(), signal.SIGKILL)
    if "EXIT" in completion:
        os._exit(3)
    return accuracy(completion, gold, cfg)


def _explode_on_load():
    raise ImportError("this verifier cannot be imported")


class BreaksInTheChild:
    """Pickles fine; unpickling it (in the child, at startup) raises."""

    def __reduce__(self):
        return _explode_on_load, ()


def make_cfg(timeout_s=30.0, require_answer_tag=True):
    # Every field the results depend on is pinned: the tests must not follow changes of defaults.
    return RewardConfig(timeout_s=timeout_s, require_answer_tag=require_answer_tag,
                        accuracy_weight=0.8, format_weight=0.2, verifier="math")


def tagged(answer, think="work"):
    return f" <think> {think} </think> <answer> {answer} </answer>"


# Perfect format, right answer: reward 0.8 * 1 + 0.2 * 1. A failed accuracy check keeps the format
# score: reward 0.8 * 0 + 0.2 * 1 = 0.2.
RIGHT = RewardResult(reward=1.0, accuracy=1.0, format=1.0, timed_out=False)
WRONG = RewardResult(reward=0.2, accuracy=0.0, format=1.0, timed_out=False)


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
    cfg = make_cfg(timeout_s=HANG_S)
    worker = RewardWorker(cfg, scorer=hang_on_marker)
    try:
        ok = (tagged("4"), "4")
        hang = (tagged("4", think="HANG"), "4")  # perfect format: the timeout costs the accuracy only
        first_pid = worker._proc.pid
        got = worker.score([ok, hang, ok])
        assert got == [RIGHT, RewardResult(reward=0.2, accuracy=0.0, format=1.0, timed_out=True), RIGHT]
        assert got[1].error is None
        assert worker._proc.pid != first_pid  # the hung child was replaced
        # Still scores correctly afterwards, and a batch of hangs does not stall either.
        assert worker.score(SAMPLES) == expected(SAMPLES, cfg)
        assert [r.timed_out for r in worker.score([hang, hang, ok])] == [True, True, False]
        # Without the tags the timeout pays no format either.
        bare = (" HANG 4", "4")
        assert worker.score([bare]) == [RewardResult(reward=0.0, accuracy=0.0, format=0.0, timed_out=True)]
    finally:
        worker.close()


def test_timeout_pays_the_format_score_of_the_workers_format_mode():
    # partial mode: a well-formed think block alone is worth 0.5, so the reward is 0.2 * 0.5.
    cfg = RewardConfig(timeout_s=HANG_S, require_answer_tag=False, accuracy_weight=0.8, format_weight=0.2,
                       verifier="math", format_mode="partial")
    with RewardWorker(cfg, scorer=hang_on_marker) as worker:
        got = worker.score([(" <think> HANG </think> so 4", "4"), (" <think> 2 + 2 </think> so 4", "4")])
    assert got == [RewardResult(reward=0.1, accuracy=0.0, format=0.5, timed_out=True),
                   RewardResult(reward=0.9, accuracy=1.0, format=0.5, timed_out=False)]


def test_raising_scorer_scores_zero_accuracy_keeps_the_format_and_goes_on(caplog):
    cfg = make_cfg()
    worker = RewardWorker(cfg, scorer=raise_on_marker)
    try:
        pid = worker._proc.pid
        boom = (tagged("4", think="BOOM"), "4")
        with caplog.at_level("WARNING", logger="rlsys.actors.reward_worker"):
            got = worker.score([(tagged("4"), "4"), boom, (tagged("5"), "4"), (" BOOM 4", "4")])
        assert got == [
            RIGHT,
            RewardResult(reward=0.2, accuracy=0.0, format=1.0, timed_out=False, error="ValueError: scorer exploded"),
            WRONG,
            RewardResult(reward=0.0, accuracy=0.0, format=0.0, timed_out=False, error="ValueError: scorer exploded"),
        ]
        # Logged with the sample, the start of the completion and the child's traceback.
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "sample 1" in logged and "<think> BOOM </think>" in logged and "Traceback" in logged
        assert worker._proc.pid == pid  # an exception does not cost the child
        assert worker.score([(tagged("4"), "4"), boom]) == [RIGHT, got[1]]  # and the next call works
    finally:
        worker.close()


@pytest.mark.parametrize("marker, exitcode", [("DIE", -signal.SIGKILL), ("EXIT", 3)])
def test_child_death_scores_zero_accuracy_and_a_fresh_child_goes_on(marker, exitcode):
    cfg = make_cfg()
    worker = RewardWorker(cfg, scorer=die_on_marker)
    try:
        first_pid = worker._proc.pid
        ok, wrong = (tagged("4"), "4"), (tagged("5"), "4")
        dies = (tagged("4", think=marker), "4")
        # More samples than are queued in the child at once: the ones queued behind the death are
        # scored by the fresh child, in order.
        got = worker.score([ok, wrong, dies] + [ok, wrong] * 5)
        died = RewardResult(reward=0.2, accuracy=0.0, format=1.0, timed_out=False,
                            error=f"verifier process died (exit code {exitcode})")
        assert got == [RIGHT, WRONG, died] + [RIGHT, WRONG] * 5
        assert worker._proc.pid != first_pid
        assert worker.score([dies, ok]) == [died, RIGHT]  # the last sample may die too; the next call works
        assert worker.score(SAMPLES[:2]) == expected(SAMPLES[:2], cfg)
    finally:
        worker.close()


def test_child_that_cannot_start_is_an_error():
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*this verifier cannot be imported"):
        RewardWorker(make_cfg(), scorer=BreaksInTheChild())


def test_unusable_gold_is_a_data_error_not_a_zero_reward():
    cfg = make_cfg()
    with RewardWorker(cfg) as worker:
        with pytest.raises(ValueError, match=r"gold answer of sample 1 .*check_golds(.|\n)*could not be parsed"):
            worker.score([(tagged("4"), "4"), (tagged("4"), "  "), (tagged("4"), "4")])
        assert worker.score([(tagged("4"), "4")]) == [RIGHT]


def test_config_errors_are_refused_up_front():
    with pytest.raises(ValueError, match="auto"):
        RewardWorker(RewardConfig(verifier="auto"))
    cfg = make_cfg()
    cfg.format_mode = "fancy"
    with pytest.raises(ValueError, match="fancy"):
        RewardWorker(cfg)


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
        RewardWorker(make_cfg(), scorer=lambda c, g, cfg: 0.0)


def test_real_verifier_blowup_cannot_stall():
    # math-verify/sympy on a power tower runs for a long time (it did with math-verify 0.9.0):
    # whatever it does, the sample scores 0 and the ones around it score normally.
    cfg = make_cfg(timeout_s=HANG_S)
    ok = (tagged("7"), "7")
    tower = (tagged("10^{10^{10^{10}}}"), "2")
    with RewardWorker(cfg) as worker:
        got = worker.score([ok, tower, ok])
    assert got[0] == got[2] == expected([ok], cfg)[0]
    assert (got[1].reward, got[1].accuracy, got[1].format) == (0.2, 0.0, 1.0)  # timed out or not


def test_streamed_samples_queued_behind_a_hang_or_an_error_are_neither_lost_nor_stale():
    # More samples than are queued in the child at once, a hang in the middle: the ones queued
    # behind it in the killed child are sent again to the fresh one.
    cfg = make_cfg(timeout_s=HANG_S)
    ok, hang = (tagged("4"), "4"), (tagged("4") + " HANG", "4")
    worker = RewardWorker(cfg, scorer=hang_on_marker)
    try:
        got = worker.score([ok] * 5 + [hang] + [ok] * 12)
        assert [r.timed_out for r in got] == [False] * 5 + [True] + [False] * 12
        assert all(r == expected([ok], cfg)[0] for r in got if not r.timed_out)
    finally:
        worker.close()
    # An error with samples still queued behind it: they are scored, and no reply outlives the call.
    worker = RewardWorker(make_cfg(), scorer=raise_on_marker)
    try:
        boom = (tagged("4", think="BOOM"), "4")
        got = worker.score([ok, boom] + [ok] * 10)
        assert [r.error for r in got] == [None, "ValueError: scorer exploded"] + [None] * 10
        assert got[2:] == [RIGHT] * 10
        wrong = (tagged("5"), "4")
        assert worker.score([wrong, ok]) == expected([wrong, ok], make_cfg())
    finally:
        worker.close()


def test_language_reward_is_added_with_its_weight_even_when_the_check_fails():
    # R1's third rule reward: 0.8 * accuracy + 0.2 * format + 0.1 * language consistency. Reasoning
    # "add 三 and four": words add, 三, and, four -> 3 of 4 English. A hanging verifier still pays
    # format and language (both computed in the parent).
    cfg = RewardConfig(timeout_s=HANG_S, require_answer_tag=True, accuracy_weight=0.8, format_weight=0.2,
                       language_weight=0.1, language="en", verifier="math")
    mixed = " <think> add 三 and four </think> <answer> 7 </answer>"
    with RewardWorker(cfg, scorer=hang_on_marker) as worker:
        right, wrong, hung = worker.score([(mixed, "7"), (mixed, "8"), (mixed.replace("four", "four HANG"), "7")])
    assert right.language == pytest.approx(0.75) and right.reward == pytest.approx(0.8 + 0.2 + 0.075)
    assert wrong.reward == pytest.approx(0.2 + 0.075) and wrong.accuracy == 0.0
    assert hung.timed_out and hung.language == pytest.approx(0.8)  # add, 三, and, four, HANG
    assert hung.reward == pytest.approx(0.2 + 0.08)
    with RewardWorker(make_cfg()) as worker:  # weight 0: not computed at all
        assert worker.score([(mixed, "7")])[0].language is None
