"""Rollout: generated tokens/s of the generators, and vLLM against HF generate.

1. vLLM vs HF `generate` (target: vLLM >= 1.5x): the same model, prompts, batch, group size,
   sampling (temperature 1, top-p 1) and exactly T new tokens per sample on both sides (vLLM
   min_tokens = max_tokens = T; HF min_new_tokens = max_new_tokens = T), fp32, with the machine's
   threads. vLLM runs as rlsys runs it (rlsys.actors.generator.Generator: an in-process engine
   that also returns each token's log-prob); HF samples num_return_sequences = n from a
   left-padded batch.
   Spread: `repeats` samples a side (2 with --quick, 3 without), taken interleaved (vLLM, HF,
   vLLM, HF, ...), each sample a fresh process that loads its side, makes one untimed call of the
   very batch it then times once (loading and warm-up stay out of the time). A fresh process per
   sample rather than two processes kept up side by side: it is the simplest way to keep the
   sides equal (nothing of the other side, no idle engine or spinning OpenMP threads, shares the
   cores while one side is timed), at the cost of a model load per sample. A figure is the median
   pairwise ratio with its lowest and highest, and the target counts as met only when the lowest
   pairwise ratio meets it (benchmarks/common.py).
2. Prefix caching on group sampling: a long prompt, n = 16 samples each, a few new tokens: with
   caching the n samples share the prompt's KV; without, each prefills it again. On, off, on,
   off, ...: a fresh process per sample as in 1.
3. The generator pool on the Ray cluster (GeneratorPool over GeneratorActors, 1 CPU each):
   tokens/s against the number of engines, the number of prompts in the batch, and the group size.
   A pool of 1 engine and one of 2 are up together (one launch of 3 engines, split); each round
   times every batch in turn (1 engine 16 x 8, then 2 engines: 16 x 8, 4 x 8, 64 x 8, 16 x 2,
   16 x 32), `repeats` rounds after a warm-up, and a figure pairs round i of its two sides.

    python benchmarks/rollout.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import time

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, in_fresh_process, interleaved, main, ray_up, rlsys_config, tiny_model

TARGET_VS_HF = 1.5


def _threads() -> None:
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count())


def fp32_roofline() -> float:
    """This machine's fp32 matmul FLOP/s on all its threads (rlsys.observe.hardware), fresh process."""
    _threads()
    from rlsys.observe.hardware import matmul_roofline

    return matmul_roofline(("float32",), device="cpu")["float32"]


def requests(model_path: str, prompts: list[str]) -> list[tuple[int, int, list[int], str]]:
    """The generators' requests for prompt texts, tokenised as the HF side tokenises them."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(prompts, add_special_tokens=False)["input_ids"]
    return [(i, i, row, "") for i, row in enumerate(ids)]


def vllm_side(model_path: str, prompts: list[str], n: int, tokens: int, prefix_caching: bool = True) -> float:
    """Seconds of one generate call over the whole batch, after one untimed call of the same batch
    (in a fresh process: loading stays out of the time)."""
    _threads()
    from rlsys.config import GeneratorConfig
    from rlsys.actors.generator import Generator

    cfg = GeneratorConfig(max_tokens=tokens, max_model_len=2048, enable_prefix_caching=prefix_caching,
                          kv_cache_gib=2, gpu_memory_utilization=0.5)
    gen = Generator(model_path, cfg, "float32", seed=0)
    batch = requests(model_path, prompts)
    gen.generate(batch, n=n, min_tokens=tokens)  # warm-up: the very call that is timed
    start = time.perf_counter()
    rollouts = gen.generate(batch, n=n, min_tokens=tokens)
    seconds = time.perf_counter() - start
    assert all(len(r.response_ids) == tokens for r in rollouts), "vLLM did not generate exactly T tokens"
    return seconds


def hf_side(model_path: str, prompts: list[str], n: int, tokens: int) -> float:
    """As vllm_side, with HF generate."""
    _threads()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate(inputs):
        with torch.inference_mode():
            return model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens,
                                  pad_token_id=tokenizer.pad_token_id)

    generate(batch)  # warm-up: the very call that is timed
    start = time.perf_counter()
    out = generate(batch)
    seconds = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == tokens, "HF did not generate exactly T tokens"
    return seconds


def workload_prompts(config: str, count: int, overrides: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """(model path, templated prompt texts) of an rlsys config (with overrides): what its run would
    generate from."""
    from transformers import AutoTokenizer

    from rlsys.data.prompts import PromptStream
    from rlsys.data.models import resolve_model

    cfg = rlsys_config(list(overrides), config)
    path = resolve_model(cfg.model)
    stream = PromptStream(cfg.data, seed=0, tokenizer=AutoTokenizer.from_pretrained(path))
    return path, [p.text for p in stream.next(count)]


def generate_flops(model_path: str, prompts: list[str], n: int, tokens: int) -> int:
    """Model FLOPs of n samples of `tokens` new tokens per prompt, each sample computed on its own
    (prompt + its tokens; the output layer at each new token): the same count for both sides."""
    from transformers import AutoConfig

    from rlsys.math.flops import Shape, forward_flops

    shape = Shape.of(AutoConfig.from_pretrained(model_path))
    return n * sum(forward_flops(shape, len(ids) + tokens, tokens) for _, _, ids, _ in requests(model_path, prompts))


def vllm_vs_hf(section: Section, name: str, model_path: str, prompts: list[str], n: int, tokens: int,
               repeats: int, roofline: float | None = None) -> None:
    """roofline: this machine's fp32 matmul FLOP/s; each side's model FLOP/s is then also shown as a
    share of it. The vLLM/HF ratio depends on the machine's BLAS: HF's fp32 linears run on MKL, which
    takes its AVX-512 kernels on Intel only, while vLLM's run on oneDNN (AVX-512 on both), so the
    same code shows a smaller ratio on an Intel Xeon than on an AMD EPYC. The share of the roofline
    means the same on both."""
    generated = len(prompts) * n * tokens
    # vLLM, HF, vLLM, HF, ...: each call a fresh process (see the module's docstring)
    ours_s, hf_s = interleaved(lambda: in_fresh_process(vllm_side, model_path, prompts, n, tokens),
                               lambda: in_fresh_process(hf_side, model_path, prompts, n, tokens), repeats)
    ours, hf = statistics.median(ours_s), statistics.median(hf_s)
    flops = generate_flops(model_path, prompts, n, tokens)
    section.rows.append({"what": "vllm_vs_hf", "model": name, "prompts": len(prompts), "n": n, "tokens": tokens,
                         "vllm_s": ours, "hf_s": hf, "vllm_s_repeats": ours_s, "hf_s_repeats": hf_s,
                         "model_flops": flops})
    print(f"[rollout] {name}: vLLM {generated / ours:.0f} tokens/s ({flops / ours / 1e9:.0f} GFLOP/s), "
          f"HF generate {generated / hf:.0f} ({flops / hf / 1e9:.0f} GFLOP/s), medians of {repeats}", flush=True)
    section.figures.append(Figure.repeated(
        f"vLLM generate {name} ({len(prompts)} prompts x {n}, {tokens} new) tokens/s", [generated / x for x in ours_s],
        "tokens/s", "HF generate, same model, prompts, batch and sampling, exactly as many tokens",
        [generated / x for x in hf_s], target=TARGET_VS_HF, note="vLLM side also returns every token's log-prob"))
    if roofline:
        section.figures.append(Figure.repeated(
            f"vLLM generate {name} model TFLOP/s", [flops / x / 1e12 for x in ours_s], "TFLOP/s",
            "fp32 matmul roofline of this machine, measured in this run", [roofline / 1e12] * len(ours_s),
            note=f"ratio = share of the roofline; HF generate: {100 * flops / hf / roofline:.0f}% (median)"))


def prefix_caching(section: Section, model_path: str, prompt: str, prompts: int, n: int, tokens: int,
                   repeats: int) -> None:
    batch = [f"{i}: {prompt}" for i in range(prompts)]  # distinct prompts: only the n siblings may share
    on, off = interleaved(lambda: in_fresh_process(vllm_side, model_path, batch, n, tokens, True),
                          lambda: in_fresh_process(vllm_side, model_path, batch, n, tokens, False), repeats)
    section.rows.append({"what": "prefix_caching", "prompts": prompts, "n": n, "tokens": tokens,
                         "on_s": statistics.median(on), "off_s": statistics.median(off), "on_s_repeats": on,
                         "off_s_repeats": off})
    section.figures.append(Figure.repeated(
        f"group sampling with prefix caching ({prompts} long prompts x {n}, {tokens} new) seconds", on, "s",
        "the same with enable_prefix_caching=false", off, lower_is_better=True))


def pool(section: Section, model_path: str, repeats: int) -> None:
    """A pool of 1 engine and one of 2, up together; `repeats` rounds, each timing every batch in turn."""
    from rlsys.cluster.groups import init_ray, launch
    from rlsys.cluster.pool import GeneratorPool

    base_prompts = workload_prompts("configs/tiny.yaml", 64)[1]
    tokens = 32
    # (engines, prompts, n) in the order of a round
    sweep = [(1, 16, 8), (2, 16, 8), (2, 4, 8), (2, 64, 8), (2, 16, 2), (2, 16, 32)]
    # One launch of 3 engines (rlsys's placement groups are named: two launches would clash), split
    # into a pool of 1 and a pool of 2 (each a GeneratorPool of its engines, as launch makes one).
    cfg = rlsys_config([f"model.path={model_path}", "generator.num_engines=3", "generator.num_cpus=1",
                        f"generator.max_tokens={tokens}", "generator.max_model_len=512", "reward.num_workers=1"])
    init_ray(cfg)
    groups = launch(cfg, model_path, "math", train=False)
    try:
        started = groups.generators.engines
        pools = {size: GeneratorPool(part, generate_timeout_s=cfg.deadlines.generate_s,
                                     chunks_per_engine=cfg.generator.chunks_per_engine)
                 for size, part in ((1, started[:1]), (2, started[1:]))}

        def rate(engines: int, prompts: int, n: int) -> float:
            batch = requests(model_path, base_prompts[:prompts])
            start = time.perf_counter()
            rollouts = pools[engines].generate(batch, n=n, min_tokens=tokens)
            return sum(len(r.response_ids) for r in rollouts) / (time.perf_counter() - start)

        for engines in pools:
            rate(engines, 4, 2)  # warm-up
        rates: dict[tuple[int, int, int], list[float]] = {key: [] for key in sweep}
        for _ in range(repeats):
            for key in sweep:
                rates[key].append(rate(*key))
    finally:
        groups.shutdown()
    for (engines, prompts, n), got in rates.items():
        section.rows.append({"what": "pool", "engines": engines, "prompts": prompts, "n": n,
                             "tokens_per_s": statistics.median(got), "tokens_per_s_repeats": got})
        print(f"[rollout] pool {engines} engines, {prompts} prompts x {n}: {statistics.median(got):.0f} tokens/s "
              f"({min(got):.0f}-{max(got):.0f})", flush=True)
    section.figures.append(Figure.repeated("generator pool, 2 engines (16 prompts x 8) tokens/s", rates[2, 16, 8],
                                           "tokens/s", "1 engine, same batch", rates[1, 16, 8],
                                           note="1 CPU per engine; both pools up, rounds alternate them"))
    for prompts, n in ((4, 8), (64, 8)):
        section.figures.append(Figure.repeated(f"generator pool, 2 engines, {prompts} prompts x {n} tokens/s",
                                               rates[2, prompts, n], "tokens/s", "16 prompts x 8", rates[2, 16, 8]))
    for prompts, n in ((16, 2), (16, 32)):
        section.figures.append(Figure.repeated(f"generator pool, 2 engines, group size {n} (16 prompts) tokens/s",
                                               rates[2, prompts, n], "tokens/s", "group size 8", rates[2, 16, 8]))


def run(quick: bool) -> Section:
    repeats = 2 if quick else 3
    tiny_path, params = tiny_model(384, 8, 6)
    roofline = in_fresh_process(fp32_roofline)
    section = Section("rollout", {"repeats": repeats, "dtype": "float32", "tiny_params": params,
                                  "threads": os.cpu_count(), "fp32_matmul_roofline_flops_per_s": roofline})
    _, tiny_prompts = workload_prompts("configs/tiny.yaml", 16)
    vllm_vs_hf(section, "tiny-10M", tiny_path, tiny_prompts, n=8, tokens=64, repeats=repeats)
    smol_path, smol_prompts = workload_prompts("rlsys/default.yaml", 4)  # the quickstart's model and prompts
    vllm_vs_hf(section, "smollm2-135m", smol_path, smol_prompts, n=8, tokens=32 if quick else 64, repeats=repeats,
               roofline=roofline)
    long_prompt = " ".join(tiny_prompts) * 4
    prefix_caching(section, tiny_path, long_prompt[:1500], prompts=4, n=16, tokens=4, repeats=repeats)
    ray_up()
    pool(section, tiny_path, repeats)
    return section


if __name__ == "__main__":
    main(run)
