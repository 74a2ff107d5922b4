"""GRPO learns, not just runs: configs/toy.yaml (a random tiny model on the digit-copy toy task)
starts near zero reward and rises clearly, through the real actors."""

import statistics

from pathlib import Path

from rlsys.config import load_config
from rlsys.observe.metrics import read_jsonl
from rlsys.loops.train import train


def test_grpo_raises_reward_on_the_toy_task(ray_cluster, tmp_path):
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "toy.yaml", [f"trainer.output_dir={tmp_path}", "trainer.total_steps=100",
                                       "trainer.progress=false"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows]
    assert [r["weight_version"] for r in rows] == list(range(1, 101))
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-10:])
    assert first < 0.2, f"the toy task should start near zero reward, got {first:.3f}"
    assert last > 0.8, f"mean reward of the last 10 steps {last:.3f} (first 3: {first:.3f}): GRPO did not learn"
