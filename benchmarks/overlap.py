"""Asynchronous vs synchronous GRPO, disaggregated as on a real cluster.

A Ray cluster on this machine (rlsys/cluster/local.py): a head with no CPUs (the driver), a
rollout node pinned to core 0 (the vLLM engine and the reward workers) and a learner node pinned
to core 1 (one DeepSpeed rank), so that generation and learning run on cores of their own and
can really overlap. The same workload then runs twice, one after the other on the same cluster:
trainer.max_staleness=0 (synchronous: the learner waits for generation and the engine for the
learner) and trainer.max_staleness=1 (generation of batch k + 1 overlaps the update on batch k).

Per run, over the steps after the first (warm-up): tokens (prompt + response, every sample) per
second of wall time (timing/step), the phases, and the reward curve; the curves of both runs go
into one plot (<results>/overlap-<stamp>/reward_<workload>.png), per step and per second of
training. Figures: asynchronous tokens/s
against synchronous (target 1.4x), and the mean reward of the last steps against synchronous
("not worse": the ratio should be about 1 or above).

--layout shared runs the same pair on one node whose generator and learner share both cores
(what a user gets on one machine with nothing pinned): there overlap cannot add compute, and the
figure says how much asynchronous mode costs or gains on shared cores (no target: the point is to
set it beside the pinned one).

Workloads: toy (configs/toy.yaml: a tiny random model learns to copy a digit; its reward rises
from ~0.1 to ~1 within 100 steps) and, without --quick, the Quickstart (rlsys/default.yaml,
SmolLM2-135M on digit sums, its held-out evaluation off).

    python benchmarks/overlap.py [--quick] [--layout pinned|shared]
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, Figure, Section, machine, main  # noqa: E402
from rlsys.cluster.local import BIN, Background, LocalNodes  # noqa: E402

TARGET = 1.4
RUN_TIMEOUT_S = 3600.0
WORKLOADS = {"toy": "configs/toy.yaml", "quickstart": "rlsys/default.yaml"}


def plan(quick: bool) -> dict[str, int]:
    """Steps per run, per workload."""
    return {"toy": 40} if quick else {"toy": 100, "quickstart": 14}


def train_run(nodes: LocalNodes, config: str, staleness: int, steps: int, run_dir: Path,
              rollout_node: str = "rollout", learner_node: str = "learner") -> list[dict]:
    args = [str(BIN / "rlsys"), "train", config, "trainer.progress=false", f"trainer.total_steps={steps}",
            f"trainer.output_dir={run_dir}", "eval.every=0", f"cluster.address={nodes.address}",
            "cluster.placement=disaggregated", "cluster.shared_storage=true",  # every node is this machine
            f"trainer.max_staleness={staleness}", "generator.num_engines=1", "generator.num_cpus=1",
            "learner.num_ranks=1", "learner.num_cpus=1", "reward.num_workers=2", "reward.num_cpus=0.25"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    with Background(args, log, REPO) as run:
        try:
            code = run.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{config} staleness {staleness} did not finish in {RUN_TIMEOUT_S:.0f} s; {log}") from None
    if code != 0:
        raise RuntimeError(f"{config} staleness {staleness} exited with {code}; {log}:\n{log.read_text()[-4000:]}")
    from rlsys.observe.metrics import read_jsonl

    placement = json.loads((run_dir / "placement.json").read_text())
    where = {a["role"]: a["node_id"] for a in placement if a["role"] in ("generator", "learner")}
    assert where["generator"] == nodes.node_ids[rollout_node] and where["learner"] == nodes.node_ids[learner_node], where
    return read_jsonl(run_dir / "metrics.jsonl")


def measure(rows: list[dict]) -> dict:
    measured = rows[1:] or rows
    wall = sum(r["timing/step"] for r in measured)
    phases = ("wait", "generate", "reward", "learn", "sync")
    return {"steps": len(rows), "tokens_per_s": sum(r["tokens/total"] for r in measured) / wall,
            "step_s_mean": wall / len(measured),
            "phases_s_mean": {p: statistics.fmean(r.get(f"timing/{p}", 0.0) for r in measured) for p in phases},
            "staleness_mean": statistics.fmean(r.get("staleness/mean", 0.0) for r in rows),
            "reward": [r["reward/mean"] for r in rows],
            "elapsed_s": list(itertools.accumulate(r["timing/step"] for r in rows))}


def plot(runs: dict[str, dict], title: str, out: Path) -> None:
    """Reward per step (left) and against wall-clock seconds of training (right), every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in runs.items():
        by_step.plot(range(1, len(r["reward"]) + 1), r["reward"], label=label, alpha=0.85)
        by_time.plot(r["elapsed_s"], r["reward"], label=label, alpha=0.85)
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds of training (sum of step times)")
    for ax in (by_step, by_time):
        ax.set_ylabel("mean reward of the step's rollouts")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


LAYOUTS = {
    "pinned": "disaggregated: rollout node pinned to core 0 (1 vLLM engine, 2 reward workers), learner node "
              "pinned to core 1 (1 DeepSpeed rank), head 0 CPUs",
    "shared": "one node on both cores declaring rollout and learner: the engine, 2 reward workers and the "
              "DeepSpeed rank share its cores (nothing pinned), head 0 CPUs"}


def run(quick: bool, layout: str = "pinned") -> list[Section]:
    steps = plan(quick)
    info = machine()
    if len(os.sched_getaffinity(0)) < 2:
        raise RuntimeError("the overlap benchmark runs on two cores: this process may use fewer than 2")
    title = "overlap" if layout == "pinned" else f"overlap_{layout}"
    folder = REPO / "benchmarks" / "results" / f"{title}-{time.strftime('%Y%m%d-%H%M%S')}"
    section = Section(title, {
        "workloads": {k: WORKLOADS[k] for k in steps}, "steps": steps, "measured": "steps after the first",
        "layout": layout, "placement": LAYOUTS[layout], "cpu": info["cpu"],
        "files": str(folder.relative_to(REPO))})
    import ray

    if ray.is_initialized():
        ray.shutdown()
    nodes = LocalNodes(folder / "nodes")
    try:
        nodes.head()
        if layout == "pinned":
            nodes.worker("rollout", 2, {"rollout": 1}, cores=[0])
            nodes.worker("learner", 1, {"learner": 1}, cores=[1])
            where = {"rollout_node": "rollout", "learner_node": "learner"}
        else:
            nodes.worker("shared", 3, {"rollout": 1, "learner": 1}, cores=[0, 1])
            where = {"rollout_node": "shared", "learner_node": "shared"}
        for name, n in steps.items():
            got = {}
            for staleness in (0, 1):
                print(f"[overlap] {name}: staleness {staleness}, {n} steps ...", flush=True)
                got[staleness] = measure(train_run(nodes, WORKLOADS[name], staleness, n,
                                                   folder / f"{name}-s{staleness}", **where))
                print(f"[overlap] {name}: staleness {staleness}: {got[staleness]['tokens_per_s']:.0f} tokens/s, "
                      f"{got[staleness]['step_s_mean']:.2f} s a step", flush=True)
            sync, async_ = got[0], got[1]
            png = folder / f"reward_{name}.png"
            plot({"synchronous (max_staleness 0)": sync, "asynchronous (max_staleness 1)": async_},
                 f"{name}: reward, same cluster and placement ({layout}), same run", png)
            k = max(1, n // 5)
            last_sync, last_async = statistics.fmean(sync["reward"][-k:]), statistics.fmean(async_["reward"][-k:])
            section.rows.append({"workload": name, "synchronous": sync, "asynchronous": async_,
                                 "plot": str(png.relative_to(REPO))})
            section.figures += [
                Figure(f"{name}: asynchronous (staleness 1) tokens/s" + ("" if layout == "pinned" else f", {layout} cores"),
                       async_["tokens_per_s"], "tokens/s",
                       "synchronous, same cluster and placement, same run", sync["tokens_per_s"],
                       target=TARGET if layout == "pinned" else None,
                       note=f"sync phases {fmt(sync['phases_s_mean'])}; async {fmt(async_['phases_s_mean'])} (its "
                            f"generate/reward overlap learn; wait = learner idle)"),
                Figure(f"{name}: mean reward of the last {k} steps, asynchronous", last_async, "reward",
                       f"synchronous, last {k} steps", last_sync,
                       note=f"first 3 steps: sync {statistics.fmean(sync['reward'][:3]):.3f}, async "
                            f"{statistics.fmean(async_['reward'][:3]):.3f}; curves in {png.name}")]
    finally:
        nodes.stop()
    return [section]


def fmt(phases: dict[str, float]) -> str:
    return ", ".join(f"{p} {s:.2f}s" for p, s in phases.items() if s)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(run, options={"--layout": {"choices": sorted(LAYOUTS), "default": "pinned",
                                     "help": "pinned: rollout and learner on cores of their own (the target's "
                                             "setting); shared: one node, cores shared"}}, run_with=run)
