"""Faults a long run meets, caused for real from outside, as a user (or a cloud) would cause them.

Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from rlsys.cluster.local import Background
from rlsys.observe.metrics import read_jsonl

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parent.parent
RLSYS = Path(sys.executable).with_name("rlsys")


def test_a_generator_killed_with_kill_9_is_replaced_and_the_run_finishes(tmp_path):
    """kill -9 of one generator's process after the first step: the step it hits loses nothing (its
    prompts go to the other engine, or it leaves before the weight push), a new engine starts,
    receives the current weights and joins, and every step completes with every prompt once."""
    # enough steps (about 2 s each) for the replacement to start (15-40 s with vLLM on 2 busy cores) and join
    run_dir, steps = tmp_path / "run", 40
    with Background([str(RLSYS), "train", "configs/tiny.yaml", f"trainer.total_steps={steps}",
                     f"trainer.output_dir={run_dir}", "trainer.progress=false"], tmp_path / "driver.log", REPO) as run:
        run.wait_until("the first step", lambda: (run_dir / "metrics.jsonl").is_file()
                       and bool(read_jsonl(run_dir / "metrics.jsonl")), timeout=400)
        victim = next(a for a in json.loads((run_dir / "placement.json").read_text())
                      if a["role"] == "generator" and a["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        code = run.wait(timeout=600)
    out = run.output()
    assert code == 0, out[-5000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps))
    assert [m["rollouts/count"] for m in metrics] == [64] * steps  # 8 prompts x 8 samples, none lost or doubled
    assert [(m["rollout/weight_version"], m["weight_version"]) for m in metrics] == [(s, s + 1) for s in range(steps)]
    events = [e for p in read_jsonl(run_dir / "pool.jsonl") for e in p["events"]]
    [lost] = [e for e in events if e["event"] == "lost"]
    assert lost["engine"] == 1, lost
    assert [e["engine"] for e in events if e["event"] == "request" and e["why"] == "replace"] == [2]
    joins = [e for e in events if e["event"] == "join"]
    assert len(joins) == 1, f"the replacement never joined in {steps} steps: {events}\n{out[-3000:]}"
    [joined] = joins
    assert joined["engine"] == 2 and joined["step"] > lost["step"]
    assert [m["pool/size"] for m in metrics if m["step"] >= joined["step"]] == [2] * (steps - joined["step"])
    generators = [a for a in json.loads((run_dir / "placement.json").read_text()) if a["role"] == "generator"]
    assert sorted(a["rank"] for a in generators) == [0, 2] and victim["pid"] not in {a["pid"] for a in generators}


def test_a_reward_worker_killed_is_replaced_and_its_samples_scored_again(ray_cluster):
    from rlsys.cluster.groups import RewardPool
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
    with pytest.raises(RuntimeError, match="2 reward worker deaths in this run, cluster.max_actor_restarts=1"):
        pool.score(rollouts)
