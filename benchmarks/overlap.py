"""Asynchronous vs synchronous GRPO, disaggregated as on a real cluster.

A Ray cluster on this machine (rlsys/cluster/local.py): a head with no CPUs (the driver), a
rollout node pinned to core 0 (the vLLM engine and the reward workers) and a learner node pinned
to core 1 (one DeepSpeed rank), so that generation and learning run on cores of their own and
can really overlap. The same workload then runs on the same cluster with trainer.max_staleness=0
(synchronous: the learner waits for generation and the engine for the learner) and
trainer.max_staleness=1 (generation of batch k + 1 overlaps the update on batch k), in turn:
synchronous, asynchronous, synchronous, asynchronous, ... (`repeats` pairs: 2 with --quick, 3
without), so that a slow minute of a shared machine hits both modes alike. Each run's tokens/s is
one sample; the figure is the median pairwise ratio (pair i: the i-th synchronous run and the
asynchronous run right after it) with its lowest and highest, and the target counts as met only
when the lowest meets it (benchmarks/common.py).

Per run, over the steps after the first (warm-up): tokens (prompt + response, every sample) per
second of wall time (timing/step), the phases, and the reward curve; the curves of every run go
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

from benchmarks.common import REPO, Figure, Section, interleaved, machine, main  # noqa: E402
from rlsys.cluster.local import BIN, Background, LocalNodes  # noqa: E402

TARGET = 1.4
RUN_TIMEOUT_S = 3600.0
WORKLOADS = {"toy": "configs/toy.yaml", "quickstart": "rlsys/default.yaml"}


def plan(quick: bool) -> dict[str, int]:
    """Steps per run, per workload."""
    return {"toy": 40} if quick else {"toy": 100, "quickstart": 14}


def repeats_of(quick: bool) -> int:
    """(synchronous, asynchronous) pairs per workload."""
    return 2 if quick else 3


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
    repeats = repeats_of(quick)
    info = machine()
    if len(os.sched_getaffinity(0)) < 2:
        raise RuntimeError("the overlap benchmark runs on two cores: this process may use fewer than 2")
    title = "overlap" if layout == "pinned" else f"overlap_{layout}"
    folder = REPO / "benchmarks" / "results" / f"{title}-{time.strftime('%Y%m%d-%H%M%S')}"
    section = Section(title, {
        "workloads": {k: WORKLOADS[k] for k in steps}, "steps": steps, "measured": "steps after the first",
        "layout": layout, "placement": LAYOUTS[layout], "cpu": info["cpu"],
        "files": str(folder.relative_to(REPO)), "repeats": repeats,
        "interleaved": "synchronous, asynchronous, synchronous, asynchronous, ..."})
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
            runs: dict[int, list[dict]] = {0: [], 1: []}

            def one(staleness: int) -> float:
                i = len(runs[staleness])
                print(f"[overlap] {name}: staleness {staleness}, run {i + 1} of {repeats}, {n} steps ...", flush=True)
                m = measure(train_run(nodes, WORKLOADS[name], staleness, n, folder / f"{name}-s{staleness}-r{i}",
                                      **where))
                runs[staleness].append(m)
                print(f"[overlap] {name}: staleness {staleness}, run {i + 1}: {m['tokens_per_s']:.0f} tokens/s, "
                      f"{m['step_s_mean']:.2f} s a step", flush=True)
                return m["tokens_per_s"]

            # synchronous, asynchronous, synchronous, ... (pair i: sync run i, then async run i)
            interleaved(lambda: one(0), lambda: one(1), repeats)
            section.rows.append(overlap_row(name, runs[0], runs[1], folder, layout))
            section.figures += overlap_figures(name, runs[0], runs[1], layout, section.rows[-1]["plot"])
    finally:
        nodes.stop()
    return [section]


def overlap_row(name: str, sync: list[dict], async_: list[dict], folder: Path, layout: str) -> dict:
    """The workload's row: every run of each mode in the order taken, and the reward plot of all of them."""
    png = folder / f"reward_{name}.png"
    curves = {f"synchronous (max_staleness 0), run {i + 1}": r for i, r in enumerate(sync)}
    curves |= {f"asynchronous (max_staleness 1), run {i + 1}": r for i, r in enumerate(async_)}
    plot(curves, f"{name}: reward, same cluster and placement ({layout}), same run", png)
    return {"workload": name, "synchronous": sync, "asynchronous": async_,
            "tokens_per_s": {"synchronous": [r["tokens_per_s"] for r in sync],
                             "asynchronous": [r["tokens_per_s"] for r in async_]},
            "plot": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png)}


def overlap_figures(name: str, sync: list[dict], async_: list[dict], layout: str, png: str) -> list[Figure]:
    """Asynchronous tokens/s against synchronous over the interleaved pairs (sync[i] ran right before
    async_[i]; the target judged on the lowest pairwise ratio), and the mean reward of the last
    steps (untimed: the mean over every run of each mode)."""
    n = sync[0]["steps"]
    k = max(1, n // 5)
    last = {mode: statistics.fmean(statistics.fmean(r["reward"][-k:]) for r in runs)
            for mode, runs in (("sync", sync), ("async", async_))}
    first = {mode: statistics.fmean(statistics.fmean(r["reward"][:3]) for r in runs)
             for mode, runs in (("sync", sync), ("async", async_))}
    mean_phases = {mode: {p: statistics.fmean(r["phases_s_mean"][p] for r in runs) for p in runs[0]["phases_s_mean"]}
                   for mode, runs in (("sync", sync), ("async", async_))}
    return [
        Figure.repeated(
            f"{name}: asynchronous (staleness 1) tokens/s" + ("" if layout == "pinned" else f", {layout} cores"),
            [r["tokens_per_s"] for r in async_], "tokens/s",
            "synchronous, same cluster and placement, same run", [r["tokens_per_s"] for r in sync],
            target=TARGET if layout == "pinned" else None,
            note=f"{len(sync)} runs a mode, interleaved (sync, async, ...); mean phases: sync "
                 f"{fmt(mean_phases['sync'])}; async {fmt(mean_phases['async'])} (its generate/reward overlap "
                 f"learn; wait = learner idle)"),
        Figure(f"{name}: mean reward of the last {k} steps, asynchronous", last["async"], "reward",
               f"synchronous, last {k} steps", last["sync"],
               note=f"mean over {len(sync)} runs a mode; first 3 steps: sync {first['sync']:.3f}, async "
                    f"{first['async']:.3f}; curves in {Path(png).name}")]


def fmt(phases: dict[str, float]) -> str:
    return ", ".join(f"{p} {s:.2f}s" for p, s in phases.items() if s)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(run, options={"--layout": {"choices": sorted(LAYOUTS), "default": "pinned",
                                     "help": "pinned: rollout and learner on cores of their own (the target's "
                                             "setting); shared: one node, cores shared"}}, run_with=run)
