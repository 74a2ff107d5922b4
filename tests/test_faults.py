"""Faults a long run meets, caused for real from outside, as a user (or a cloud) would cause them.

Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsys.checkpoint import write_trainer_state
from rlsys.cluster.local import Background
from rlsys.observe.metrics import read_jsonl

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parent.parent
RLSYS = Path(sys.executable).with_name("rlsys")


def test_a_generator_killed_with_kill_9_is_replaced_and_the_run_goes_on(tmp_path):
    """kill -9 of one generator's process after the first step: the step it hits loses nothing (its
    prompts go to the other engine, or it leaves before the weight push), a new engine starts,
    receives the current weights and joins, and every step completes with every prompt once. Bound by
    events, not a step count: the run (total_steps far beyond what it needs) is stopped with SIGTERM
    three steps after the replacement joined, however many steps that took on this machine; the stop
    itself must checkpoint the last step and exit 0."""
    run_dir, after_join = tmp_path / "run", 3

    def pool_events() -> list[dict]:
        pool = run_dir / "pool.jsonl"
        return [dict(e, logged=p["step"]) for p in read_jsonl(pool) for e in p["events"]] if pool.is_file() else []

    def steps_logged() -> int:
        return len(read_jsonl(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").is_file() else 0

    def joined_and_ran_on() -> bool:
        joins = [e for e in pool_events() if e["event"] == "join"]
        return bool(joins) and steps_logged() > joins[0]["logged"] + after_join

    with Background([str(RLSYS), "train", "configs/tiny.yaml", "trainer.total_steps=1000",
                     f"trainer.output_dir={run_dir}", "trainer.progress=false"], tmp_path / "driver.log", REPO) as run:
        run.wait_until("the first step", lambda: steps_logged() > 0, timeout=400)
        victim = next(a for a in json.loads((run_dir / "placement.json").read_text())
                      if a["role"] == "generator" and a["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        run.wait_until(f"the replacement's join and {after_join} steps after it", joined_and_ran_on, timeout=600)
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(timeout=300)
    out = run.output()
    assert code == 0, out[-5000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = len(metrics)
    assert [m["step"] for m in metrics] == list(range(steps))
    assert re.search(rf"\[rlsys\] stopped after step {steps - 1} on signal 15", out), out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"  # the stop saved its step
    assert [m["rollouts/count"] for m in metrics] == [64] * steps  # 8 prompts x 8 samples, none lost or doubled
    assert [(m["rollout/weight_version"], m["weight_version"]) for m in metrics] == [(s, s + 1) for s in range(steps)]
    events = pool_events()
    [lost] = [e for e in events if e["event"] == "lost"]
    assert lost["engine"] == 1, lost
    assert [e["engine"] for e in events if e["event"] == "request" and e["why"] == "replace"] == [2]
    [joined] = [e for e in events if e["event"] == "join"]
    assert joined["engine"] == 2 and joined["step"] > lost["step"]
    assert [m["pool/size"] for m in metrics if m["step"] >= joined["step"]] == [2] * (steps - joined["step"])
    generators = [a for a in json.loads((run_dir / "placement.json").read_text()) if a["role"] == "generator"]
    assert sorted(a["rank"] for a in generators) == [0, 2] and victim["pid"] not in {a["pid"] for a in generators}


def test_a_reward_worker_killed_is_replaced_and_its_samples_scored_again(ray_cluster):
    from rlsys.cluster.rewards import RewardPool
    from rlsys.cluster.remote import RewardActor
    from rlsys.config import RewardConfig
    from rlsys.types import Rollout

    ray = ray_cluster
    cfg = RewardConfig(verifier="math")

    def worker():
        return RewardActor.options(num_cpus=0).remote(cfg)

    pool = RewardPool([worker(), worker()], make=worker, max_restarts=1)
    texts = ["<think>2+2</think> <answer>4</answer>", "<answer>5</answer>", "no tags 4", "<answer>3</answer>"]
    rollouts = [Rollout(prompt_index=i, group=i, prompt_ids=[1], response_ids=[2], response_logprobs=[0.0], text=t,
                        finish_reason="stop", weight_version=0, answer="4") for i, t in enumerate(texts)]
    before = [r.accuracy for r in pool.score(rollouts)]
    assert before == [1.0, 0.0, 1.0, 0.0]
    os.kill(ray.get(pool.actors[1].whereami.remote())["pid"], signal.SIGKILL)  # the worker of samples 2 and 3
    assert [r.accuracy for r in pool.score(rollouts)] == before and pool.restarts == 1
    os.kill(ray.get(pool.actors[0].whereami.remote())["pid"], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="2 reward worker failures in this run, cluster.max_actor_restarts=1"):
        pool.score(rollouts)


BUSY = '''
def busy_forever(completion, gold, cfg):
    """A verifier stuck in a busy loop (a pathological answer, a regex that backtracks forever)."""
    while True:
        pass
'''


def test_a_hung_reward_worker_is_replaced_and_its_busy_verifier_child_dies_with_it(ray_cluster, tmp_path,
                                                                                    monkeypatch):
    """Worker 0's verifier spins forever (its per-sample limit set far away, so only the pool's
    deadline can notice); worker 1 is frozen with SIGSTOP. Both miss deadlines.score_s: they are
    killed with their verifier children, replaced, and every sample is scored by the new ones.
    (Ray kills a dead worker's child processes; the test below covers a worker outside Ray.)"""
    import psutil

    from rlsys.cluster.rewards import RewardPool
    from rlsys.cluster.remote import RewardActor
    from rlsys.config import RewardConfig
    from rlsys.types import Rollout

    ray = ray_cluster
    cfg = RewardConfig(verifier="math", timeout_s=3600)

    def worker():
        return RewardActor.options(num_cpus=0).remote(cfg)

    (tmp_path / "busy_scorer.py").write_text(BUSY)  # importable by the actor and its verifier child
    monkeypatch.syspath_prepend(str(tmp_path))
    from busy_scorer import busy_forever

    busy = RewardActor.options(num_cpus=0, runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}}).remote(
        cfg, busy_forever)
    pool = RewardPool([busy, worker()], make=worker, max_restarts=2, timeout_s=5)
    pids = [ray.get(a.whereami.remote())["pid"] for a in pool.actors]
    children = [c.pid for c in psutil.Process(pids[0]).children()]
    assert children, "the reward worker runs its verifier in a child process"
    os.kill(pids[1], signal.SIGSTOP)
    texts = ["<answer>4</answer>", "<answer>5</answer>", "<answer>4</answer>", "<answer>3</answer>"]
    rollouts = [Rollout(prompt_index=i, group=i, prompt_ids=[1], response_ids=[2], response_logprobs=[0.0], text=t,
                        finish_reason="stop", weight_version=0, answer="4") for i, t in enumerate(texts)]
    assert [r.accuracy for r in pool.score(rollouts)] == [1.0, 0.0, 1.0, 0.0]
    assert pool.restarts == 2
    deadline = time.time() + 30
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in pids + children):
        time.sleep(0.5)
    alive = [p for p in pids + children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, f"left behind: {alive}"


HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from busy_scorer import busy_forever
from rlsys.actors.reward_worker import RewardWorker
from rlsys.config import RewardConfig
worker = RewardWorker(RewardConfig(verifier="math", timeout_s=3600), busy_forever)
print(worker._proc.pid, flush=True)
worker.score([("<answer>4</answer>", "4")])
"""


def test_a_busy_verifier_child_dies_with_its_worker_outside_ray_too(tmp_path):
    """Ray kills a dead worker's children itself; a RewardWorker outside Ray (benchmarks, scripts)
    or under a raylet that died relies on PR_SET_PDEATHSIG: kill -9 of the worker process while
    its verifier child spins, and the child is gone."""
    import psutil

    (tmp_path / "busy_scorer.py").write_text(BUSY)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    time.sleep(1.0)  # the sample is in the child's busy loop
    assert psutil.Process(child).status() in ("running", "sleeping")
    holder.kill()
    holder.wait(timeout=30)
    deadline = time.time() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie" and time.time() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie", "the child outlived its worker"


def test_one_learner_rank_killed_stops_the_run_at_once_naming_its_checkpoint(tmp_path):
    """kill -9 of learner rank 1 alone right after the step-2 checkpoint, rank 0 living on (busy in
    the next step's collectives): the run stops at once, not when rank 0's collective times out
    (deadlines.train_s=600 here), naming the lost rank and that checkpoint. That the resume then
    matches an uninterrupted run is shown with the whole learner node lost, in
    tests/test_nodes_faults.py."""
    run_dir = tmp_path / "killed"
    with Background([str(RLSYS), "train", "configs/tiny.yaml", "trainer.total_steps=20", "trainer.save_every=2",
                     "trainer.keep_last=0", "trainer.progress=false", "deadlines.train_s=600",
                     f"trainer.output_dir={run_dir}"], tmp_path / "killed.log", REPO) as run:
        run.wait_until("the step-2 checkpoint", lambda: (run_dir / "checkpoints" / "latest").is_file(), timeout=400)
        rank1 = next(a for a in json.loads((run_dir / "placement.json").read_text())
                     if a["role"] == "learner" and a["rank"] == 1)
        os.kill(rank1["pid"], signal.SIGKILL)
        code = run.wait(timeout=300)  # raises if the run waited for rank 0's collective deadline (600 s)
    out = run.output()
    assert code != 0, out[-3000:]
    assert "learner 1 died during" in out, out[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"Last checkpoint: {run_dir}/checkpoints/{latest}; continue with trainer.resume=auto" in out, out[-3000:]


SAVER = """
import sys, time
from pathlib import Path
from rlsys.checkpoint import commit, write_trainer_state

def write(folder):
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)  # killed here, half-way through the checkpoint

commit(Path(sys.argv[1]), 4, write)
"""


def fake_checkpoint(folder: Path, step: int) -> None:
    (folder / "config.json").write_text("{}")
    write_trainer_state(folder, {"step": step})


def test_a_run_killed_while_it_writes_a_checkpoint_keeps_the_previous_one(tmp_path):
    """kill -9 in the middle of writing step_4: step_2 stays whole, `latest` still names it, a
    resume picks it, and the next save of step_4 starts clean."""
    from rlsys.checkpoint import TRACKER, commit, find_resumable, list_checkpoints

    commit(tmp_path, 2, lambda f: fake_checkpoint(f, 2))
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    assert (tmp_path / "checkpoints" / "step_4.partial").is_dir()
    assert sorted(list_checkpoints(tmp_path)) == [2]
    assert (tmp_path / "checkpoints" / TRACKER).read_text().strip() == "step_2"
    assert find_resumable(tmp_path) == tmp_path / "checkpoints" / "step_2"
    commit(tmp_path, 4, lambda f: fake_checkpoint(f, 4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_2", "step_4"]


def test_a_call_past_its_deadline_names_the_phase_and_actor_and_dumps_every_stack(ray_cluster, tmp_path):
    """An actor stuck in a call (here a long sleep: the same as a collective that never returns)
    makes get_all raise PhaseTimeout naming the phase, the setting and the actor; dump_stacks
    then writes each actor's Python stack, taken while it is still stuck, into the run folder."""
    from rlsys.cluster.deadlines import PhaseTimeout, dump_stacks, get_all
    from rlsys.cluster.remote import Placed

    ray = ray_cluster

    @ray.remote
    class Stuck(Placed):
        def quick(self) -> int:
            return 1

        def wait_for_peer_that_never_comes(self) -> int:
            time.sleep(600)
            return 0

    actors = [Stuck.options(num_cpus=0).remote() for _ in range(2)]
    where = ray.get([a.whereami.remote() for a in actors])
    refs = [actors[0].quick.remote(), actors[1].wait_for_peer_that_never_comes.remote()]
    with pytest.raises(PhaseTimeout, match=r"train: no result within 2s \(deadlines.train_s\) from learner 1$"):
        get_all(refs, ["learner 0", "learner 1"], "train", 2.0, "deadlines.train_s")
    records = [w | {"role": "learner", "rank": i} for i, w in enumerate(where)]
    folder = dump_stacks(records, tmp_path / "stacks")
    assert sorted(p.name for p in folder.iterdir()) == ["learner-0.txt", "learner-1.txt"]
    stuck = (folder / "learner-1.txt").read_text()
    assert "wait_for_peer_that_never_comes" in stuck, stuck
    for a in actors:
        ray.kill(a)


def test_dump_stacks_signals_only_a_live_actor_it_recorded_never_a_process_with_a_reused_pid(ray_cluster, tmp_path):
    """SIGUSR1 kills a process without the stack-dump handler. A record of an actor that was
    killed, and one whose pid a plain process now holds (a `sleep`, which SIGUSR1 would end), are
    written as not signalled, and that process lives on; the live actor beside them still dumps
    its stack. On the node too: a stack file left by a process that had the pid before does not
    get the pid's new process signalled."""
    from rlsys.cluster.deadlines import dump_stacks, process_start, signal_and_read, stack_file
    from rlsys.cluster.remote import Placed

    ray = ray_cluster

    @ray.remote
    class Busy(Placed):
        def quick(self) -> int:
            return 1

        def wait_here(self) -> None:
            time.sleep(600)

    live, killed = Busy.options(num_cpus=0).remote(), Busy.options(num_cpus=0).remote()
    where = ray.get([live.whereami.remote(), killed.whereami.remote()])
    live.wait_here.remote()
    ray.kill(killed)
    # ray.kill is asynchronous: a call sent right after can still reach the actor (CI saw one answer).
    # Ask until Ray's actor table has it dead, within a bound.
    deadline = time.time() + 60
    while True:
        try:
            ray.get(killed.quick.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.time() < deadline, "ray.kill: the actor still answers after 60 s"
        time.sleep(0.2)
    bystander = subprocess.Popen(["sleep", "600"])
    stale = stack_file(bystander.pid)  # as an actor that had this pid before would have left it
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"# rlsys stack dump of pid {bystander.pid}, process start tick 1\n")
    try:
        records = [where[0] | {"role": "learner", "rank": 0}, where[1] | {"role": "reward", "rank": 1},
                   where[0] | {"role": "reward", "rank": 0, "pid": bystander.pid}]
        folder = dump_stacks(records, tmp_path / "stacks")
        texts = {p.name: p.read_text() for p in folder.iterdir()}
        assert sorted(texts) == ["learner-0.txt", "reward-0.txt", "reward-1.txt"]
        assert "wait_here" in texts["learner-0.txt"], texts["learner-0.txt"]
        for name in ("reward-0.txt", "reward-1.txt"):
            assert "it died or was replaced; not signalled" in texts[name], texts[name]
        # The node's own check, for a pid that Ray's table would still show as the actor's:
        text = signal_and_read(bystander.pid, 1.0)
        assert text == (f"(process {bystander.pid} that installed the stack dump is another process "
                        f"(started at tick {process_start(bystander.pid)}, the actor's at 1): not signalled)"), text
        time.sleep(0.5)
        assert bystander.poll() is None, f"the process that reused the pid got SIGUSR1 (exit {bystander.returncode})"
        bystander.kill()
        bystander.wait()
        assert signal_and_read(bystander.pid, 1.0) == (f"(process {bystander.pid} that installed the stack dump is "
                                                       f"gone: not signalled)")
    finally:
        bystander.kill()
        stale.unlink()
        ray.kill(live)


def test_a_stack_deeper_than_faulthandler_prints_is_dumped_whole(ray_cluster, tmp_path):
    """faulthandler prints a thread's innermost 100 frames and cuts the rest, the outermost frames
    that name the call the actor is in (CI saw a generator in a torch.compile lose its rlsys frames
    this way). An actor waiting 150 calls deep: its file has faulthandler's cut dump, without the
    method's name, then py-spy's whole stack, with it."""
    from rlsys.cluster.deadlines import FAULTHANDLER_CUT, dump_stacks
    from rlsys.cluster.remote import Placed

    ray = ray_cluster

    def dig(n: int) -> None:
        if n:
            return dig(n - 1)
        time.sleep(600)

    @ray.remote
    class Deep(Placed):
        def wait_150_calls_deep(self) -> None:
            dig(150)

    actor = Deep.options(num_cpus=0).remote()
    try:
        where = ray.get(actor.whereami.remote())
        actor.wait_150_calls_deep.remote()
        time.sleep(2)  # in its sleep, 150 frames down
        folder = dump_stacks([where | {"role": "learner", "rank": 0}], tmp_path / "stacks")
        text = (folder / "learner-0.txt").read_text()
        cut, _, whole = text.partition("# faulthandler cut a stack at 100 frames; py-spy's full dump:")
        assert FAULTHANDLER_CUT in cut.splitlines(), text[:3000]
        assert "wait_150_calls_deep" not in cut, cut[-3000:]
        assert "wait_150_calls_deep" in whole, text[-3000:]
        assert whole.count("dig (") >= 150, whole[-3000:]
    finally:
        ray.kill(actor)


def test_a_phase_past_its_deadline_stops_the_run_with_the_stacks_in_the_run_folder(tmp_path):
    """deadlines.generate_s far below what generating takes: the run stops at its first step with
    a message naming the phase and the engines still generating, and the stack of every actor is
    in <run_dir>/stacks/."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(RLSYS), "train", "configs/tiny.yaml", "trainer.total_steps=2",
                           f"trainer.output_dir={run_dir}", "trainer.progress=false", "deadlines.generate_s=0.05"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr
    assert "generate: no result within 0.05s (deadlines.generate_s) from generator" in err, err[-3000:]
    assert f"every actor's stack is in {run_dir}/stacks/" in err, err[-3000:]
    names = sorted(p.name for p in (run_dir / "stacks").iterdir())
    assert names == ["generator-0.txt", "generator-1.txt", "learner-0.txt", "learner-1.txt", "reward-0.txt",
                     "reward-1.txt"], names
    assert "generate" in (run_dir / "stacks" / "generator-0.txt").read_text()
    assert "No checkpoint was written yet" in err


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nan_on_one_rank_skips_that_update_on_every_rank(ray_cluster, zero_stage):
    """A NaN advantage in one row, which only one of two learner ranks holds: the all-reduced
    gradient is NaN on both, both skip that optimizer step (ZeRO-0 by rlsys, ZeRO-2 by DeepSpeed),
    the healthy mini-batch is applied, no weight turns NaN, and the step reports the skip."""
    from test_learner import stop, toy_batch, two_rank_group

    import torch

    lengths = [1, 9, 2, 3, 7, 4, 8, 5, 6, 2, 1, 9, 3, 3, 5, 8]
    adv = [float("nan")] + [1.0, -0.5, 0.5, 2.0, -2.0, 0.0, 1.0, -1.5, 1.5, 0.25, -0.25, 1.0, -1.0, 0.7, -0.7]
    group, pg = two_rank_group(zero_stage, ["learner.mini_batch_size=8", "learner.micro_batch_size=2",
                                            "learner.lr=1e-2"])
    try:
        before = {k: v.clone() for k, v in group.full_state_dict().items()}
        metrics = group.train(toy_batch(lengths, adv))
        after = group.full_state_dict()
    finally:
        stop(group, pg)
    assert metrics["skipped_updates"] == 1.0, metrics
    assert all(torch.isfinite(v).all() for v in after.values()), "NaN reached the weights"
    assert any(not torch.equal(before[k], after[k]) for k in before), "the healthy mini-batch was not applied"


def test_an_actor_lost_with_its_node_names_the_node():
    """ActorLost's message names where the actor was, from Ray's own message (these are Ray 2.x's
    texts for an actor whose node was declared dead and for one killed alone)."""
    from rlsys.cluster.deadlines import ActorLost

    node_gone = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: RewardActor\n"
                             "\tip: 10.213.1.5\nThe actor died because its node has died. Node Id: 3200ed\n"
                             "\tthe actor's node was terminated unexpectedly: health check failed")
    alone = RuntimeError("The actor died unexpectedly before finishing this task.\n\tip: 10.213.1.3\n"
                         "The actor is dead because its worker process has died.")
    assert str(ActorLost("reward worker 0", "reward worker start", node_gone)) == (
        "reward worker 0 died during reward worker start (RuntimeError: The actor died unexpectedly before "
        "finishing this task.; its node 10.213.1.5 is gone)")
    assert str(ActorLost("learner 1", "train", alone)).endswith("; on node 10.213.1.3)")
    assert str(ActorLost("learner 1", "train", RuntimeError("no address"))) == \
        "learner 1 died during train (RuntimeError: no address)"


def test_an_actor_lost_without_an_address_is_located_from_the_placement(ray_cluster):
    """An actor whose connection closed first reports no address: the run's placement says where it
    ran (and Ray whether that node is dead: this one is not known to Ray at all, so not said dead)."""
    from rlsys.cluster.deadlines import ActorLost, located

    placement = [{"role": "learner", "rank": 0, "ip": "10.0.0.8", "node_id": "a"},
                 {"role": "learner", "rank": 1, "ip": "10.0.0.9", "node_id": "b"},
                 {"role": "reward", "rank": 1, "ip": "10.0.0.7", "node_id": "c"}]
    closed = RuntimeError("The actor is temporarily unavailable: RpcError: Socket closed")
    assert located(ActorLost("learner 1", "train", closed), placement) == \
        "learner 1 died during train (RuntimeError: The actor is temporarily unavailable: RpcError: Socket closed) " \
        "(it ran on node 10.0.0.9)"
    assert located(ActorLost("reward worker 1", "score", closed), placement).endswith("(it ran on node 10.0.0.7)")
    assert located(ActorLost("generator 3", "generate", closed), placement) == \
        str(ActorLost("generator 3", "generate", closed))  # not in the records: nothing made up
