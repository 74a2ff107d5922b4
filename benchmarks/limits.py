"""Limits: how close each stage of a GRPO step comes to what this machine can do, on SmolLM2-135M
in fp32 and bf16, every limit measured in the same run.

The step is the end-to-end GSM8K workload's (benchmarks/end_to_end.py: 4 prompts x 8 samples,
~200-token templated prompts, 64-token answers), in rlsys's own layout for it (one engine and
one learner rank with every core). Per precision:

- learner: one GRPO update of a synthetic batch of that shape (random tokens; the cost of an update
  does not depend on what they say) on the rlsys learner (DeepSpeed, 1 rank; bf16 with ZeRO-1),
  against the MATMUL ROOFLINE AT THE MODEL'S SHAPES: this machine's FLOP/s for SmolLM2's own
  products (every weight shape at the micro-batch's rows, forward and both backward products;
  rlsys.observe.hardware.model_matmul_rate). Model FLOPs are what the update executes (the
  prompt-shared or rows layout the learner picks, rlsys.math.packing), 3 x forward. Target: MFU
  >= 50%. The square-matmul roofline is shown beside it. Then the before/after of attention by
  blocks, the change that closed part of the learner's distance: forward + backward of one shared
  micro-batch, attention by blocks and with the block mask applied densely, in turn.
- decode: seconds per decode step of the rlsys Generator (vLLM) at batch 32, the slope between a
  16-token and a 64-token call (prefill and per-call costs cancel). Its limit is the larger of two
  bounds: streaming every weight once per step (weight bytes / the read bandwidth measured in the
  same process) and the step's FLOPs at the square-matmul roofline (decode's thin products cannot
  beat it; they do not reach it either). Target: half of it (TARGET_DECODE).
- sync: the learner -> engine weight push of the whole model (benchmarks/weight_sync.measure: wire
  only, and whole with vLLM's reload) against one memcpy of the same bytes in the driver: by handle
  (the engine being on the learner's node), and over gloo beside it (rlsys before 2026-12-05: the
  before/after of the change that closed part of this stage's distance).

Each side of each figure is taken interleaved (ours, limit, ours, limit, ...). Where the time goes:
the learner's update and two decode calls once more under torch.profiler, each op's self time put
in a part (`classify`), the parts' shares applied to the unprofiled median; the sync from its own
timings (wire, the engines' reload, the rest). plots.py draws one bar per stage with a tick at its
limit.

    python benchmarks/limits.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import time

if __package__ in (None, ""):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, in_fresh_process, interleaved, main, ray_up, rlsys_config
from benchmarks.end_to_end import GSM8K
from benchmarks.rollout import workload_prompts

MODEL = "smollm2-135m-instruct"
STEP = {"prompts": 4, "group": 8, "prompt_len": 200, "response_len": 64}
"""The end-to-end SmolLM2 GSM8K step: templated GSM8K prompts run ~150-250 tokens, answers up to 64."""
DECODE_LENGTHS = (16, 64)
TARGET_MFU = 0.5
TARGET_DECODE = 0.5
"""Decode's share of its limit, set after the first measurement (AMD EPYC Zen 4, 2 vCPUs, 2026-12-05:
0.47 fp32, 0.35 bf16): the matmuls already run at about the roofline; the rest is attention,
vLLM's own per-step work and sampling."""

PARTS = ("matmul", "attention", "softmax and log-probs", "sampling", "optimizer", "communication",
         "copies and casts", "other ops", "outside ops")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::addmv", "aten::mv"}
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
            "aten::empty", "aten::empty_strided", "aten::zero_", "aten::fill_", "aten::zeros", "aten::index",
            "aten::index_select", "aten::index_put_", "aten::stack", "aten::pad", "aten::constant_pad_nd"}


def classify(op: str) -> str:
    """The part of a stage an op's time belongs to (a torch.profiler key), first match wins.

    >>> [classify(k) for k in ("aten::addmm", "_C::onednn_mm", "_C::cpu_attention_with_kv_cache",
    ...  "aten::_log_softmax_backward_data", "_C::fused_gumbel_argmax", "aten::_foreach_add_",
    ...  "gloo:all_reduce", "aten::_to_copy", "aten::silu", "## Call CompiledFxGraph x ##")]
    ['matmul', 'matmul', 'attention', 'softmax and log-probs', 'sampling', 'optimizer', 'communication', \
'copies and casts', 'other ops', 'other ops']
    """
    name = op.lower()
    if op in MATMUL_OPS or "onednn_mm" in name or "gemm" in name:
        return "matmul"
    if any(s in name for s in ("attention", "attn", "scaled_dot_product", "kv_cache")):
        return "attention"
    if any(s in name for s in ("softmax", "logsumexp", "gather", "nll_loss")):
        return "softmax and log-probs"
    if any(s in name for s in ("gumbel", "topk", "sort", "multinomial", "argmax", "sampl")):
        return "sampling"
    if any(s in name for s in ("adam", "_foreach_", "optimizer", "clip_grad")):
        return "optimizer"
    if any(s in name for s in ("c10d", "all_reduce", "allreduce", "broadcast", "gloo", "nccl", "all_gather")):
        return "communication"
    if op in COPY_OPS:
        return "copies and casts"
    return "other ops"


def parts_of(ops: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per part from a profile's op self seconds; what no op accounts for (Python, the
    scheduler, waiting) is `outside ops`.

    >>> parts_of({"aten::mm": 2.0, "aten::add": 0.5, "aten::copy_": 0.5}, 4.0)["outside ops"]
    1.0
    """
    out = dict.fromkeys(PARTS, 0.0)
    for op, s in ops.items():
        out[classify(op)] += s
    out["outside ops"] = max(0.0, wall - sum(ops.values()))
    return out


def scaled(parts: dict[str, float], seconds: float) -> dict[str, float]:
    """The parts' shares of their total applied to `seconds` (the profiler slows what it watches:
    its shares are kept, its seconds are not)."""
    total = sum(parts.values())
    return {k: seconds * v / total for k, v in parts.items() if v > 0}


def update_flops(shape, step: dict, budget: int, seed: int = 0) -> dict:
    """Model FLOPs of one update as the learner executes it: the micro-batch plan it keeps (prompts
    shared or rows, the cheaper: rlsys.math.packing.shard), forward + backward = 3 forwards, the
    output layer at every scored (response) token; one mini-batch, one epoch, so no old-log-prob
    pass. `flat` is the same batch counted row by row without sharing, for comparison.

    >>> from rlsys.math.flops import Shape
    >>> f = update_flops(Shape(8, 1, 1, 1, 8, 16, 10), {"prompts": 1, "group": 2, "prompt_len": 3,
    ...                  "response_len": 1}, budget=64)
    >>> f["layout"], f["flops"] == 3 * (f["body"] + 2 * 8 * 10 * 2)
    ('shared', True)
    """
    from rlsys.math.flops import grpo_step_flops
    from rlsys.math.packing import plan, plan_flops

    P, G, Lp, Lr = step["prompts"], step["group"], step["prompt_len"], step["response_len"]
    N = P * G
    lengths, prompt_lens = [Lp + Lr] * N, [Lp] * N
    rows = plan_flops(shape, plan(lengths, 1, N, N, budget, seed, 0), lengths)
    shared = plan_flops(shape, plan(lengths, 1, N, N, budget, seed, 0, prompt_lens, G), lengths, prompt_lens, G)
    body = min(rows, shared)
    head = 2 * shape.hidden * shape.vocab * N * Lr
    return {"flops": 3 * (body + head), "body": body, "layout": "rows" if rows < shared else "shared",
            "flat": grpo_step_flops(shape, lengths, response_lens=[Lr] * N, old_logprob_pass=False)}


def decode_bounds(shape, batch: int, context: int, dtype_bytes: int, read_bw: float, peak: float) -> dict:
    """The least time of one decode step of `batch` sequences at `context` tokens: streaming every
    weight once (bytes / read bandwidth) or computing its FLOPs at the peak, the larger binding.

    >>> from rlsys.math.flops import Shape
    >>> # 720 matmul weights (640 in the layer, 80 in the output layer); 2 x (2 x 720 + 4 x 8 x 3) FLOPs
    >>> b = decode_bounds(Shape(8, 1, 1, 1, 8, 16, 10), batch=2, context=3, dtype_bytes=4, read_bw=1e3, peak=1e3)
    >>> b["bytes"], b["flops"], b["bandwidth_s"], b["binding"]
    (2880, 3072, 2.88, 'compute')
    """
    nbytes = shape.matmul_params * dtype_bytes  # a tied embedding is read once, as the output layer
    flops = batch * (2 * shape.matmul_params + shape.layers * 4 * shape.heads * shape.head_dim * context)
    bw_s, compute_s = nbytes / read_bw, flops / peak
    return {"bytes": nbytes, "flops": flops, "bandwidth_s": bw_s, "compute_s": compute_s,
            "limit_s": max(bw_s, compute_s), "binding": "bandwidth" if bw_s >= compute_s else "compute"}


def decode_step(short_s: float, long_s: float, lengths: tuple[int, int] = DECODE_LENGTHS) -> float:
    """Seconds per decode step from two calls that differ only in tokens generated.

    >>> decode_step(2.0, 8.0, (16, 64))
    0.125
    """
    return (long_s - short_s) / (lengths[1] - lengths[0])


# ---------------------------------------------------------------- learner

def learner_stage(path: str, dtype: str, repeats: int) -> dict:
    """The update against the model-shape roofline, interleaved (update, roofline, ...)."""
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks.learner import synthetic_batch
    from rlsys.actors.logprobs import resolve_logprob_chunk
    from rlsys.cluster.groups import init_ray
    from rlsys.cluster.learners import start_learner_group
    from rlsys.math.flops import Shape
    from rlsys.observe.hardware import matmul_roofline, model_matmul_rate, usable_cpus

    P, G, Lp, Lr = STEP["prompts"], STEP["group"], STEP["prompt_len"], STEP["response_len"]
    cores = len(usable_cpus())
    cfg = rlsys_config([f"model.path={path}", f"model.dtype={dtype}",
                        f"learner.zero_stage={1 if dtype == 'bfloat16' else 0}", "learner.num_ranks=1",
                        f"learner.num_cpus={cores}", f"data.prompts_per_step={P}", f"algo.group_size={G}",
                        "algo.beta=0", f"learner.mini_batch_size={P * G}"], "rlsys/default.yaml")
    shape = Shape.of(AutoConfig.from_pretrained(path))
    work = update_flops(shape, STEP, cfg.learner.max_tokens_per_micro_batch, cfg.trainer.seed)
    batch = synthetic_batch(P, G, Lp, Lr, len(AutoTokenizer.from_pretrained(path)), cfg.algo)
    init_ray(cfg)
    group, pg = start_learner_group(cfg, path)
    seconds = []
    try:
        group.train(batch)  # warm-up: allocator, optimizer state, DeepSpeed buffers

        def update() -> float:
            start = time.perf_counter()
            group.train(batch)
            seconds.append(time.perf_counter() - start)
            return work["flops"] / seconds[-1]

        def roofline() -> float:  # the learner's rank is idle meanwhile: the driver has the cores
            return model_matmul_rate(shape, cfg.learner.max_tokens_per_micro_batch, dtype, backward=True,
                                     head_tokens=resolve_logprob_chunk(cfg.learner.logprob_chunk, cuda=False))["flops_per_s"]

        achieved, roof = interleaved(update, roofline, repeats)
        _, ops, wall = group.train_profiled(batch)
    finally:
        group.shutdown(pg)
    square = matmul_roofline((dtype,))[dtype]
    median = statistics.median(seconds)
    return {"stage": "learner", "dtype": dtype, "seconds": seconds, "measured_s": median,
            "limit_s": work["flops"] / statistics.median(roof), "binding": "compute (model-shape matmul roofline)",
            "achieved_flops_per_s": achieved, "roofline_flops_per_s": roof, "square_roofline_flops_per_s": square,
            "parts": scaled(parts_of(ops, wall), median), "profiled_wall_s": wall, **work,
            "tokens": P * G * (Lp + Lr)}


def attention_worker(path: str, dtype: str, repeats: int) -> dict:
    """Before/after of attention by blocks (rlsys.math.prefix.prefix_attention), the change that
    closed part of the learner's distance: forward + backward of the learner's model over one
    micro-batch of the step in the shared layout (two groups: the 2048-token budget's), the
    attention by blocks and with the block mask applied densely (rlsys before 2026-12-05), taken
    in turn in one process with every core: seconds of each, and the attended pairs of each."""
    import torch

    from benchmarks.learner import synthetic_batch
    from rlsys.actors.logprobs import load_without_dropout, scored_from, with_logprob_forward
    from rlsys.config import AlgoConfig
    from rlsys.math.prefix import share_prompts

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = with_logprob_forward(load_without_dropout(path, getattr(torch, dtype)))
    P, G, Lp, Lr = 2, STEP["group"], STEP["prompt_len"], STEP["response_len"]
    batch = synthetic_batch(P, G, Lp, Lr, model.config.vocab_size, AlgoConfig(group_size=G))
    lay = share_prompts(batch.input_ids, batch.attention_mask.sum(dim=1), batch.prompt_lens, scored_from(batch.loss_mask))
    assert lay.blocks is not None

    def step(blocks: bool) -> float:
        start = time.perf_counter()
        logp = model(input_ids=lay.input_ids, position_ids=lay.position_ids, attention_mask=lay.attention_mask,
                     logprobs_of=lay.targets, source=lay.source, temperature=1.0, chunk=128,
                     prefix_blocks=lay.blocks if blocks else None)
        logp.float().sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    after, before = interleaved(lambda: step(True), lambda: step(False), repeats)
    return {"blocks_s": after, "dense_s": before, "sequences": lay.input_ids.shape[0],
            "positions": lay.input_ids.shape[1], "pairs": {"blocks": lay.blocks.pairs,
                                                           "dense": lay.input_ids.shape[0] * lay.input_ids.shape[1] ** 2}}


# ---------------------------------------------------------------- decode (fresh process per dtype)

def decode_worker(path: str, dtype: str, texts: list[str], group: int, repeats: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    import torch
    from transformers import AutoConfig

    from benchmarks.rollout import requests
    from rlsys.actors.generator import Generator
    from rlsys.config import GeneratorConfig
    from rlsys.math.flops import Shape
    from rlsys.observe.hardware import matmul_roofline, memory_bandwidth

    short, long = DECODE_LENGTHS
    gen = Generator(path, GeneratorConfig(max_tokens=long, max_model_len=1024, kv_cache_gib=2,
                                          gpu_memory_utilization=0.5), dtype, seed=0)
    batch = requests(path, texts)

    def call(tokens: int) -> float:
        start = time.perf_counter()
        out = gen.generate(batch, n=group, min_tokens=tokens, max_tokens=tokens)
        took = time.perf_counter() - start
        assert all(len(r.response_ids) == tokens for r in out), "the engine did not generate exactly T tokens"
        return took

    call(short), call(long)  # warm-up
    shape = Shape.of(AutoConfig.from_pretrained(path))
    B, context = len(texts) * group, statistics.mean(len(ids) for *_, ids, _ in batch) + (short + long) / 2
    bounds = []

    def ours() -> float:
        return decode_step(call(short), call(long))

    def limit() -> float:
        bw = memory_bandwidth()
        bounds.append(decode_bounds(shape, B, round(context), torch.tensor([], dtype=getattr(torch, dtype))
                                    .element_size(), bw["read"], matmul_roofline((dtype,))[dtype]) | {"bandwidth": bw})
        return bounds[-1]["limit_s"]

    steps, limits = interleaved(ours, limit, repeats)
    profiled = []
    for tokens in (short, long):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = call(tokens)
        profiled.append(parts_of({e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}, wall))
    per_step = {k: max(0.0, decode_step(profiled[0][k], profiled[1][k])) for k in PARTS}
    median = statistics.median(steps)
    return {"stage": "decode", "dtype": dtype, "batch": B, "context": context, "seconds": steps, "measured_s": median,
            "limit_seconds": limits, "limit_s": statistics.median(limits), "bounds": bounds,
            "binding": statistics.mode(b["binding"] for b in bounds), "parts": scaled(per_step, median),
            "tokens_per_s": B / median}


# ---------------------------------------------------------------- sync

def sync_stage(path: str, dtype: str, repeats: int) -> dict:
    """The push of the whole model to one engine on the learner's node, by handle (rlsys's default
    there) and over the collective (before 2026-12-05, and what engines on other nodes use),
    interleaved, against one memcpy of the bytes."""
    from benchmarks.weight_sync import Memcpy, measure

    m = measure(path, repeats, 32.0, ("learner.num_ranks=1", f"model.dtype={dtype}", "generator.num_engines=1",
                                      f"learner.zero_stage={1 if dtype == 'bfloat16' else 0}"),
                between=Memcpy(), handle=True)
    reps = m["repeats_s"]
    median = statistics.median(reps["handle"])
    wire = statistics.median(reps["handle_wire"])
    load = min(statistics.median(reps["handle_load"]), median - wire)
    return {"stage": "sync", "dtype": dtype, "bytes": m["bytes"], "seconds": reps["handle"], "measured_s": median,
            "wire_seconds": reps["handle_wire"], "memcpy_seconds": reps["between"],
            "collective_seconds": reps["rlsys"], "collective_wire_seconds": reps["wire"], "raw_seconds": reps["raw"],
            "limit_s": statistics.median(reps["between"]), "binding": "memcpy of the bytes",
            "parts": {"wire (shared buffer, checksums)": wire, "engine reload (vLLM load_weights)": load,
                      "rest (driver, versions)": max(0.0, median - wire - load)},
            "backend": f"by handle (shared memory); collective: {m['backend']}"}


# ---------------------------------------------------------------- the section

def run(quick: bool) -> Section:
    repeats = 2 if quick else 4
    path, texts = workload_prompts("rlsys/default.yaml", STEP["prompts"], GSM8K)  # the end-to-end step's prompts
    section = Section("limits", {"model": MODEL, "step": STEP, "decode_lengths": list(DECODE_LENGTHS),
                                 "repeats": repeats, "target_mfu": TARGET_MFU})
    ray_up()
    for dtype in ("float32", "bfloat16"):
        short = "fp32" if dtype == "float32" else "bf16"
        r = learner_stage(path, dtype, repeats)
        section.rows.append(r)
        print(f"[limits] learner {short}: {r['measured_s']:.2f}s an update, MFU "
              f"{100 * statistics.median(r['achieved_flops_per_s']) / statistics.median(r['roofline_flops_per_s']):.0f}%"
              f" of the model-shape roofline", flush=True)
        section.figures.append(Figure.repeated(
            f"limits learner SmolLM2 {short} MFU (model FLOP/s)", [x / 1e12 for x in r["achieved_flops_per_s"]],
            "TFLOP/s", f"matmul roofline at SmolLM2's shapes, fwd+bwd, {dtype} (same run)",
            [x / 1e12 for x in r["roofline_flops_per_s"]], target=TARGET_MFU,
            note=f"ratio = MFU; {r['layout']} layout, {r['flops'] / 1e12:.2f} TFLOP an update; square-matmul "
                 f"roofline {r['square_roofline_flops_per_s'] / 1e12:.3g} TFLOP/s: MFU against it "
                 f"{100 * statistics.median(r['achieved_flops_per_s']) / r['square_roofline_flops_per_s']:.0f}%"))
        a = in_fresh_process(attention_worker, path, dtype, repeats + 1)
        r["block_vs_dense"] = a
        section.figures.append(Figure.repeated(
            f"limits learner SmolLM2 {short} fwd+bwd of a shared micro-batch, attention by blocks", a["blocks_s"],
            "s", "the same with the block mask applied densely (rlsys before 2026-12-05)", a["dense_s"],
            lower_is_better=True,
            note=f"before/after of the change that closed part of the learner's distance to its limit; "
                 f"{a['sequences']} sequences of {a['positions']} positions, {a['pairs']['blocks']:,} attended pairs "
                 f"against {a['pairs']['dense']:,}"))
        d = in_fresh_process(decode_worker, path, dtype, texts, STEP["group"], repeats)
        section.rows.append(d)
        print(f"[limits] decode {short}: {1e3 * d['measured_s']:.0f} ms a step at batch {d['batch']} against a "
              f"{d['binding']} limit of {1e3 * d['limit_s']:.0f} ms", flush=True)
        section.figures.append(Figure.repeated(
            f"limits decode SmolLM2 {short} seconds per step (batch {d['batch']})", d["seconds"], "s",
            "the limit: max(weights once / read bandwidth, FLOPs / square-matmul roofline), same process",
            d["limit_seconds"], lower_is_better=True, target=TARGET_DECODE,
            note=f"ratio = share of the limit reached; {d['binding']}-bound; {d['tokens_per_s']:.0f} tokens/s"))
        s = sync_stage(path, dtype, repeats + 1)
        section.rows.append(s)
        print(f"[limits] sync {short}: {s['measured_s']:.3f}s a push of {s['bytes'] / 1e6:.0f} MB against a memcpy "
              f"of {s['limit_s']:.3f}s", flush=True)
        for label, samples in (("wire", s["wire_seconds"]), ("whole push", s["seconds"])):
            section.figures.append(Figure.repeated(
                f"limits sync SmolLM2 {short} {label} seconds", samples, "s",
                f"one memcpy of the same {s['bytes'] / 1e6:.0f} MB in the driver", s["memcpy_seconds"],
                lower_is_better=True, note="ratio = share of the memcpy floor reached; push by handle to 1 engine "
                                           "on the learner's node" + ("" if label == "wire" else ", with vLLM's reload")))
        for label, after, before in (("wire", s["wire_seconds"], s["collective_wire_seconds"]),
                                     ("whole push", s["seconds"], s["collective_seconds"])):
            section.figures.append(Figure.repeated(
                f"limits sync SmolLM2 {short} {label} by handle seconds", after, "s",
                "the same over gloo (rlsys before 2026-12-05; engines on other nodes still), same run", before,
                lower_is_better=True,
                note="before/after of the change that closed part of the sync's distance to its limit"))
    return section


if __name__ == "__main__":
    main(run)
