"""Guardrails against silent errors, on hand-made inputs: the weight-sync checksum and its
comparison, the generator/learner log-prob gap (warn, then stop), skipped updates in a row (stop),
the chunk seeds; then each of the three stops caused in a real run of the tiny config. The real syncs
compare checksums in tests/test_sync.py; every docstring example of these modules runs in
tests/test_doctests.py."""

from pathlib import Path

import pytest
import torch

from rlsys.actors.weight_sync import checksum, combined
from rlsys.cluster.pool import chunk_seed
from rlsys.cluster.sync import check_received
from rlsys.loops.train import check_bad_steps, check_logprob_gap

REPO = Path(__file__).resolve().parent.parent


def test_checksums_tell_bytes_apart_and_combine_over_views():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert checksum(a) == checksum(a.clone())
    assert checksum(a) != checksum(torch.tensor([1.0, 2.0, 3.0]))  # one sign bit
    assert checksum(a) != checksum(torch.tensor([1.0, -2.0, 3.0000002]))  # one mantissa bit
    b = torch.arange(1, 11, dtype=torch.uint8)
    assert checksum(b) == sum((i + 1) * 256 ** (i % 8) for i in range(10))  # by hand: words of 8 bytes, summed
    assert combined([checksum(b[:3]), checksum(b[3:], offset=3)]) == checksum(b)


def test_a_bucket_received_with_another_checksum_stops_the_run_naming_it():
    check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 9]]})  # every worker got every bucket
    with pytest.raises(RuntimeError, match=r"generator 1 worker 1 received bucket 1 with checksum 8, the learners sent 9"):
        check_received([7, 9], {0: [[7, 9]], 1: [[7, 9], [7, 8]]})
    with pytest.raises(RuntimeError, match=r"generator 0 worker 0 received bucket 1 with checksum None"):
        check_received([7, 9], {0: [[7]]})  # a bucket missing


def test_logprob_gap_warns_then_stops(capsys):
    check_logprob_gap(0, {"gen_logprob_abs_diff": 0.05}, warn=0.1, stop=1.0)
    assert capsys.readouterr().out == ""
    check_logprob_gap(1, {"gen_logprob_abs_diff": 0.2}, warn=0.1, stop=1.0)
    assert "log-prob gap 0.2 > trainer.logprob_gap_warn=0.1" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="differ from the learner's by 1.5 per token"):
        check_logprob_gap(3, {"gen_logprob_abs_diff": 1.5}, warn=0.1, stop=1.0)


def test_skipped_updates_in_a_row_stop_past_the_limit():
    streak = 0
    for step, skipped in enumerate([1.0, 0.0, 1.0, 2.0]):
        streak = check_bad_steps(step, {"skipped_updates": skipped}, streak=streak, limit=2)
    assert streak == 2  # steps 2 and 3; the clean step 1 reset the count
    with pytest.raises(RuntimeError, match=r"3 steps in a row \(steps 2-4\), more than learner.max_bad_steps=2"):
        check_bad_steps(4, {"skipped_updates": 1.0}, streak=streak, limit=2)


def test_chunk_seeds_depend_on_the_chunk_not_on_the_engine():
    assert chunk_seed(0, 3, 1) == 3679268941  # numpy's SeedSequence: the same on every machine and engine
    assert len({chunk_seed(0, 3, c) for c in range(8)} | {chunk_seed(1, 3, 0), chunk_seed(0, 4, 0)}) == 10


# ---------------------------------------------------------------- each stop, in a real run

def _tiny(tmp_path, *overrides):
    from rlsys.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [f"trainer.output_dir={tmp_path}", "trainer.total_steps=3",
                                                         "trainer.progress=false", *overrides])


def _steps_logged(run_dir) -> list[int]:
    from rlsys.observe.metrics import read_jsonl

    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_a_real_run_stops_when_the_generators_logprobs_leave_the_learners(ray_cluster, tmp_path):
    """The real gap of a real step (fp32 on CPU: small, never 0) against thresholds below it: the step
    warns, then stops the run naming the gap and the setting."""
    from rlsys.loops.train import train

    with pytest.raises(RuntimeError, match=r"step 0: the generators' log-probs differ from the learner's by "
                                           r"\S+ per token on average \(trainer.logprob_gap_stop=1e-12\)"):
        train(_tiny(tmp_path, "trainer.logprob_gap_warn=1e-13", "trainer.logprob_gap_stop=1e-12"))
    assert _steps_logged(tmp_path) == []


def test_a_real_run_stops_when_a_bucket_arrives_with_another_checksum(ray_cluster, tmp_path, monkeypatch):
    """The second push of a real run: the driver's record of what the learners sent has one bit of bucket
    0's checksum flipped, as a bit flipped on the wire would leave every engine's differing. The
    comparison of every engine worker's checksums stops the run after step 0, naming engine and bucket."""
    from rlsys.cluster.sync import WeightSync
    from rlsys.loops.train import train

    pushes, real = [], WeightSync._sent

    def flipped(self, per_rank):
        sent = real(self, per_rank)
        pushes.append(len(sent))
        return [sent[0] ^ 1, *sent[1:]] if len(pushes) == 2 else sent  # push 1 is the initial weights' sync

    monkeypatch.setattr(WeightSync, "_sent", flipped)
    with pytest.raises(RuntimeError, match=r"weight sync: generator \d worker 0 received bucket 0 with checksum \d+, "
                                           r"the learners sent \d+ \(buckets differ: \[0\]\)"):
        train(_tiny(tmp_path))
    assert len(pushes) == 2 and _steps_logged(tmp_path) == [0]  # step 0 was logged before its push


def test_a_real_run_stops_after_too_many_non_finite_updates(ray_cluster, tmp_path, monkeypatch):
    """A real NaN: the learners get advantages of NaN from step 1 on, their loss is NaN, each update is
    skipped (weights and Adam's moments untouched), and past learner.max_bad_steps=1 the run stops
    naming the steps."""
    import rlsys.loops.train as loop

    real = loop.make_batch

    def poisoned(rollouts, rewards, algo):
        batch = real(rollouts, rewards, algo)
        if min(r.weight_version for r in rollouts) >= 1:  # step 0 trains; steps 1 and 2 get NaN advantages
            batch.advantages[:] = float("nan")
        return batch

    monkeypatch.setattr(loop, "make_batch", poisoned)
    with pytest.raises(RuntimeError, match=r"step 2: updates skipped for a non-finite loss or gradient norm in 2 steps "
                                           r"in a row \(steps 1-2\), more than learner.max_bad_steps=1"):
        loop.train(_tiny(tmp_path, "learner.max_bad_steps=1"))
    assert _steps_logged(tmp_path) == [0, 1]
