"""The lean learner: token-budget micro-batches against fixed-row padding, and chunked log-probs.

1. Throughput. A 2-rank learner group (Ray actors, DeepSpeed ZeRO-0 fp32, gloo) trains on one
   rollout batch of mixed lengths, shaped like R1-Zero rollouts: GSM8K-length prompts (60-200
   tokens) and long-tailed responses (most short, a few near the limit). Reference: the layout
   every learner had before, learner.max_tokens_per_micro_batch=0 (each rank an equal share of
   rows, sorted by length, micro-batches of micro_batch_size rows padded to their longest).
   Measured: learner.max_tokens_per_micro_batch=BUDGET (micro-batches of at most BUDGET padded
   tokens, balanced over the ranks by tokens), rows one by one (learner.share_prompts=false); and
   the same budget with each group's prompt computed once (learner.share_prompts=true, the
   default: rlsys.math.prefix). The three updates run in turn on the same batch in the same group,
   round after round (fixed rows, budget, budget shared, fixed rows, ...: interleaved, so a slow
   minute of a shared machine hits every layout alike), the first round a warm-up; every later
   round's tokens/s = real tokens of the rows (no padding, every row's prompt counted) / seconds of
   its update is one sample, and a figure is the median pairwise ratio of two layouts' samples
   of the same rounds with its lowest and highest (benchmarks/common.py). Sharing's gain shows as
   the same tokens in less time.
2. Memory. One learner rank (a fresh process each, so its peak RSS is its own) takes one update
   on one 8k-token row of a model with a 152k vocabulary (Qwen2's): learner.logprob_chunk=0 (the
   whole (1, 8k, 152k) logits at once, and their fp32 copies) against the default chunks. The
   figure is the process's peak resident memory (ru_maxrss).

    python benchmarks/packing.py [--quick]
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, Section, in_fresh_process, main, ray_up, rlsys_config, tiny_model  # noqa: E402

from rlsys.config import LearnerConfig  # noqa: E402

TARGET = 1.3
BUDGET = LearnerConfig.max_tokens_per_micro_batch  # the default a run gets
LAYOUTS = {"fixed rows": (0, False), "token budget": (BUDGET, False), "token budget, shared prompts": (BUDGET, True)}
"""name -> (learner.max_tokens_per_micro_batch, learner.share_prompts)"""


def mixed_batch(prompts: int, group: int, vocab: int, max_response: int, algo, seed: int = 0):
    """Prompts of 60-200 tokens; responses log-normal (median ~1/8 of the limit), cut at the limit."""
    from rlsys.math.batch import make_batch
    from rlsys.types import Rollout

    rng = random.Random(seed)
    rollouts = []
    for g in range(prompts):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(60, 200))]
        for _ in range(group):
            n = max(8, min(max_response, int(rng.lognormvariate(0, 0.9) * max_response / 8)))
            rollouts.append(Rollout(g, g, prompt, [rng.randrange(vocab) for _ in range(n)], [-1.0] * n, "",
                                    "length" if n == max_response else "stop", 0, ""))
    return make_batch(rollouts, [rng.random() for _ in rollouts], algo)


def throughput(model_path: str, shape: dict, repeats: int) -> dict:
    import ray
    from ray.util.placement_group import remove_placement_group
    from transformers import AutoTokenizer

    from rlsys.cluster.learners import start_learner_group

    P, G = shape["prompts"], shape["group"]
    cfg = rlsys_config([f"model.path={model_path}", "learner.zero_stage=0", "learner.num_ranks=2",
                        f"learner.mini_batch_size={P * G}", "learner.micro_batch_size=8",
                        f"data.prompts_per_step={P}", f"algo.group_size={G}", "algo.beta=0"])
    batch = mixed_batch(P, G, len(AutoTokenizer.from_pretrained(model_path)), shape["max_response"], cfg.algo)
    tokens = int(batch.attention_mask.sum())
    group, pg = start_learner_group(cfg, model_path)
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    shared_frac: dict[str, float] = {}  # 1 when the learner laid the batch out shared (the plan with fewer FLOPs)
    try:
        for _ in range(repeats + 1):  # the first round warms up (allocator, DeepSpeed buffers)
            for layout, (budget, share) in LAYOUTS.items():
                # The driver cuts the batch by its config (the ranks follow the cut: rlsys.math.packing.Shard).
                group.cfg.learner.max_tokens_per_micro_batch = budget
                group.cfg.learner.share_prompts = share
                start = time.perf_counter()
                shared_frac[layout] = group.train(batch)["shared_prompt_frac"]
                times[layout].append(time.perf_counter() - start)
    finally:
        for a in group.actors:
            ray.kill(a)
        remove_placement_group(pg)
    rounds = {layout: t[1:] for layout, t in times.items()}  # the first round warmed up
    seconds = {layout: statistics.median(t) for layout, t in rounds.items()}
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
            "seconds_repeats": rounds, "warmup_s": {layout: t[0] for layout, t in times.items()},
            "tokens_per_s_repeats": {k: [tokens / x for x in t] for k, t in rounds.items()},
            "rows": P * G, "padded_tokens_fixed": fixed_padding(batch, cfg), "shared_prompt_frac": shared_frac,
            "computed_tokens_shared": shared_positions(batch, cfg)}


def shared_positions(batch, cfg) -> int:
    """Positions the shared layout computes over both ranks (padding included)."""
    from rlsys.math.packing import shard
    from rlsys.math.prefix import share_prompts

    total = 0
    for rank in range(2):
        s = shard(batch, rank, 2, cfg.learner.mini_batch_size, 8, BUDGET, cfg.trainer.seed, 0, "token",
                  cfg.algo.group_size)
        for micros in s.minis:
            for sl in micros:
                micro = s.batch.select(sl)
                total += share_prompts(micro.input_ids, micro.attention_mask.sum(1), micro.prompt_lens, 0).tokens
    return total


def fixed_padding(batch, cfg) -> int:
    """Tokens the fixed-row layout computes (padding included), over both ranks."""
    from rlsys.math.packing import padded, shard

    lengths = batch.attention_mask.sum(dim=1).tolist()
    total = 0
    for rank in range(2):
        s = shard(batch, rank, 2, cfg.learner.mini_batch_size, 8, 0, cfg.trainer.seed, 0, "token")
        total += sum(padded(list(range(sl.start, sl.stop)), s.batch.attention_mask.sum(1).tolist())
                     for micros in s.minis for sl in micros)
    assert total >= sum(lengths)
    return total


def peak_memory(model_path: str, chunk: int, tokens: int) -> dict:
    """One update on one row of `tokens` tokens in this (fresh) process; its peak RSS in GiB."""
    import torch

    from rlsys.actors.learner import Learner
    from rlsys.actors.weight_sync import free_port
    from rlsys.config import AlgoConfig, LearnerConfig
    from rlsys.types import TrainBatch

    cfg = LearnerConfig(num_ranks=1, mini_batch_size=1, micro_batch_size=1, logprob_chunk=chunk)
    learner = Learner(model_path, "float32", cfg, AlgoConfig(group_size=1, beta=0.0), temperature=1.0, rank=0,
                      world=1, backend="gloo", seed=0)
    learner.setup("127.0.0.1", free_port())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ids = torch.randint(0, 1000, (1, tokens))
    loss_mask = torch.zeros(1, tokens)
    loss_mask[0, 256:] = 1  # a 256-token prompt, the rest response
    batch = TrainBatch(ids, torch.ones(1, tokens, dtype=torch.long), loss_mask, torch.zeros(1, tokens),
                       torch.tensor([1.0]), torch.zeros(1), prompt_lens=torch.tensor([256]))
    start = time.perf_counter()
    learner.train(batch)
    return {"chunk": chunk, "tokens": tokens, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "after_setup_gib": before, "seconds": time.perf_counter() - start}


def wide_vocab_model(hidden: int, layers: int, vocab: int) -> str:
    """A random Qwen2 with a vocabulary of `vocab` (the memory question is the output layer's)."""
    import tempfile

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(tempfile.gettempdir()) / f"rlsys-bench-vocab-{hidden}-{layers}-{vocab}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                             max_position_embeddings=16384, tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def run(quick: bool) -> Section:
    shape = {"prompts": 8, "group": 8, "max_response": 512} if quick else {"prompts": 16, "group": 8,
                                                                            "max_response": 1024}
    repeats = 2 if quick else 3
    model, params = tiny_model(256, 4, 4)
    section = Section("packing", {"batch": shape, "ranks": 2, "zero": 0, "dtype": "float32", "micro_batch_rows": 8,
                                  "budget_tokens": BUDGET, "model_params": params, "repeats": repeats})
    ray_up()
    t = throughput(model, shape, repeats)
    section.rows.append({"what": "throughput", **t})
    rate = t["tokens_per_s_repeats"]  # per round after the warm-up: the layouts of round i ran back to back
    section.figures.append(Figure.repeated(
        f"learner tokens/s, token budget {BUDGET}", rate["token budget"], "tokens/s",
        "fixed micro-batches of 8 rows padded to their longest (learner.max_tokens_per_micro_batch=0), same batch, "
        "same group", rate["fixed rows"], target=TARGET,
        note=f"{t['rows']} rows, {t['tokens']} real tokens; the fixed layout computes {t['padded_tokens_fixed']} "
             f"padded tokens; 2 ranks, ZeRO-0 fp32, {params / 1e6:.0f}M params; both without shared prompts"))
    section.figures.append(Figure.repeated(
        f"learner tokens/s, token budget {BUDGET}, shared prompts", rate["token budget, shared prompts"], "tokens/s",
        "the same budget, rows one by one (learner.share_prompts=false)", rate["token budget"],
        note=f"all shared, the forward would compute {t['computed_tokens_shared']} positions for the {t['tokens']} "
             f"tokens of the rows ({shape['group']} answers a prompt); the learner laid the batch out "
             f"{'shared' if t['shared_prompt_frac']['token budget, shared prompts'] else 'as rows'} (the plan "
             f"with fewer FLOPs: rlsys.math.packing.shard)"))
    vocab_model = wide_vocab_model(256, 2, 151_936)
    tokens = 4096 if quick else 8192
    mem = {chunk: in_fresh_process(peak_memory, vocab_model, chunk, tokens) for chunk in (0, 1024)}
    section.rows.append({"what": "memory", "model": "random Qwen2, hidden 256, 2 layers, vocab 151936", **{
        f"chunk_{c}": m for c, m in mem.items()}})
    section.figures.append(Figure(
        f"learner peak memory, one {tokens}-token row, vocab 152k, log-probs in chunks of 1024", mem[1024]["peak_gib"],
        "GiB", "all positions at once (learner.logprob_chunk=0)", mem[0]["peak_gib"], lower_is_better=True,
        note=f"peak RSS of the learner process; {mem[0]['after_setup_gib']:.2f} GiB after set-up (model, "
             f"optimizer); update {mem[1024]['seconds']:.1f}s chunked vs {mem[0]['seconds']:.1f}s"))
    return section


if __name__ == "__main__":
    main(run)
