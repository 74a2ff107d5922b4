"""Reward: samples/s of the reward pool, and what the timeout machinery costs.

Samples are R1-format completions for GSM8K test questions, half with the gold answer and half
with a wrong one, scored by the real rules (format + math-verify accuracy).
- The pool: RewardPool over RewardActors on the Ray cluster, 1 and 2 workers.
- The timeout machinery: a RewardWorker (a killable child process, one pipe round trip per
  sample, a per-sample deadline) against calling the same rule in-process, no protection
  (rlsys.math.rewards.score in a loop), on the same samples. The ratio is what the protection against
  a hanging verifier costs.

    python benchmarks/reward.py [--quick]
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, main, ray_up, rlsys_config, timed


def samples(count: int) -> list[tuple[str, str]]:
    from rlsys.data import datasets

    rows = datasets.load("gsm8k", "test", limit=count)
    out = []
    for i, (question, gold) in enumerate(rows):
        answer = gold if i % 2 == 0 else f"{gold}1"
        out.append((f"<think> {question[:200]} so the result is {answer}. </think> <answer> {answer} </answer>",
                    gold))
    return out


def run(quick: bool) -> Section:
    import ray

    from rlsys.cluster.groups import RewardActor, RewardPool
    from rlsys.actors.reward_worker import RewardWorker
    from rlsys.math.rewards import score
    from rlsys.types import Rollout

    count = 256 if quick else 1024
    repeats = 2 if quick else 3
    batch = samples(count)
    section = Section("reward", {"samples": count, "repeats": repeats, "rule": "format + math-verify accuracy"})
    cfg = rlsys_config(["reward.verifier=math"]).reward

    def direct():
        return [score(c, g, cfg) for c, g in batch]

    with RewardWorker(cfg) as worker:
        direct(), worker.score(batch[:8])  # warm-up: math-verify's imports and caches
        protected_s, results = timed(lambda: worker.score(batch), repeats)
        direct_s, plain = timed(direct, repeats)
    assert [(r.accuracy, r.format) for r in results] == plain, "the worker and the plain rule disagree"
    assert sum(r.accuracy for r in results) == count // 2, "half the samples are right by construction"
    section.figures.append(Figure(
        "reward worker (killable child, per-sample timeout) samples/s", count / protected_s, "samples/s",
        "the same rule called in-process, no timeout protection", count / direct_s,
        note="1 - ratio = the cost of the timeout machinery"))
    section.rows.append({"what": "timeout_machinery", "protected_s": protected_s, "direct_s": direct_s})

    ray_up()
    rollouts = [Rollout(i, i, [], [], [], c, "stop", 0, g) for i, (c, g) in enumerate(batch)]
    rates = {}
    for workers in (1, 2):
        actors = [RewardActor.options(num_cpus=cfg.num_cpus).remote(cfg) for _ in range(workers)]
        try:
            pool = RewardPool(actors)
            pool.score(rollouts[:8 * workers])  # warm-up
            seconds, _ = timed(lambda: pool.score(rollouts), repeats)
        finally:
            for a in actors:
                ray.kill(a)
        rates[workers] = count / seconds
        section.rows.append({"what": "pool", "workers": workers, "samples_per_s": rates[workers]})
        print(f"[reward] pool of {workers}: {rates[workers]:.0f} samples/s", flush=True)
    section.figures.append(Figure("reward pool, 2 workers samples/s", rates[2], "samples/s",
                                  "reward pool, 1 worker, same samples", rates[1]))
    return section


if __name__ == "__main__":
    main(run)
