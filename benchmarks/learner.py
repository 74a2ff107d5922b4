"""Learner: GRPO training tokens/s per ZeRO stage and precision, and MFU.

A 2-rank DeepSpeed learner group on the local Ray cluster trains on a synthetic rollout batch of
fixed lengths (random tokens, random rewards: the cost of a step does not depend on what the
tokens say). Each update is what a training step does: old log-probs without grad, then forward
+ backward + optimizer step per mini-batch. One warm-up update, then the median of `repeats`.

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

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, hardware, main, ray_up, rlsys_config, timed, tiny_model
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


def measure(model_path: str, zero: int, dtype: str, shape: dict, repeats: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer
    from ray.util.placement_group import remove_placement_group
    import ray

    from rlsys.math.flops import Shape, grpo_step_flops
    from rlsys.cluster.groups import init_ray, start_learner_group

    P, G, Lp, Lr = shape["prompts"], shape["group"], shape["prompt_len"], shape["response_len"]
    cfg = rlsys_config([f"model.path={model_path}", f"model.dtype={dtype}", f"learner.zero_stage={zero}",
                        "learner.num_ranks=2", f"learner.mini_batch_size={P * G}", "learner.micro_batch_size=8",
                        f"data.prompts_per_step={P}", f"algo.group_size={G}", "algo.beta=0"])
    init_ray(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = synthetic_batch(P, G, Lp, Lr, len(tokenizer), cfg.algo)
    group, pg = start_learner_group(cfg, model_path)
    try:
        group.train(batch)  # warm-up: allocator, optimizer state, DeepSpeed buffers
        seconds, _ = timed(lambda: group.train(batch), repeats)
    finally:
        for a in group.actors:
            ray.kill(a)
        remove_placement_group(pg)
    tokens = P * G * (Lp + Lr)
    # One mini-batch of the whole batch, one epoch: the learner skips the old-log-prob pass.
    flops = grpo_step_flops(Shape.of(AutoConfig.from_pretrained(model_path)), [Lp + Lr] * (P * G),
                            epochs=cfg.learner.epochs, reference=cfg.algo.beta > 0, response_lens=[Lr] * (P * G),
                            old_logprob_pass=False)
    return {"zero": zero, "dtype": dtype, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "flops": flops, "flops_per_s": flops / seconds}


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
    roofline = best_of(matmul_roofline(), matmul_roofline())
    override = hw["peak_source"].startswith("override")
    source = hw["peak_source"] if override else "measured matmul roofline (this run)"
    section = Section("learner", {"batch": shape, "ranks": 2, "micro_batch": 8, "repeats": repeats,
                                  "models": list(models), "peak_source": source, "estimate_flops_per_s": estimate,
                                  "estimate": hw["cpu_estimate"]})
    ray_up()
    measured = []
    for name, path in models.items():
        base = None
        for zero, dtype in settings:
            m = measure(path, zero, dtype, shape, repeats)
            section.rows.append({"model": name, **m})
            print(f"[learner] {name} ZeRO-{zero} {dtype}: {m['tokens_per_s']:.0f} tokens/s "
                  f"({m['seconds']:.2f}s an update)", flush=True)
            base = base or m
            section.figures.append(Figure(
                f"learner {name} ZeRO-{zero} {dtype} tokens/s", m["tokens_per_s"], "tokens/s",
                f"ZeRO-{base['zero']} {base['dtype']}, same model and batch", base["tokens_per_s"]))
            measured.append((name, zero, dtype, m))
    roofline = best_of(roofline, matmul_roofline())
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
        section.figures.append(Figure(
            f"matmul roofline {dtype} (n={roofline['n'][dtype]}) TFLOP/s", roofline[dtype] / 1e12, "TFLOP/s",
            f"ISA estimate: {hw['cpu_estimate']['units'][dtype]} x {hw['cpu_estimate']['cores']} cores x "
            f"{hw['cpu_estimate']['ghz']:.2f} GHz", estimate[dtype] / 1e12,
            note="ratio = what torch.matmul reaches of the estimate"))
    for name, zero, dtype, m in measured:
        print(f"[learner] {name} ZeRO-{zero} {dtype} MFU: {100 * m['flops_per_s'] / peak[dtype]:.1f}% of {source} "
              f"({m['flops_per_s'] / 1e9:.1f} of {peak[dtype] / 1e9:.0f} GFLOP/s)"
              + (f"; {100 * m['flops_per_s'] / estimate[dtype]:.1f}% of the ISA estimate" if estimate[dtype] else ""),
              flush=True)
        section.figures.append(Figure(
            f"learner {name} ZeRO-{zero} {dtype} MFU", m["flops_per_s"] / 1e12, "TFLOP/s",
            f"{dtype} peak: {source}", peak[dtype] / 1e12,
            note=f"ratio = MFU; against the ISA estimate ({estimate[dtype] / 1e12:.3g} TFLOP/s): "
                 f"{100 * m['flops_per_s'] / estimate[dtype]:.1f}%" if estimate[dtype] else "ratio = MFU"))
    return section


if __name__ == "__main__":
    main(run)
