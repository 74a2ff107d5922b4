"""Scaling: real `rlsys train` runs (configs/tiny.yaml) on a multi-node Ray cluster this script
starts on this machine, against the number of generator engines and against the split of a fixed
number of CPUs between generators and learner ranks.

The cluster (rlsys/cluster/local.py): a head with 0 CPUs (the driver only), one rollout node
per engine (generator.num_cpus CPUs and the custom resource `rollout`) and one learner node (the
learner ranks' CPUs, plus room for the reward workers, and `learner`); every run uses
cluster.placement=disaggregated, so each engine has a rollout node of its own. Every node is
started before the first run (an idle node costs little), so every run sees the same cluster.

Each run: `rlsys train configs/tiny.yaml` for a few steps in a process of its own; from its
metrics.jsonl, over the steps after the first (warm-up): step time (sum of timing/generate,
reward, learn, sync), the generate phase, and tokens/s = sum of tokens/total / sum of step times.

Spread: every run is repeated, the runs alternated per repeat (1 engine, 2 engines, ..., then
again: `repeats` rounds, 2 with --quick, 3 without), so that a slow minute of a shared machine
hits every setting alike; each run's figure is one sample, and a figure is the median pairwise
ratio (round i of each side) with its lowest and highest (benchmarks/common.py).

Figures (ratios to runs measured in the same invocation):
- engines: tokens/s of N engines against ideal linear scaling, N x the 1-engine run's tokens/s
  (the ratio is the scaling efficiency), and against the 1-engine run itself (the speed-up);
  generate-phase time and step time against the 1-engine run's.
- split: tokens/s of each generator/learner split of the same CPUs against the split with the
  most learner ranks.

Ray's CPUs are logical. The engines do not share cores only where the machine has a core for
every CPU the run asks for; on a 2-core machine every engine, learner rank and reward worker
shares the same two cores, so little or no speed-up is to be expected there, and every figure
says how many CPUs the run asked for against the cores it had.

    python benchmarks/scaling.py [--quick]

With --link RATES (Mb/s, e.g. --link 10000,1000; root): the same runs on isolated nodes
(rlsys/cluster/isolation.py: own address, disk and home each, nothing shared), the rollout pool
grown 1..N engines, every node's link unshaped first and then shaped to each rate (tc tbf), so
the step's sync and rollout traffic cross a link of that rate. The model is rlsys's tiny random
Qwen2 made larger (LINK_MODEL, 43 MB of fp32 weights) so that a push takes a visible share of a
step on the slower links. Figures: tokens/s and the sync phase at each rate against the unshaped
run with the same engines, and each rate's speed-up against its own 1-engine run. Rounds as
above (2 with --quick, 3 without): per round, per engine count, unshaped then each rate; a figure
pairs round i of both sides (a failed run ends the rounds: the figures pair what both sides got).

    python benchmarks/scaling.py --link 10000,1000 [--quick]
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, Figure, Section, link_label, link_limit_s, machine, main, parse_links  # noqa: E402
from rlsys.cluster.local import BIN, Background, LocalNodes  # noqa: E402

CONFIG = "configs/tiny.yaml"
PHASES = ("generate", "reward", "learn", "sync")
GENERATOR_CPUS = 1.0  # generator.num_cpus: one rollout node of this many CPUs per engine
LEARNER_CPUS = 1.0  # learner.num_cpus
REWARD_WORKERS, REWARD_CPUS = 2, 0.25  # tiny.yaml's defaults, placed on the learner node's spare CPU
LEARNER_RANKS = 2  # during the engine sweep
RUN_TIMEOUT_S = 900.0


def plan(quick: bool) -> dict:
    """Engine counts (learner ranks fixed) and, per CPU total, the generator/learner splits; the
    first split of each total is its reference. learner.mini_batch_size (32) must be a multiple of
    ranks x micro_batch_size (8): 1, 2 or 4 ranks."""
    if quick:
        return {"steps": 6, "engines": [1, 2], "splits": {3: [(1, 2), (2, 1)]}, "repeats": 2}
    return {"steps": 12, "engines": [1, 2, 4], "splits": {3: [(1, 2), (2, 1)], 4: [(2, 2), (3, 1)]}, "repeats": 3}


def runs_needed(p: dict) -> list[tuple[int, int]]:
    """(engines, ranks) of every run, each once, in order of engines (the cluster only grows)."""
    wanted = {(n, LEARNER_RANKS) for n in p["engines"]} | {s for splits in p["splits"].values() for s in splits}
    return sorted(wanted)


def asked_cpus(engines: int, ranks: int) -> float:
    return engines * GENERATOR_CPUS + ranks * LEARNER_CPUS + REWARD_WORKERS * REWARD_CPUS


def measure(rows: list[dict]) -> dict:
    """One run's figures from its metrics.jsonl rows; the first step (warm-up: compilation,
    first weight sync, caches) is left out when there is more than one."""
    if not rows:
        raise ValueError("metrics.jsonl has no steps")
    measured = rows[1:] or rows
    step_s = [sum(r[f"timing/{p}"] for p in PHASES) for r in measured]
    tokens = [r["tokens/total"] for r in measured]
    return {"steps_measured": len(measured), "step_s": step_s, "step_s_mean": statistics.fmean(step_s),
            "generate_s_mean": statistics.fmean(r["timing/generate"] for r in measured),
            "phases_s_mean": {p: statistics.fmean(r[f"timing/{p}"] for r in measured) for p in PHASES},
            "tokens": tokens, "tokens_per_s": sum(tokens) / sum(step_s)}


def ideal_line(base_tokens_per_s: float, engines: list[int]) -> list[float]:
    """Linear scaling from the 1-engine run: N engines, N times its tokens/s."""
    return [n * base_tokens_per_s for n in engines]


def sharing_note(engines: int, ranks: int, cores: int, cpu: str) -> str:
    asked = asked_cpus(engines, ranks)
    if asked <= cores:
        return f"{asked:g} CPUs asked, {cores} cores ({cpu}): no core shared"
    return f"{asked:g} logical CPUs asked of {cores} cores ({cpu}): all actors share them, little speed-up expected"


def repeats_of(runs: dict | list[dict]) -> list[dict]:
    """A setting's runs in the order of the rounds (one run: a list of one)."""
    return runs if isinstance(runs, list) else [runs]


def series(runs: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] for r in runs]


def median_run(runs: list[dict]) -> dict:
    """The medians of a setting's runs, for notes and the Amdahl bound."""
    return {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "step_s_mean", "generate_s_mean")}


def engine_figures(by_engines: dict[int, dict | list[dict]], ranks: int, cores: int, cpu: str) -> list[Figure]:
    """by_engines: engine count -> measure() of that run, or of its repeats (round i of every
    count taken in turn); needs the 1-engine run (the reference). Each figure pairs round i of N
    engines with round i of 1 engine."""
    if 1 not in by_engines:
        raise ValueError(f"the engine sweep needs a 1-engine run as its reference, got {sorted(by_engines)}")
    base_runs = repeats_of(by_engines[1])
    base = median_run(base_runs)
    # Amdahl: more engines shorten the generate phase at best; the rest of the step stays
    bound = base["step_s_mean"] / (base["step_s_mean"] - base["generate_s_mean"])
    figures = []
    for n in sorted(by_engines):
        if n == 1:
            continue
        runs, note = repeats_of(by_engines[n]), sharing_note(n, ranks, cores, cpu)
        if len(runs) != len(base_runs):
            raise ValueError(f"{n} engines: {len(runs)} runs against {len(base_runs)} of 1 engine")
        figures += [
            Figure.repeated(f"{n} engines: tokens/s vs ideal linear", series(runs, "tokens_per_s"), "tokens/s",
                            f"ideal: {n} x the 1-engine run's tokens/s (same round)",
                            [ideal_line(r["tokens_per_s"], [n])[0] for r in base_runs], note=note),
            Figure.repeated(f"{n} engines: tokens/s vs 1 engine", series(runs, "tokens_per_s"), "tokens/s",
                            f"1 engine, {ranks} learner ranks, same run", series(base_runs, "tokens_per_s"),
                            note=f"{note}; generate is {100 * base['generate_s_mean'] / base['step_s_mean']:.0f}% "
                                 f"of the 1-engine step, so free generation would give at most {bound:.2f}x"),
            Figure.repeated(f"{n} engines: generate phase", series(runs, "generate_s_mean"), "s",
                            "1 engine's generate phase", series(base_runs, "generate_s_mean"), lower_is_better=True,
                            note=note),
            Figure.repeated(f"{n} engines: step time", series(runs, "step_s_mean"), "s", "1 engine's step time",
                            series(base_runs, "step_s_mean"), lower_is_better=True, note=note)]
    return figures


def split_figures(splits: dict[int, list[tuple[int, int]]], by_run: dict[tuple[int, int], dict | list[dict]],
                  cores: int, cpu: str) -> list[Figure]:
    """Per CPU total, every split's tokens/s against the first split of that total, round i of
    each paired."""
    figures = []
    for total, options in splits.items():
        ref_e, ref_r = options[0]
        ref = repeats_of(by_run[options[0]])
        for e, r in options[1:]:
            figures.append(Figure.repeated(
                f"{e} gen + {r} learner ranks ({total} CPUs): tokens/s", series(repeats_of(by_run[(e, r)]),
                                                                                 "tokens_per_s"), "tokens/s",
                f"{ref_e} gen + {ref_r} learner ranks, same CPUs, same run", series(ref, "tokens_per_s"),
                note=sharing_note(e, r, cores, cpu)))
    return figures


def train_run(nodes: LocalNodes, engines: int, ranks: int, steps: int, run_dir: Path, extra: tuple[str, ...] = ()
              ) -> dict:
    """`rlsys train` of the tiny config against the cluster, in a process (group) of its own; its
    output goes to a file (a pipe nobody reads while it runs could fill and block it). On isolated
    nodes the driver runs on the head (its run folder one the head shares with the host), with no
    storage shared between the nodes."""
    isolated = nodes.iso is not None
    args = [str(BIN / "rlsys"), "train", CONFIG, "trainer.progress=false", f"trainer.total_steps={steps}",
            f"trainer.output_dir={run_dir}", "eval.every=0", f"cluster.address={nodes.address}",
            "cluster.placement=disaggregated",
            # not isolated: every node is this machine; isolated: checkpoints travel to the driver
            f"cluster.shared_storage={str(not isolated).lower()}",
            f"generator.num_engines={engines}", f"generator.num_cpus={GENERATOR_CPUS:g}",
            f"learner.num_ranks={ranks}", f"learner.num_cpus={LEARNER_CPUS:g}",
            f"reward.num_workers={REWARD_WORKERS}", f"reward.num_cpus={REWARD_CPUS:g}", *extra]
    pin = None
    if isolated:  # on the head, in the project folder as the node sees it, with the head's own model cache
        args, pin = nodes.command("head", ["env", "-u", "RLSYS_CACHE", "-C", str(REPO), *args])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with Background(args, log, REPO, preexec_fn=pin) as run:  # timed out or interrupted: the driver goes with its children
        try:
            code = run.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"rlsys train ({engines} engines, {ranks} learner ranks) did not finish within "
                               f"{RUN_TIMEOUT_S:.0f} s; {log}:\n{log.read_text()[-4000:]}") from None
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"rlsys train ({engines} engines, {ranks} learner ranks) exited with {code}; "
                           f"{log}:\n{log.read_text()[-4000:]}")
    from rlsys.observe.metrics import read_jsonl

    m = measure(read_jsonl(run_dir / "metrics.jsonl"))
    placement = json.loads((run_dir / "placement.json").read_text())
    names = {node_id: name for name, node_id in nodes.node_ids.items()}
    gen_nodes = sorted({names.get(a["node_id"], "head") for a in placement if a["role"] == "generator"})
    learner_nodes = sorted({names.get(a["node_id"], "head") for a in placement if a["role"] == "learner"})
    if len(gen_nodes) != engines or any(not n.startswith("rollout") for n in gen_nodes):
        raise RuntimeError(f"{engines} engines should each have a rollout node of their own, ran on {gen_nodes}")
    return {"engines": engines, "ranks": ranks, "steps": steps, "asked_cpus": asked_cpus(engines, ranks),
            "wall_s": wall, "generator_nodes": gen_nodes, "learner_nodes": learner_nodes,
            "run_dir": str(run_dir.relative_to(REPO)), **m}


def run(quick: bool) -> list[Section]:
    p = plan(quick)
    info = machine()
    cores, cpu = info["cpus"], info["cpu"]
    runs = runs_needed(p)
    folder = REPO / "benchmarks" / "results" / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"
    params = {"config": CONFIG, "steps": p["steps"], "measured": "steps after the first",
              "placement": "disaggregated: head 0 CPUs; one rollout node per engine; one learner node",
              "generator_num_cpus": GENERATOR_CPUS, "learner_num_cpus": LEARNER_CPUS,
              "reward_workers": REWARD_WORKERS, "reward_num_cpus": REWARD_CPUS, "cores": cores, "cpu": cpu,
              "files": str(folder.relative_to(REPO)),
              "cores_note": (f"{cores} cores ({cpu}): every run asks for more logical CPUs than that, so engines, "
                             "learner ranks and reward workers share the same cores; little or no speed-up is "
                             "expected on this machine" if min(asked_cpus(e, r) for e, r in runs) > cores else
                             f"{cores} cores ({cpu})")}
    engines_section = Section("scaling", params | {"engines": p["engines"], "learner_ranks": LEARNER_RANKS})
    split_section = Section("scaling_split", params | {"splits": {str(t): s for t, s in p["splits"].items()}})
    results: dict[tuple[int, int], list[dict]] = {run: [] for run in runs}
    engines_section.params["repeats"] = split_section.params["repeats"] = p["repeats"]
    import ray

    if ray.is_initialized():
        ray.shutdown()  # an earlier benchmark's in-process cluster (run_all): the runs get the cores to themselves
    nodes = LocalNodes(folder / "nodes")
    previous = _sigterm_exits()
    try:
        nodes.head()
        ranks_max = max(r for _, r in runs)
        # the learner ranks' CPUs plus a CPU for the reward workers, which have no placement group
        nodes.worker("learner", math.ceil(ranks_max * LEARNER_CPUS + REWARD_WORKERS * REWARD_CPUS), {"learner": 1})
        # Every rollout node up front: the runs of every round see the same cluster.
        for i in range(max(e for e, _ in runs)):
            nodes.worker(f"rollout-{i}", math.ceil(GENERATOR_CPUS), {"rollout": 1})
        # Round after round, every setting in turn (1 engine, 2 engines, ..., 1 engine, ...): the
        # settings' round-i runs are close in time, and a figure pairs them.
        for round_ in range(p["repeats"]):
            for engines, ranks in runs:
                print(f"[scaling] round {round_ + 1} of {p['repeats']}: {engines} engine(s), {ranks} learner "
                      f"rank(s), {p['steps']} steps ...", flush=True)
                r = train_run(nodes, engines, ranks, p["steps"], folder / f"run-e{engines}-l{ranks}-r{round_}")
                print(f"[scaling] {engines} engine(s), {ranks} learner rank(s): {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['step_s_mean']:.2f} s a step (generate {r['generate_s_mean']:.2f} s), {r['wall_s']:.0f} s "
                      f"with start-up", flush=True)
                results[(engines, ranks)].append(r)
    finally:
        nodes.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for (engines, ranks), rs in results.items():
        r = setting_row(rs)
        if ranks == LEARNER_RANKS and engines in p["engines"]:
            engines_section.rows.append({"what": "engines", **r})
        if any((engines, ranks) in s for s in p["splits"].values()):
            split_section.rows.append({"what": "split", **r})
    engines_section.figures = engine_figures({e: results[(e, LEARNER_RANKS)] for e in p["engines"]},
                                             LEARNER_RANKS, cores, cpu)
    split_section.figures = split_figures(p["splits"], results, cores, cpu)
    print(f"[scaling] {params['cores_note']}", flush=True)
    return [engines_section, split_section]


def setting_row(runs: list[dict]) -> dict:
    """One setting's row: the medians over its runs under the keys a single run has (plots read
    tokens_per_s, generate_s_mean, phases_s_mean), every run under `repeats`."""
    first = runs[0]
    return {**{k: first[k] for k in ("engines", "ranks", "steps", "asked_cpus") if k in first},
            **median_run(runs),
            "phases_s_mean": {ph: statistics.median(r["phases_s_mean"][ph] for r in runs)
                              for ph in first["phases_s_mean"]},
            "tokens_per_s_repeats": series(runs, "tokens_per_s"), "repeats": runs}


# ---------------------------------------------------------------- on shaped links (--link)

LINK_MODEL = (384, 8, 6)  # (hidden, layers, heads) of model.path=tiny: 10.7M parameters, 43 MB fp32, head_dim 64


def link_plan(quick: bool) -> dict:
    return {"steps": 4, "engines": [1, 2], "repeats": 2} if quick else {"steps": 6, "engines": [1, 2, 3], "repeats": 3}


def paired(runs: list[dict], reference: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Round i of a setting against round i of its reference, as far as both got (a run that
    failed ends its rounds)."""
    n = min(len(runs), len(reference))
    return series(runs[:n], key), series(reference[:n], key)


def sync_s(runs: list[dict]) -> list[dict]:
    return [{"sync": r["phases_s_mean"]["sync"]} for r in runs]


def link_figures(by: dict[tuple[float | None, int], dict | list[dict]], note: str) -> list[Figure]:
    """by: (rate in Mb/s or None for unshaped, engines) -> measure() of that run, or of its rounds.
    Each shaped setting against the unshaped one with the same engines (tokens/s, sync phase); each
    rate's N engines against its own 1-engine run; round i paired with round i."""
    figures = []
    by = {k: repeats_of(v) for k, v in by.items()}
    for (rate, n), m in sorted(by.items(), key=lambda kv: (kv[0][0] is not None, -(kv[0][0] or 0), kv[0][1])):
        label = link_label(rate)
        if rate is not None and (None, n) in by:
            ref = by[(None, n)]
            ours, theirs = paired(m, ref, "tokens_per_s")
            figures.append(Figure.repeated(f"{n} engine(s) at {label}: tokens/s vs unshaped", ours, "tokens/s",
                                           f"{n} engine(s), unshaped links, same run", theirs, note=note))
            ours, theirs = paired(sync_s(m), sync_s(ref), "sync")
            figures.append(Figure.repeated(f"{n} engine(s) at {label}: sync phase vs unshaped", ours, "s",
                                           f"{n} engine(s), unshaped links", theirs, lower_is_better=True, note=note))
        if n > 1 and (rate, 1) in by:
            ours, theirs = paired(m, by[(rate, 1)], "tokens_per_s")
            figures.append(Figure.repeated(f"{n} engines at {label}: tokens/s vs 1 engine", ours, "tokens/s",
                                           f"1 engine at {label}, same run", theirs, note=note))
    return figures


def run_link(quick: bool, link: list[float]) -> Section:
    p = link_plan(quick)
    rates: list[float | None] = [None, *sorted(link, reverse=True)]
    info = machine()
    cores, cpu = info["cpus"], info["cpu"]
    folder = REPO / "benchmarks" / "results" / f"scaling_link-{time.strftime('%Y%m%d-%H%M%S')}"
    hidden, layers, heads = LINK_MODEL
    model = (f"model.tiny_hidden={hidden}", f"model.tiny_layers={layers}", f"model.tiny_heads={heads}")
    from benchmarks.common import tiny_model

    _, params = tiny_model(*LINK_MODEL)  # its size for the record; every node builds its own copy
    note = (f"{cores} cores ({cpu}) shared by every node: more engines add no cores here; the links are what "
            f"changes. One push to each engine: {4 * params / 1e6:.0f} MB, "
            + ", ".join(f"{link_limit_s(4 * params, r):.2f} s at {link_label(r)}" for r in sorted(link, reverse=True)))
    section = Section("scaling_link", {
        "config": CONFIG, "model": {"tiny_hidden": hidden, "tiny_layers": layers, "tiny_heads": heads,
                                    "params": params, "bytes_fp32": 4 * params},
        "steps": p["steps"], "measured": "steps after the first", "engines": p["engines"], "rates_mbit": link,
        "repeats": p["repeats"], "interleaved": "per round and engine count: unshaped, then each rate",
        "learner_ranks": LEARNER_RANKS, "generator_num_cpus": GENERATOR_CPUS, "learner_num_cpus": LEARNER_CPUS,
        "nodes": "isolated (own address, disk, home; nothing shared): head (driver, 0 CPUs), one learner node, "
                 "one rollout node per engine; every node's link shaped (tc tbf, both ends) to the rate",
        "cores": cores, "cpu": cpu, "files": str(folder.relative_to(REPO)), "cores_note": note})
    by: dict[tuple[float | None, int], list[dict]] = {}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    folder.mkdir(parents=True, exist_ok=True)
    nodes = LocalNodes(folder / "nodes", isolated=True)
    previous = _sigterm_exits()
    try:
        nodes.head(shared={folder: folder})  # the driver's run folders, read from the host
        nodes.worker("learner", math.ceil(LEARNER_RANKS * LEARNER_CPUS + REWARD_WORKERS * REWARD_CPUS), {"learner": 1})
        # Every rollout node up front (the runs of every round see the same cluster); then round after
        # round, per engine count every rate in turn (unshaped, each rate, ...), so a figure pairs
        # round i of a setting with round i of its reference, taken close in time.
        for i in range(max(p["engines"])):
            nodes.worker(f"rollout-{i}", math.ceil(GENERATOR_CPUS), {"rollout": 1})
        for round_ in range(p["repeats"]):
            for engines in p["engines"]:
                for rate in rates:
                    for name in nodes.procs:
                        nodes.shape(name, rate_mbit=rate)
                    tag = "unshaped" if rate is None else f"{rate:g}mbit"
                    print(f"[scaling_link] round {round_ + 1} of {p['repeats']}: {engines} engine(s), "
                          f"{link_label(rate)}, {p['steps']} steps ...", flush=True)
                    try:
                        r = train_run(nodes, engines, LEARNER_RANKS, p["steps"],
                                      folder / f"run-e{engines}-{tag}-r{round_}", model)
                    except RuntimeError as e:
                        # On a shared machine Ray's memory monitor may kill an actor (others' memory counts
                        # too): the runs measured so far stay in the result, the failure with them, and
                        # the runs after it are not attempted (they would need the memory the same way).
                        first = str(e).splitlines()[0]
                        section.params["failed"] = {"run": f"round {round_ + 1}, {engines} engine(s), "
                                                           f"{link_label(rate)}", "error": first}
                        print(f"[scaling_link] {engines} engine(s), {link_label(rate)} FAILED: {first}", flush=True)
                        break
                    r["rate_mbit"] = rate
                    print(f"[scaling_link] {engines} engine(s), {link_label(rate)}: {r['tokens_per_s']:.0f} "
                          f"tokens/s, {r['step_s_mean']:.2f} s a step (sync {r['phases_s_mean']['sync']:.2f} s, "
                          f"generate {r['generate_s_mean']:.2f} s)", flush=True)
                    by.setdefault((rate, engines), []).append(r)
                if "failed" in section.params:
                    break
            if "failed" in section.params:
                break
        # one row per setting: medians under a single run's keys (benchmarks/plots.py), every run beside
        section.rows = [{"what": "link", "rate_mbit": rate, **setting_row(rs)} for (rate, _), rs in by.items()]
    finally:
        nodes.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    section.figures = link_figures(by, note)
    if not section.figures:
        raise RuntimeError(f"scaling_link: too few runs finished for any figure ({section.params.get('failed')})")
    return section


def _sigterm_exits():
    """A SIGTERM while nodes run becomes SystemExit, so the finally above still stops them.
    Returns the handler it replaced (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, exit_now)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(run, options={"--link": dict(type=parse_links, default=None, metavar="MBITS",
                                       help="link rates in Mb/s, comma-separated (e.g. 10000,1000): the runs on "
                                            "isolated nodes whose links are shaped to each rate (root)")},
         run_with=lambda quick, link: run(quick) if link is None else run_link(quick, link))
