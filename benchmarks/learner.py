"""Learner: GRPO training tokens/s per ZeRO stage and precision, and MFU.

A 2-rank DeepSpeed learner group on the local Ray cluster trains on a synthetic rollout batch of
fixed lengths (random tokens, random rewards: the cost of a step does not depend on what the
tokens say). Each update is what a training step does: old log-probs without grad, then forward
+ backward + optimizer step per mini-batch. One warm-up update per group.

Spread: the reference setting (the first: ZeRO-0 fp32) keeps its group up while each other
setting's group comes up beside it, and their updates alternate (setting, reference, setting,
reference, ...: `repeats` each, 2 with --quick, 3 without), so a slow minute of a shared machine
hits both alike; each update's tokens/s is one sample, and a figure is the median pairwise ratio
with its lowest and highest (benchmarks/common.py). Right after every timed update the driver
measures the matmul roofline of that update's precision (the actors idle meanwhile): the update's
MFU sample is its FLOP/s over that roofline, so a busy minute lowers both sides of the pair.

tokens/s counts real tokens (prompt + response, no padding). MFU = model FLOPs of the update
(rlsys/math/flops.py: matmuls and causal attention, the output layer where a token is scored; 3 x
epochs forwards: one epoch over one mini-batch needs no separate old-log-prob pass) / seconds /
the peak for the precision: a matmul roofline measured at the start of this run on the cores it may
use (rlsys.observe.hardware.matmul_roofline), so that MFU means the same on every machine, or the
override in benchmarks/hardware.yaml when it sets one. The estimate from the CPU's instruction set
(ISA x cores x clock) is shown beside it, and the roofline is a figure of its own against it.

The bf16/fp32 speed-up depends on the machine's BLAS, not only on its bf16 units: fp32 linears run
on MKL, which takes its AVX-512 kernels on Intel CPUs only (on AMD it falls back to narrower
ones), while bf16 ones run on oneDNN (AMX tiles on a Xeon with amx_bf16, AVX512_BF16 on Zen 4/5).
On a 2-vCPU Xeon with AMX the matmuls of a SmolLM2 micro-batch get 3.4x faster in bf16 but the
rest (attention backward, elementwise ops, dtype copies: 40% of the bf16 time) does not, so the
step gains ~1.7x; with MKL held to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2, what it does on AMD) the
fp32 step is 1.55x slower and the ratio ~2.6x (benchmarks/cpu_tuning.py train).

    python benchmarks/learner.py [--quick]
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, hardware, main, ray_up, rlsys_config, tiny_model
from rlsys.observe.hardware import best_of, describe, matmul_roofline


def synthetic_batch(prompts: int, group: int, prompt_len: int, response_len: int, vocab: int, algo, seed: int = 0):
    from rlsys.math.batch import make_batch
    from rlsys.types import Rollout

    rng = random.Random(seed)
    rollouts = []
    for g in range(prompts):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        for _ in range(group):
            response = [rng.randrange(vocab) for _ in range(response_len)]
            rollouts.append(Rollout(g, g, prompt, response, [-1.0] * response_len, "", "length", 0, ""))
    rewards = [rng.random() for _ in rollouts]
    return make_batch(rollouts, rewards, algo)


class Live:
    """A 2-rank learner group of one setting, up and warmed, timing one update per call."""

    def __init__(self, model_path: str, zero: int, dtype: str, shape: dict):
        from transformers import AutoConfig, AutoTokenizer

        from rlsys.cluster.groups import init_ray
        from rlsys.cluster.learners import start_learner_group
        from rlsys.math.flops import Shape, grpo_step_flops

        P, G, Lp, Lr = shape["prompts"], shape["group"], shape["prompt_len"], shape["response_len"]
        cfg = rlsys_config([f"model.path={model_path}", f"model.dtype={dtype}", f"learner.zero_stage={zero}",
                            "learner.num_ranks=2", f"learner.mini_batch_size={P * G}", "learner.micro_batch_size=8",
                            f"data.prompts_per_step={P}", f"algo.group_size={G}", "algo.beta=0"])
        init_ray(cfg)
        self.zero, self.dtype = zero, dtype
        self.batch = synthetic_batch(P, G, Lp, Lr, len(AutoTokenizer.from_pretrained(model_path)), cfg.algo)
        self.tokens = P * G * (Lp + Lr)
        # One mini-batch of the whole batch, one epoch: the learner skips the old-log-prob pass.
        self.flops = grpo_step_flops(Shape.of(AutoConfig.from_pretrained(model_path)), [Lp + Lr] * (P * G),
                                     epochs=cfg.learner.epochs, reference=cfg.algo.beta > 0,
                                     response_lens=[Lr] * (P * G), old_logprob_pass=False)
        # a placement group of its own name: the reference's group is up beside each setting's
        self.group, self.pg = start_learner_group(cfg, model_path, placement_name=f"rlsys-learners-{zero}-{dtype}")
        self.seconds: list[float] = []
        try:
            self.group.train(self.batch)  # warm-up: allocator, optimizer state, DeepSpeed buffers
        except BaseException:
            self.close()
            raise

    def update(self) -> float:
        """One timed update; returns its tokens/s (its seconds kept in `seconds`)."""
        start = time.perf_counter()
        self.group.train(self.batch)
        self.seconds.append(time.perf_counter() - start)
        return self.tokens / self.seconds[-1]

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.group.actors:
            ray.kill(a)
        remove_placement_group(self.pg)

    def __enter__(self) -> "Live":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def result(live: Live, seconds: list[float]) -> dict:
    """A setting's row: medians under the keys a single measurement had, every update beside."""
    median = statistics.median(seconds)
    return {"zero": live.zero, "dtype": live.dtype, "seconds": median, "tokens": live.tokens,
            "tokens_per_s": live.tokens / median, "flops": live.flops, "flops_per_s": live.flops / median,
            "seconds_repeats": list(seconds)}


def measure(model_path: str, zero: int, dtype: str, shape: dict, repeats: int) -> dict:
    """One setting alone: `repeats` updates after the warm-up."""
    with Live(model_path, zero, dtype, shape) as live:
        for _ in range(repeats):
            live.update()
        return result(live, live.seconds)


def paired_sweep(models: dict[str, str], settings: list[tuple[int, str]], shape: dict, repeats: int,
                 roofline: Callable[[str], float]) -> list[dict]:
    """Per model, the first setting's group stays up while each other setting's comes up beside it;
    their updates alternate (setting, reference, ...), each followed by `roofline(dtype)` of its
    precision. Returns per model and setting: its update seconds, the reference's seconds taken
    in the same pairs, and the roofline after each of its updates."""
    out = []
    for name, path in models.items():
        (bz, bd), others = settings[0], settings[1:]
        with Live(path, bz, bd, shape) as base:
            base_roofs: list[float] = []
            for zero, dtype in others:
                with Live(path, zero, dtype, shape) as live:
                    roofs, base_s = [], []
                    for _ in range(repeats):
                        live.update()
                        roofs.append(roofline(dtype))
                        base.update()
                        base_s.append(base.seconds[-1])
                        base_roofs.append(roofline(bd))
                    out.append({"model": name, "live": live, "seconds": list(live.seconds), "roofline": roofs,
                                "base_seconds": base_s, "base": False})
                    print(f"[learner] {name} ZeRO-{zero} {dtype}: {live.tokens / statistics.median(live.seconds):.0f} "
                          f"tokens/s ({statistics.median(live.seconds):.2f}s an update; ZeRO-{bz} {bd} "
                          f"{statistics.median(base_s):.2f}s in the same pairs)", flush=True)
            out.insert(len(out) - len(others), {"model": name, "live": base, "seconds": list(base.seconds),
                                                "roofline": base_roofs, "base_seconds": list(base.seconds),
                                                "base": True})
    return out


def run(quick: bool) -> Section:
    from rlsys.config import ModelConfig
    from rlsys.data.models import resolve_model

    shape = {"prompts": 4, "group": 8, "prompt_len": 32, "response_len": 96}
    models = {"tiny-10M": tiny_model(384, 8, 6)[0]}
    # bf16 starts at ZeRO-1: DeepSpeed accumulates ZeRO-0 bf16 gradients in bf16 (rlsys refuses it).
    settings = [(0, "float32"), (1, "bfloat16"), (3, "float32"), (3, "bfloat16")]
    if not quick:
        models["smollm2-135m"] = resolve_model(ModelConfig(path="smollm2-135m-instruct"))
        settings += [(1, "float32"), (2, "float32"), (2, "bfloat16")]
    repeats = 2 if quick else 3
    hw = hardware()
    estimate = {k: hw["cpu_estimate"][k] for k in ("float32", "bfloat16")}
    # Before any actor starts, twice (the best: other work on a shared machine only lowers it), and
    # again after the learner runs, before the figures are made.
    before = [matmul_roofline(), matmul_roofline()]
    roofline = best_of(*before)
    override = hw["peak_source"].startswith("override")
    source = hw["peak_source"] if override else "measured matmul roofline (this run)"
    section = Section("learner", {"batch": shape, "ranks": 2, "micro_batch": 8, "repeats": repeats,
                                  "models": list(models), "peak_source": source, "estimate_flops_per_s": estimate,
                                  "estimate": hw["cpu_estimate"]})
    ray_up()
    # after every timed update, its precision's roofline (the driver's cores: the actors wait)
    paired_roofs: list[dict] = []

    def roofline_now(dtype: str) -> float:
        paired_roofs.append(matmul_roofline((dtype,), seconds=0.5, repeats=3))
        return paired_roofs[-1][dtype]

    measured = paired_sweep(models, settings, shape, repeats, roofline_now)
    for m in measured:
        live = m["live"]
        row = result(live, m["seconds"])
        section.rows.append({"model": m["model"], **row, "roofline_repeats": m["roofline"],
                             "reference_seconds_repeats": m["base_seconds"]})
        if m["base"]:
            print(f"[learner] {m['model']} ZeRO-{live.zero} {live.dtype} (the reference): {row['tokens_per_s']:.0f} "
                  f"tokens/s over {len(m['seconds'])} updates", flush=True)
        bz, bd = settings[0]
        section.figures.append(Figure.repeated(
            f"learner {m['model']} ZeRO-{live.zero} {live.dtype} tokens/s", [live.tokens / x for x in m["seconds"]],
            "tokens/s", f"ZeRO-{bz} {bd}, same model and batch" + (" (itself: its updates' spread)" if m["base"] else
                                                                  ", updates alternated with these"),
            [live.tokens / x for x in m["base_seconds"]]))
    roofline = best_of(*before, *paired_roofs, matmul_roofline())
    peak = {k: v * 1e12 for k, v in hw["peak_tflops"].items()} if override else {k: roofline[k] for k in estimate}
    section.params |= {"peak_flops_per_s": peak, "roofline": roofline}
    busy = roofline["other_load_cores"]
    print(f"[learner] matmul roofline: {describe(roofline)} (n={roofline['n']}, {roofline['threads']} threads, best of "
          f"{len(roofline['measurements'])}); ISA estimate: {describe(estimate)} ({hw['cpu_estimate']['units']}, "
          f"{hw['cpu_estimate']['cores']} cores x {hw['cpu_estimate']['ghz']:.2f} GHz); MFU against: {source}",
          flush=True)
    if busy and busy > 0.1 * (roofline["threads"] or 1):
        print(f"[learner] WARNING: other processes used {busy} cores while the roofline was measured: it is low and "
              f"MFU high by up to that share", flush=True)
    for dtype in ("float32", "bfloat16") if all(estimate.values()) else ():  # no estimate off Linux
        # every roofline measured in this run (before, between the updates, after): its spread
        roofs = [r[dtype] for r in roofline["measurements"] if dtype in r]
        section.figures.append(Figure.repeated(
            f"matmul roofline {dtype} TFLOP/s", [r / 1e12 for r in roofs], "TFLOP/s",
            f"ISA estimate: {hw['cpu_estimate']['units'][dtype]} x {hw['cpu_estimate']['cores']} cores x "
            f"{hw['cpu_estimate']['ghz']:.2f} GHz", [estimate[dtype] / 1e12] * len(roofs),
            note=f"ratio = what torch.matmul reaches of the estimate; {len(roofs)} measurements in this run (2 "
                 f"before the learners, 1 after each timed update of this precision, 1 after the learners); the "
                 f"best: {roofline[dtype] / 1e12:.3g} TFLOP/s (n={roofline['n'][dtype]})"))
    for m in measured:
        live = m["live"]
        name, zero, dtype = m["model"], live.zero, live.dtype
        flops_per_s = [live.flops / x for x in m["seconds"]]
        median = statistics.median(flops_per_s)
        # each update against the roofline measured right after it (or the override, a constant)
        peaks = [peak[dtype]] * len(m["roofline"]) if override else m["roofline"]
        fig = Figure.repeated(
            f"learner {name} ZeRO-{zero} {dtype} MFU", [f / 1e12 for f in flops_per_s], "TFLOP/s",
            f"{dtype} peak: {source}" + ("" if override else ", measured right after each update"),
            [x / 1e12 for x in peaks],
            note=f"ratio = MFU; against the ISA estimate ({estimate[dtype] / 1e12:.3g} TFLOP/s): "
                 f"{100 * median / estimate[dtype]:.1f}%" if estimate[dtype] else "ratio = MFU")
        section.figures.append(fig)
        lo, hi = fig.ratio_range
        print(f"[learner] {name} ZeRO-{zero} {dtype} MFU: {100 * fig.ratio:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}) of "
              f"{source} ({median / 1e9:.1f} GFLOP/s)"
              + (f"; {100 * median / estimate[dtype]:.1f}% of the ISA estimate" if estimate[dtype] else ""),
              flush=True)
    return section


if __name__ == "__main__":
    main(run)
