"""Reward: samples/s of the reward pool, and what the timeout machinery costs.

Samples are R1-format completions for GSM8K test questions, half with the gold answer and half
with a wrong one, scored by the real rules (format + math-verify accuracy).
- The pool: RewardPool over RewardActors on the Ray cluster, 1 and 2 workers.
- The timeout machinery: a RewardWorker (a killable child process, one pipe round trip per
  sample, a per-sample deadline) against calling the same rule in-process, no protection
  (rlsys.math.rewards.score in a loop), on the same samples. The ratio is what the protection against
  a hanging verifier costs.
- The sandbox (reward.verifier=code): a program judged in a fresh isolated process against the same
  program in a plain subprocess (`sandbox_figure`); target >= 0.5x.
Each figure's two sides are timed interleaved, `repeats` times each (ours, reference, ours, ...):
the figure is the median pairwise ratio with its lowest and highest (benchmarks/common.py).

    python benchmarks/reward.py [--quick]
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, interleaved, main, ray_up, rlsys_config


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

    from rlsys.cluster.remote import RewardActor
    from rlsys.cluster.rewards import RewardPool
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

    last: dict[str, list] = {}

    def rate(side: str, fn) -> Callable[[], float]:
        """One timed call of fn, as samples/s; its result kept for the agreement check."""
        def once() -> float:
            start = time.perf_counter()
            last[side] = fn()
            return count / (time.perf_counter() - start)
        return once

    with RewardWorker(cfg) as worker:
        direct(), worker.score(batch[:8])  # warm-up: math-verify's imports and caches
        # interleaved (worker, in-process, worker, ...): a slow minute of the machine hits both sides
        protected, plain_rates = interleaved(rate("worker", lambda: worker.score(batch)), rate("direct", direct),
                                             repeats)
    results, plain = last["worker"], last["direct"]
    assert [(r.accuracy, r.format) for r in results] == plain, "the worker and the plain rule disagree"
    assert sum(r.accuracy for r in results) == count // 2, "half the samples are right by construction"
    section.figures.append(Figure.repeated(
        "reward worker (killable child, per-sample timeout) samples/s", protected, "samples/s",
        "the same rule called in-process, no timeout protection", plain_rates,
        note="1 - ratio = the cost of the timeout machinery"))
    section.rows.append({"what": "timeout_machinery", "protected_s": [count / r for r in protected],
                         "direct_s": [count / r for r in plain_rates]})

    ray_up()
    rollouts = [Rollout(i, i, [], [], [], c, "stop", 0, g) for i, (c, g) in enumerate(batch)]
    # A pool of 1 worker and one of 2, both up, timed interleaved (2 workers, 1, 2, 1, ...).
    actors = [RewardActor.options(num_cpus=cfg.num_cpus).remote(cfg) for _ in range(3)]
    try:
        pools = {1: RewardPool(actors[:1]), 2: RewardPool(actors[1:])}
        for pool in pools.values():
            pool.score(rollouts[:16])  # warm-up
        two, one = interleaved(rate("pool 2", lambda: pools[2].score(rollouts)),
                               rate("pool 1", lambda: pools[1].score(rollouts)), repeats)
    finally:
        for a in actors:
            ray.kill(a)
    for workers, rates in ((1, one), (2, two)):
        section.rows.append({"what": "pool", "workers": workers, "samples_per_s": statistics.median(rates),
                             "samples_per_s_repeats": rates})
        print(f"[reward] pool of {workers}: {statistics.median(rates):.0f} samples/s", flush=True)
    section.figures.append(Figure.repeated("reward pool, 2 workers samples/s", two, "samples/s",
                                           "reward pool, 1 worker, same samples", one))
    sandbox_figure(section, 16 if quick else 64, repeats)
    sandbox_pool_figure(section, 16 if quick else 64, repeats)
    return section


def all_passed(out: str, nonce: str, tests: int) -> bool:
    """The harness's report (rlsys.sandbox.judge.HARNESS: "<nonce> <test> <1 passed | 0 failed> <why>") says
    every test passed."""
    lines = [line.split(" ") for line in out.splitlines() if line.startswith(nonce + " ")]
    return len(lines) == tests and all(parts[2] == "1" for parts in lines)


def run_plain(python: str, program: str, tests: int) -> None:
    """The reference side of the sandbox figures: a harness program (rlsys.sandbox.judge.harness) run
    by a plain subprocess in a temporary folder, no isolation; every test must pass."""
    import os
    import secrets
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "main.py"), "w") as f:
            f.write(program)
        nonce = secrets.token_hex(16)
        out = subprocess.run([python, "-I", "main.py"], cwd=folder, input=nonce + "\n", capture_output=True,
                             text=True, timeout=10).stdout
        assert all_passed(out, nonce, tests), out


def sandbox_figure(section: Section, count: int, repeats: int) -> None:
    """The cost of isolation: a program judged against its tests in the sandbox (a fresh bwrap with
    namespaces, limits and its own uid each time: rlsys.sandbox) against the same harness program
    run by a plain subprocess in a temporary folder, no isolation. Executions/s, one after another."""
    import json
    import os

    from rlsys.sandbox.execute import Limits, Sandbox
    from rlsys.sandbox.judge import harness, judge

    if os.geteuid() != 0:
        print("[reward] sandbox figure skipped: the sandbox's per-run uids need root", flush=True)
        return
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
    gold = json.dumps({"tests": tests})
    completion = "<answer>def add(a, b):\n    return a + b</answer>"
    program = harness("def add(a, b):\n    return a + b", tests)
    sandbox = Sandbox()
    limits = Limits(wall_s=10.0)

    def isolated() -> float:
        start = time.perf_counter()
        for _ in range(count):
            assert judge(sandbox, completion, gold, limits).passed == 3
        return count / (time.perf_counter() - start)

    def plain() -> float:
        start = time.perf_counter()
        for _ in range(count):
            run_plain(sandbox.python, program, tests=3)
        return count / (time.perf_counter() - start)

    try:
        isolated(), plain()  # warm-up: the interpreter's files in the page cache
        ours, reference = interleaved(isolated, plain, repeats)
    finally:
        sandbox.close()
    section.figures.append(Figure.repeated(
        "sandboxed code executions/s (bwrap: namespaces, limits, own uid)", ours, "executions/s",
        "the same program in a plain subprocess, no isolation", reference, target=0.5,
        note="1 - ratio = the cost of isolation; the issue's bar: isolation at most doubles an execution's cost"))
    section.rows.append({"what": "sandbox", "executions": count, "isolated_per_s": ours, "plain_per_s": reference})


def sandbox_pool_figure(section: Section, count: int, repeats: int, workers: int = 2) -> None:
    """What code rewards get in a run: `count` distinct programs (none from the cache) judged by a warm
    pool of `workers` sandbox worker actors (rlsys.cluster.sandboxes, over Ray; each does
    reward.code.runs_per_worker runs at once, the default) against the same harness programs run by
    as many threads as the pool runs programs at once, each with a plain subprocess in a temporary folder."""
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    from rlsys.cluster.remote import SandboxActor
    from rlsys.cluster.sandboxes import SandboxPool
    from rlsys.config import CodeConfig
    from rlsys.sandbox.judge import harness, limits_of

    if os.geteuid() != 0:
        print("[reward] sandbox pool figure skipped: the sandbox's per-run uids need root", flush=True)
        return
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
    gold = json.dumps({"tests": tests})
    code = CodeConfig(wall_s=10.0)
    pool = SandboxPool(lambda n: SandboxActor.options(num_cpus=0, max_concurrency=n).remote(code),
                       workers, workers, 10**6, limits_of(code), timeout_s=60.0, runs_per_worker=code.runs_per_worker)
    pool.wait_ready()
    at_once = workers * code.runs_per_worker  # the plain side runs as many at a time as the pool does
    rounds = iter(range(10**9))

    def programs() -> list[str]:  # distinct each call: the pool's cache must not answer
        r = next(rounds)
        return [f"def add(a, b):\n    return a + b  # {r}.{i}" for i in range(count)]

    def isolated() -> float:
        batch = programs()
        start = time.perf_counter()
        verdicts = pool.judge([(p, gold) for p in batch])
        assert all(v.passed == 3 for v in verdicts)
        return count / (time.perf_counter() - start)

    def one_plain(program: str) -> None:
        run_plain(code.python, harness(program, tests), tests=3)

    def plain() -> float:
        batch = programs()
        start = time.perf_counter()
        with ThreadPoolExecutor(at_once) as threads:
            list(threads.map(one_plain, batch))
        return count / (time.perf_counter() - start)

    try:
        isolated(), plain()  # warm-up
        ours, reference = interleaved(isolated, plain, repeats)
    finally:
        pool.close()
    section.figures.append(Figure.repeated(
        f"code reward executions/s, warm pool of {workers} sandbox workers (Ray actors), "
        f"{code.runs_per_worker} runs each at once", ours, "executions/s",
        f"the same programs in plain subprocesses, {at_once} at a time", reference, target=0.5,
        note="what a code run's reward step gets; the issue's bar: isolation at most doubles an execution's cost"))
    section.rows.append({"what": "sandbox_pool", "executions": count, "workers": workers,
                         "runs_per_worker": code.runs_per_worker, "isolated_per_s": ours,
                         "plain_per_s": reference})


if __name__ == "__main__":
    main(run)
