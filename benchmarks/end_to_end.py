"""End to end, and the peer: whole GRPO steps through rlsys and through TRL's GRPOTrainer.

Three workloads, each an rlsys config with overrides, the same for both sides:
- tiny:               configs/tiny.yaml (a random 0.1M Qwen2 built in code, 8 prompts x 8, up to 16 tokens);
- smollm2-gsm8k:      rlsys/default.yaml (SmolLM2-135M-Instruct, 4 prompts x 8, up to 64 tokens, lr
                      1e-5, beta 0) on GSM8K questions (the chat template and system prompt make a
                      prompt of ~150-250 tokens, as in real R1-Zero work), without evaluation; fp32;
- smollm2-gsm8k-bf16: the same in bfloat16 (TRL: bf16=True; rlsys: ZeRO-1, fp32 master weights).
rlsys runs its defaults (token-budget micro-batches, shared prompts, rows of zero advantage not
computed: the note gives the share computed) plus
RLSYS_BEST (one engine and one learner rank with every core, see rlsys_best), TRL its own.

rlsys side: `rlsys train` of the workload for `steps` steps with profile.enabled=true on a local
Ray cluster (1 vLLM generator, 2 reward workers, 1 DeepSpeed rank sharing this machine's cores).
From its metrics and timeline: the step time split into generate / reward / learn / sync, each
actor group's busy and idle shares, tokens/s.
Peer side: the same workload through TRL's GRPOTrainer (benchmarks/peer_trl.py says exactly what
it does), in one process with all cores, same model, prompts, group size, lengths, learning
rate, reward rule and number of steps.
Both: tokens (prompt + completion, every sample) / seconds, over the steps after the first (the
first carries warm-up on both sides); start-up is reported apart.

Spread: per workload, `repeats` runs of each side taken interleaved (rlsys, TRL, rlsys, TRL, ...;
2 with --quick, 3 without), each run's tokens/s one sample; the figure is the median pairwise
ratio with its lowest and highest, and the target (TARGETS_VS_TRL) counts as met only when the
lowest pairwise ratio meets it (benchmarks/common.py). Each run's per-step times are kept beside
(the spread within a run).

    python benchmarks/end_to_end.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, Figure, Section, in_fresh_process, interleaved, machine, main, ray_up, rlsys_config

GSM8K = ["data.name=gsm8k", "data.split=train"]  # prompts of GSM8K length (the chat template: ~150-250 tokens)
BF16 = ["model.dtype=bfloat16", "learner.zero_stage=1"]  # rlsys's bf16 needs ZeRO >= 1 (fp32 accumulation)
WORKLOADS = {
    "tiny": ("configs/tiny.yaml", []),
    "smollm2-gsm8k": ("rlsys/default.yaml", GSM8K),
    "smollm2-gsm8k-bf16": ("rlsys/default.yaml", GSM8K + BF16),
}
"""name -> (config, overrides): the same workload for both sides."""
def rlsys_best(cores: int) -> list[str]:
    """rlsys's own settings on top of the workload's config: one vLLM engine and one learner rank,
    each with every core. A synchronous step alternates generation and learning, so each phase
    may have the whole machine: one engine decodes all 32 samples in one batch reading the weights
    once per token (two 1-core engines read them twice, at half the batch), and one rank has no
    gradient all-reduce. Measured on the 2-vCPU Intel machine, SmolLM2 fp32: 4 prompts x 8 in
    8.6 s on one 2-thread engine against 11.3 s on two 1-thread engines in parallel; the update
    in 13.1 s on one 2-thread rank against 15.7 s on two 1-thread ranks."""
    return ["generator.num_engines=1", f"generator.num_cpus={cores}", "learner.num_ranks=1",
            f"learner.num_cpus={cores}"]


RLSYS_BEST = rlsys_best(os.cpu_count() or 1)
TARGET_VS_TRL = 3.0
"""rlsys tokens/s over TRL's on the SmolLM2 workloads (issue 28 raised it from 2.0)."""
TARGETS_VS_TRL = {"tiny": 2.0, "smollm2-gsm8k": TARGET_VS_TRL, "smollm2-gsm8k-bf16": TARGET_VS_TRL}
"""workload -> lowest acceptable pairwise ratio; the tiny workload keeps its own 2.0."""


def repeats_of(quick: bool) -> int:
    return 2 if quick else 3


def rlsys_side(config: str, overrides: list[str], steps: int, keep: Path) -> dict:
    """One profiled rlsys run; its metrics and timeline are copied to `keep`."""
    from rlsys.observe.metrics import read_jsonl
    from rlsys.observe.profile import busy_split, read_tracks
    from rlsys.observe.report import PHASES, summarize
    from rlsys.loops.train import train

    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=results) as tmp:  # beside the results: same disk as the kept files
        run_dir = Path(tmp) / "run"
        cfg = rlsys_config([*overrides, *RLSYS_BEST, f"trainer.total_steps={steps}", f"trainer.output_dir={run_dir}",
                            "profile.enabled=true", "eval.every=0"], config)
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
        rows = read_jsonl(run_dir / "metrics.jsonl")
        tracks = read_tracks(run_dir / "timeline.json")
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "timeline.json", "config.yaml", "placement.json"):
            shutil.copy(run_dir / name, keep / name)
    measured = rows[1:] or rows
    step_s = [sum(r[f"timing/{p}"] for p in PHASES) for r in measured]
    summary = summarize(measured)
    driver_steps = sorted((s for s in tracks["driver"] if s["name"] == "step"), key=lambda s: s["ts"])
    return {"steps": steps, "step_s": step_s, "tokens": [r["tokens/total"] for r in measured],
            "tokens_per_s": sum(r["tokens/total"] for r in measured) / summary["loop_s"],
            "step_s_mean": statistics.fmean(step_s),
            "split": summary["split"],
            "groups": busy_split(tracks, skip_steps=1 if len(rows) > 1 else 0),
            "reward": [r["reward/mean"] for r in rows],
            # rows the learner computed (the rest had zero advantage: learner.skip_zero_advantage)
            "rows_computed": [r["rows_computed_frac"] for r in measured],
            "setup_s": wall - sum(s["dur"] for s in driver_steps) / 1e6, "run_files": str(keep.relative_to(REPO))}


def trl_side(config: str, overrides: list[str], steps: int) -> dict:
    """The peer, in a fresh process (TRL's imports and threads stay out of the rlsys driver)."""
    from benchmarks.peer_trl import run_trl

    cfg = rlsys_config(overrides, config)
    with tempfile.TemporaryDirectory() as tmp:
        return run_trl(cfg, steps, Path(tmp))


def mean_shares(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each actor group's busy/idle shares, the mean over the repeats (untimed: a share of wall time)."""
    groups = runs[0]["groups"]
    return {g: {p: statistics.fmean(r["groups"][g].get(p, 0.0) for r in runs) for p in shares}
            for g, shares in groups.items()}


def peer_figures(name: str, ours: list[dict], theirs: list[dict], cpu: str) -> tuple[list[Figure], float]:
    """The rlsys-vs-TRL figures of one workload from its interleaved repeats (ours[i] ran right
    before theirs[i]): tokens/s (target TARGETS_VS_TRL[name], judged on the lowest pairwise ratio)
    and step time; and the generation-free bound of TRL's median step (Amdahl: were generation
    free, TRL's step would shrink by its generation time and no more)."""
    trl_step = statistics.median(t["step_s_mean"] for t in theirs)
    trl_gen = statistics.median(t["generate_s_mean"] for t in theirs)
    bound = trl_step / (trl_step - trl_gen)
    split = {p: statistics.median(o["split"][p] for o in ours) for p in ("generate", "learn")}
    computed = statistics.fmean(x for o in ours for x in o["rows_computed"])
    first = theirs[0]
    figures = [
        Figure.repeated(
            f"{name}: rlsys end-to-end GRPO tokens/s", [o["tokens_per_s"] for o in ours], "tokens/s",
            f"TRL {first['trl_version']} GRPOTrainer, same workload, same machine",
            [t["tokens_per_s"] for t in theirs], target=TARGETS_VS_TRL.get(name, TARGET_VS_TRL),
            note=f"on {cpu}; {len(ours)} runs a side, interleaved (rlsys, TRL, ...); TRL generates with "
                 f"{first['generation']}, {trl_gen:.2f}s of its {trl_step:.2f}s step (medians); a system whose "
                 f"generation took no time at all and trained as fast as TRL would be {bound:.2f}x; rlsys: "
                 f"generate {100 * split['generate']:.0f}%, learn {100 * split['learn']:.0f}% of its step; rlsys's "
                 f"learner computed {100 * computed:.0f}% of the rows (the rest had zero advantage: no gradient at "
                 f"beta 0, learner.skip_zero_advantage), TRL computes every row"),
        Figure.repeated(
            f"{name}: rlsys step time", [o["step_s_mean"] for o in ours], "s", "TRL GRPOTrainer step time",
            [t["step_s_mean"] for t in theirs], lower_is_better=True, note=f"on {cpu}")]
    return figures, bound


def run(quick: bool) -> list[Section]:
    import ray

    steps = {name: (6 if name == "tiny" else 3) if quick else (20 if name == "tiny" else 8) for name in WORKLOADS}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    e2e = Section("end_to_end", {"workloads": WORKLOADS, "rlsys_only": RLSYS_BEST,
                                 "steps": steps, "measured": "steps after the first"})
    repeats = repeats_of(quick)
    cpu = machine()["cpu"]
    e2e.params |= {"repeats": repeats, "cpu": cpu}
    peer = Section("peer", {"steps": steps, "repeats": repeats, "cpu": cpu,
                            "target_tokens_per_s_ratio": TARGETS_VS_TRL, "interleaved": "rlsys, TRL, rlsys, TRL, ..."})
    for name, (config, overrides) in WORKLOADS.items():
        ours, theirs = [], []

        def rlsys_once() -> float:
            ray_up()
            keep = REPO / "benchmarks" / "results" / f"e2e-{name}-{stamp}" / f"repeat-{len(ours)}"
            ours.append(rlsys_side(config, overrides, steps[name], keep))
            ray.shutdown()  # the peer gets the machine to itself
            print(f"[end_to_end] rlsys {name} (repeat {len(ours)}): {ours[-1]['tokens_per_s']:.0f} tokens/s, "
                  f"{ours[-1]['step_s_mean']:.2f}s a step", flush=True)
            return ours[-1]["tokens_per_s"]

        def trl_once() -> float:
            theirs.append(in_fresh_process(trl_side, config, overrides, steps[name]))
            print(f"[end_to_end] TRL {name} (repeat {len(theirs)}): {theirs[-1]['tokens_per_s']:.0f} tokens/s, "
                  f"{theirs[-1]['step_s_mean']:.2f}s a step", flush=True)
            return theirs[-1]["tokens_per_s"]

        # Interleaved (rlsys, TRL, rlsys, TRL, ...): a slow minute of a shared machine hits both sides
        # alike. Every run starts cold on both sides (Ray cluster and actors; TRL's fresh process); its
        # first step is left out of its tokens/s.
        interleaved(rlsys_once, trl_once, repeats)
        groups = mean_shares(ours)
        e2e.rows.append({"workload": name, "groups": groups, "tokens_per_s": statistics.median(
            o["tokens_per_s"] for o in ours), "step_s_mean": statistics.median(o["step_s_mean"] for o in ours),
                         "repeats": ours})
        for group, shares in groups.items():
            e2e.figures.append(Figure(
                f"{name}: {group} actors busy share", 1.0 - shares["idle"], "of wall",
                "the whole step (busy all the time)", 1.0,
                note=", ".join(f"{p} {100 * v:.0f}%" for p, v in shares.items()) + f" (mean of {len(ours)} runs)"))
        figures, bound = peer_figures(name, ours, theirs, cpu)
        keys = ("tokens_per_s", "step_s_mean", "setup_s", "tokens", "step_s")
        peer.rows.append({
            "workload": name,
            # the medians, under the keys a single run had (benchmarks/plots.py reads rlsys/trl tokens_per_s)
            "rlsys": {"tokens_per_s": figures[0].value, "step_s_mean": figures[1].value,
                      "setup_s": statistics.median(o["setup_s"] for o in ours)},
            "trl": {"tokens_per_s": figures[0].reference_value, "step_s_mean": figures[1].reference_value,
                    "setup_s": statistics.median(t["setup_s"] for t in theirs),
                    "generate_s_mean": statistics.median(t["generate_s_mean"] for t in theirs)},
            "rlsys_repeats": [{k: o[k] for k in keys} for o in ours],
            "trl_repeats": [{k: v for k, v in t.items() if k != "what_it_does"} for t in theirs],
            "generation_free_bound": bound})
        peer.figures += figures
        peer.params.setdefault("trl_does", {})[name] = theirs[0]["what_it_does"]
    peer.params["rlsys_does"] = (
        f"per step ({' '.join(RLSYS_BEST)}): one vLLM engine (a Ray actor with every core) samples "
        "group_size answers per prompt with log-probs; 2 reward workers score them (rule in a killable "
        "child process); one DeepSpeed rank (ZeRO-0 fp32, ZeRO-1 bf16) runs forward+backward+AdamW with "
        "each group's prompt shared by its answers (no separate old-log-prob pass: one epoch, one "
        "mini-batch); it broadcasts the new weights to the engine over gloo, which loads them in place")
    return [e2e, peer]


if __name__ == "__main__":
    main(run)
