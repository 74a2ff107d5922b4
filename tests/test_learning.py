"""GRPO learns, not just runs, through the real actors: configs/toy.yaml (a random tiny model on the
digit-copy toy task) starts near zero reward and rises clearly; configs/r1_zero_sums.yaml, shortened,
raises held-out accuracy on a task SmolLM2-135M mostly fails."""

import json
import statistics

from pathlib import Path

from rlsys.config import load_config
from rlsys.observe.metrics import read_jsonl
from rlsys.loops.train import train

REPO = Path(__file__).resolve().parent.parent


def test_grpo_raises_reward_on_the_toy_task(ray_cluster, tmp_path):
    cfg = load_config(REPO / "configs" / "toy.yaml", [f"trainer.output_dir={tmp_path}", "trainer.total_steps=100",
                                       "trainer.progress=false"])
    rows = read_jsonl(train(cfg) / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows]
    assert [r["weight_version"] for r in rows] == list(range(1, 101))
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-10:])
    assert first < 0.2, f"the toy task should start near zero reward, got {first:.3f}"
    assert last > 0.8, f"mean reward of the last 10 steps {last:.3f} (first 3: {first:.3f}): GRPO did not learn"


# The learning config (configs/r1_zero_sums.yaml), shortened to about 13 minutes on 2 cores: 5 steps,
# each rollout batch of 64 answers split into 4 optimizer steps of 16 (R1 splits each rollout batch
# into 16 mini-batches; the config takes one step a batch), answers up to 64 tokens; held-out
# evaluation greedy (temperature 0) on all 200 held-out problems, before and after. Greedy, because a
# sampled evaluation's noise hid the gain: the same untrained weights scored 0.14 and 0.23 pass@1
# (50 problems x 2 samples) under two seeds, and the two seeds' gains after these 5 steps read
# +0.05 and +0.02 sampled against +0.135 and +0.13 greedy. Greedy gains of three seeds: +0.135, +0.13,
# +0.05 (0.22 untrained, the same for every seed); the margin, +0.03 (6 of 200 problems), is below the
# smallest, for a CPU whose rounding sends training down a weaker path, and far above what a frozen
# policy shows: exactly 0. benchmarks/learning_test_margin.py runs exactly these overrides for several
# seeds (docs/learning.md, "The test that the config learns").
SUMS_STEPS = 5
SUMS_OVERRIDES = [f"trainer.total_steps={SUMS_STEPS}", f"eval.every={SUMS_STEPS}", "eval.limit=200", "eval.k=1",
                  "eval.temperature=0", "eval.top_p=1.0", "generator.max_tokens=64", "learner.mini_batch_size=16",
                  "trainer.progress=false"]
SUMS_MARGIN = 0.03


def test_the_sums_config_raises_held_out_accuracy(ray_cluster, tmp_path):
    """Held-out greedy accuracy on sums_2x2_test (never trained on) rises by SUMS_MARGIN over the untrained
    policy's. It cannot pass for a frozen policy: greedy decoding of the same weights gives the same
    answers, so the same score at step 0 and at the end."""
    cfg = load_config(REPO / "configs" / "r1_zero_sums.yaml",
                      SUMS_OVERRIDES + [f"trainer.output_dir={tmp_path}", "trainer.seed=0"])
    run = train(cfg)
    before = json.loads((run / "evals" / "step_0.json").read_text())
    after = json.loads((run / "evals" / f"step_{SUMS_STEPS}.json").read_text())
    assert before["problems"] == after["problems"] == 200 and before["k"] == after["k"] == 1
    assert before["temperature"] == after["temperature"] == 0.0
    assert before["pass@1"] < 0.3, f"untrained accuracy {before['pass@1']}: the task should be one the model mostly fails"
    assert after["pass@1"] >= before["pass@1"] + SUMS_MARGIN, (
        f"held-out pass@1 {before['pass@1']:.3f} -> {after['pass@1']:.3f} after {SUMS_STEPS} steps: "
        f"less than the +{SUMS_MARGIN} margin, RL did not raise accuracy")
