"""The sandbox pool (rlsys.cluster.sandboxes): programs judged by sandbox worker actors, each distinct
program once; tests split over the workers when there are fewer programs than workers; a worker that
dies or hangs replaced and its run done again elsewhere; the pool grows while runs wait and shrinks
back; the scores the code reward pays from it."""

import json
import os
import signal
import sys
import time

import pytest
import ray

from rlsys.actors.sandbox_worker import SandboxWorker
from rlsys.cluster.remote import Placed, SandboxActor
from rlsys.cluster.rewards import CodeRewardPool
from rlsys.cluster.sandboxes import SandboxPool
from rlsys.config import CodeConfig, RewardConfig
from rlsys.sandbox.judge import judge_program, limits_of
from rlsys.types import Rollout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's per-run uids need root")
CODE = CodeConfig(wall_s=4.0)
ADD = json.dumps({"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15",
                            "assert add(0, 0) == 0"]})
RIGHT, WRONG = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"


class SlowOnMarker(SandboxWorker):
    """A worker that hangs (outside its sandbox: the worker itself) on a program holding HANG_WORKER,
    and records every program it ran in a file, so the test sees which runs happened where."""

    def __init__(self, code_cfg, log_path):
        super().__init__(code_cfg)
        self.log_path = log_path

    def run(self, code, tests, indices, setup=""):
        with open(self.log_path, "a") as f:
            f.write(json.dumps([os.getpid(), code[:20], indices]) + "\n")
        if "HANG_WORKER" in code:
            time.sleep(3600)
        if "KILL_WORKER_WITH_ANOTHER" in code and not os.path.exists(self.log_path + ".killed"):
            # killed once the worker's other run is in flight beside this one
            deadline = time.monotonic() + 30
            while sum(pid == os.getpid() for pid, _, _ in runs_logged(self.log_path)) < 2:
                assert time.monotonic() < deadline, "the worker's second run never came"
                time.sleep(0.05)
        if "KILL_WORKER" in code and first_time(self.log_path + ".killed"):  # one kill, however many runs race
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(code, tests, indices, setup)


@ray.remote
class Recording(Placed, SlowOnMarker):
    pass


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor above: tests/ is no package on workers


def first_time(marker):
    """True for the one caller that creates `marker` (O_EXCL: atomic across the workers' processes)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def runs_logged(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def pool_of(make, workers=2, max_workers=2, backlog=4, timeout_s=20.0, max_restarts=3, runs_per_worker=1):
    pool = SandboxPool(make, workers, max_workers, backlog, limits_of(CODE), timeout_s, start_timeout_s=120,
                       max_restarts=max_restarts, runs_per_worker=runs_per_worker)
    pool.wait_ready()
    return pool


def test_pool_judges_as_the_sandbox_does_each_program_once_and_splits_tests_over_free_workers(ray_cluster, tmp_path):
    log = str(tmp_path / "runs.jsonl")
    pool = pool_of(lambda n: Recording.options(num_cpus=0.5, max_concurrency=n).remote(CODE, log))
    try:
        # One program, two workers: its 4 tests go in two parts of 2, one per worker; the verdict is the one
        # a single sandbox run gives.
        [got] = pool.judge([(WRONG, ADD)])
        local = SandboxWorker(CODE)
        want = judge_program(local.sandbox, WRONG, ADD, local.limits)
        local.close()
        assert (got.passed, got.total, got.reason) == (want.passed, want.total, want.reason) == \
            (1, 4, "test 0: AssertionError")
        parts = sorted(indices for _, _, indices in runs_logged(log))
        assert parts == [[0, 1], [2, 3]] and len({pid for pid, _, _ in runs_logged(log)}) == 2
        m = pool.take_metrics()
        assert (m["sandbox/programs"], m["sandbox/runs"], m["sandbox/cache_hits"]) == (1, 2, 0)
        assert m["sandbox/seconds"] > 0 and m["sandbox/workers"] == 2
        # A group of 8 answers, 3 distinct programs (one of them seen before) and one without code: two
        # programs run, whole (more programs than workers: no split); the rest come from the cache.
        group = [(RIGHT, ADD), (RIGHT, ADD), (WRONG, ADD), (None, ADD), ("def add(a, b): return 3", ADD)] + \
            [(RIGHT, ADD)] * 3
        verdicts = pool.judge(group)
        assert [(v.passed, v.total) for v in verdicts] == [(4, 4), (4, 4), (1, 4), (0, 4), (1, 4)] + [(4, 4)] * 3
        assert verdicts[3].reason.startswith("no code found")
        new_runs = runs_logged(log)[2:]
        assert sorted((code, indices) for _, code, indices in new_runs) == \
            [(RIGHT[:20], [0, 1, 2, 3]), ("def add(a, b): retur", [0, 1, 2, 3])]
        m = pool.take_metrics()
        assert (m["sandbox/programs"], m["sandbox/runs"], m["sandbox/cache_hits"]) == (2, 2, 5)
        assert pool.take_metrics()["sandbox/runs"] == 0  # counted since the last take
    finally:
        pool.close()


def test_a_worker_that_dies_or_hangs_is_replaced_and_the_run_done_again(ray_cluster, tmp_path):
    log = str(tmp_path / "runs.jsonl")
    pool = pool_of(lambda n: Recording.options(num_cpus=0.5, max_concurrency=n).remote(CODE, log), timeout_s=10.0,
                   max_restarts=3)
    try:
        # killed once (the marker file makes the second try live): the run goes again and passes
        killer = RIGHT + "\n# KILL_WORKER"
        [got] = pool.judge([(killer, ADD)])
        assert (got.passed, got.total) == (4, 4)
        assert pool.restarts == 1 and len(pool.ready) + len(pool.starting) == 2
        # a worker hung (past reward.timeout_s) on both tries: the run is judged failed with the reason,
        # the other program of the call is judged as usual, and the pool still serves
        hang = RIGHT + "\n# HANG_WORKER"
        t0 = time.monotonic()
        verdicts = pool.judge([(hang, ADD), (WRONG, ADD)])
        assert time.monotonic() - t0 < 60
        assert (verdicts[0].passed, verdicts[1].passed) == (0, 1)
        assert "its sandbox worker gave no result within 10s (reward.timeout_s), 2 times" in verdicts[0].reason
        assert pool.restarts == 3
        pool.wait_ready()
        [again] = pool.judge([("def add(a, b):\n    return b + a", ADD)])
        assert again.passed == 4
        # a fourth failure is past cluster.max_actor_restarts=3: the run stops, naming it
        with pytest.raises(RuntimeError, match="4 sandbox worker failures in this run, cluster.max_actor_restarts=3"):
            pool.judge([(hang + "\n# another", ADD)])
    finally:
        pool.close()


def test_a_worker_runs_two_programs_at_once_and_when_it_dies_both_go_again(ray_cluster, tmp_path):
    """reward.code.runs_per_worker=2: one worker (a threaded actor) has both programs in flight at once;
    killed during them (the other one sleeps 2 s in its sandbox, so it is still running), it is replaced
    once, and both runs are done again on the new worker."""
    log = str(tmp_path / "runs.jsonl")
    pool = pool_of(lambda n: Recording.options(num_cpus=0.5, max_concurrency=n).remote(CODE, log), workers=1,
                   max_workers=1, runs_per_worker=2)
    try:
        killer, other = RIGHT + "\n# KILL_WORKER_WITH_ANOTHER", "import time\ntime.sleep(2)\n" + RIGHT
        verdicts = pool.judge([(killer, ADD), (other, ADD)])
        assert [(v.passed, v.total, v.reason) for v in verdicts] == [(4, 4, ""), (4, 4, "")]
        runs = runs_logged(log)
        first, second = {pid for pid, _, _ in runs[:2]}, {pid for pid, _, _ in runs[2:]}
        assert len(runs) == 4 and len(first) == 1 and len(second) == 1 and first != second  # 2 at once, twice
        assert sorted(code for _, code, _ in runs[2:]) == sorted([killer[:20], other[:20]])
        assert pool.restarts == 1
    finally:
        pool.close()


def test_the_pool_grows_while_runs_wait_and_shrinks_back(ray_cluster):
    pool = pool_of(lambda n: SandboxActor.options(num_cpus=0.5, max_concurrency=n).remote(CODE), workers=1,
                   max_workers=3, backlog=2)
    try:
        programs = [(f"def add(a, b):\n    return a + b + {i} - {i}", ADD) for i in range(12)]
        assert [v.passed for v in pool.judge(programs)] == [4] * 12  # 12 runs > 2 per worker: one more asked
        pool.wait_ready()
        assert len(pool.ready) == 2
        pool.judge(programs[:1] + [(RIGHT + "\n# new", ADD)] * 1)  # 1 run (and a cache hit) fits one worker fewer
        assert len(pool.ready) == 1  # never below reward.code.workers
        pool.judge([(RIGHT + "\n# once more", ADD)])
        assert len(pool.ready) == 1
    finally:
        pool.close()


def test_code_reward_pool_pays_accuracy_from_the_sandbox_and_format_on_the_driver(ray_cluster):
    pool = pool_of(lambda n: SandboxActor.options(num_cpus=0.5, max_concurrency=n).remote(CODE))
    try:
        cfg = RewardConfig(verifier="code", accuracy_weight=0.8, format_weight=0.2, require_answer_tag=True,
                           code=CODE)
        answer = "<think> add them </think> <answer>\n```python\n{}\n```\n</answer>"

        def rollout(text):
            return Rollout(prompt_index=0, group=0, prompt_ids=[1], response_ids=[2], response_logprobs=[0.0],
                           text=text, finish_reason="stop", weight_version=0, answer=ADD)

        scored = CodeRewardPool(pool, "", cfg).score([rollout(answer.format(RIGHT)), rollout(answer.format(WRONG)),
                                                     rollout(f"```python\n{RIGHT}\n```")])
        assert [(r.accuracy, r.format, r.reward) for r in scored] == \
            [(1.0, 1.0, pytest.approx(1.0)), (0.0, 1.0, pytest.approx(0.2)), (1.0, 0.0, pytest.approx(0.8))]
        partial = CodeRewardPool(pool, "", RewardConfig(verifier="code", accuracy_weight=1.0, format_weight=0.0,
                                                        code=CodeConfig(wall_s=4.0, partial=True)))
        assert [r.accuracy for r in partial.score([rollout(answer.format(WRONG))])] == [0.25]
    finally:
        pool.close()


def test_a_code_run_judges_with_the_sandbox_workers_in_place_of_the_reward_workers(tmp_path):
    """`rlsys train` on the generated code problems: the sandbox workers are started (placement
    role sandbox), no reward worker is, and every step logs the pool's metrics. (The tiny random model
    writes no code block, so no program runs here: tests above judge programs through the same pool.)"""
    import subprocess

    from rlsys.observe.metrics import read_jsonl

    out = tmp_path / "run"
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "rlsys"), "train", "configs/tiny.yaml",
                           "data.name=code_functions", "reward.verifier=code", "generator.max_model_len=1024",
                           "trainer.total_steps=2", "reward.code.workers=2", f"trainer.output_dir={out}",
                           "trainer.progress=false"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 sandbox workers ready" in proc.stdout
    roles = sorted((p["role"], p["rank"]) for p in json.loads((out / "placement.json").read_text()))
    assert roles == [("generator", 0), ("generator", 1), ("learner", 0), ("learner", 1), ("sandbox", 0),
                     ("sandbox", 1)]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["sandbox/workers"] for r in rows] == [2.0, 2.0] and all(r["sandbox/restarts"] == 0 for r in rows)
    assert all(r["sandbox/programs"] + r["sandbox/cache_hits"] <= r["rollouts/count"] for r in rows)
