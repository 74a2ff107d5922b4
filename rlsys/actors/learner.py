"""One learner rank: a DeepSpeed engine training the policy with GRPO (Ray is applied in rlsys/cluster/).

Per rollout batch (each rank gets its Shard: its own rows of every mini-batch, cut into
micro-batches by rlsys.math.packing, with each mini-batch's loss normaliser):
1. old log-probs (and reference log-probs when beta > 0) for this rank's rows, no grad, with the
   weights before this update (skipped when the update is one epoch over one mini-batch: then
   every forward below sees those weights, see needs_old_logprobs);
2. for each epoch, for each mini-batch (a fixed shuffle of the batch): this rank's micro-batches,
   loss normalised by the WHOLE mini-batch's token (or sequence) count over the data-parallel
   world (DeepSpeed averages gradients over ranks), one optimizer step; rows sampled by older
   weights (asynchronous mode) are reweighted by truncated importance sampling;
3. metrics averaged over micro-batches and ranks.
Log-probs use logits / temperature, the distribution the generators sampled from.

Precision: bf16 keeps fp32 master weights and accumulates and all-reduces gradients in fp32
(DeepSpeed data_types.grad_accum_dtype and communication_data_type; ZeRO 1-3, the config refuses
ZeRO-0 bf16, which DeepSpeed accumulates in bf16). Dropout is off in the policy and the reference:
every forward of an update (old log-probs, training, reference) must score the same policy.
The learning rate follows learner.lr_schedule (warm-up, then constant or cosine) per optimizer step.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from rlsys.actors.state_tree import SafetensorsCheckpointEngine
from rlsys.checkpoint import safe_relative, write_chunk
from rlsys.math.grpo import grpo_loss, off_policy_weights
from rlsys.math.packing import Shard, cut
from rlsys.math.flops import Shape
from rlsys.math.prefix import prefix_attention, share_prompts
from rlsys.math.sft import sft_loss
from rlsys.config import AlgoConfig, LearnerConfig, off_policy_band
from rlsys.types import TrainBatch
from rlsys.actors.heap import keep_freed_memory
from rlsys.actors.shared_weights import Shares
from rlsys.actors.weight_sync import (Bucket, TensorMeta, device_for, flatten_parameters, free_port, make_group,
                                      owners, partition, plan_buckets, raw_broadcast, send_buckets, sending_ranks)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, L, V) at positions 0..L-1, input_ids (B, L) -> (B, L) log-prob of token t given < t.

    Column 0 (no prediction for the first token) is 0; it is never a response token.
    """
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)         # (B, L-1, V)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)                    # (B, L-1)
    return torch.nn.functional.pad(picked, (1, 0))                                  # (B, L)


PER_STEP = ("loss", "pg_loss", "kl", "grad_norm")
"""Metrics with one value per optimizer step (averaged over steps and ranks); the others are
per-token shares."""
ONCE = ("is_weight_mean", "is_capped_frac", "is_masked_frac", "stale_frac")
"""Per-token shares counted once per row (the first epoch), not once per epoch."""
PER_ROW = ("is_masked_seq_frac",)
"""Shares of rows, counted once per row (the first epoch)."""


def with_logprob_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Give the HF causal LM a forward that can return log-probs directly: called with
    `logprobs_of=targets (B, T)`, it runs the decoder over the whole input and the output layer
    only on positions scored_from .. L-2, `chunk` at a time (chunked_logprobs), and returns (B, T);
    given `source` (B, T) too (prompts shared, rlsys.math.prefix), the input is the shared layout
    and the output layer runs on the hidden states at those flat positions. Without logprobs_of,
    the model's own forward. The output layer runs inside the forward that DeepSpeed
    wraps (its gradient hooks and ZeRO-3 gathers see every use of a parameter in a step): a
    separate call to the output layer after the engine's forward loses its gradient under
    DeepSpeed's bf16 optimizer (measured: grad norm 2.39 instead of 2.89)."""
    own = model.forward
    if model.config._attn_implementation == "sdpa":  # the same SDPA, plus shared layouts by their blocks
        model.set_attn_implementation(register_prefix_attention())

    def forward(*args, logprobs_of=None, scored_from=0, temperature=1.0, chunk=0, source=None, prefix_blocks=None,
                **kwargs):
        if logprobs_of is None:
            return own(*args, **kwargs)
        if prefix_blocks is not None and model.config._attn_implementation == PREFIX_ATTENTION:
            kwargs["prefix_blocks"] = prefix_blocks  # reaches every layer's attention (the mask is then unused)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4 and model.config._attn_implementation not in ("sdpa", PREFIX_ATTENTION):
            # A custom 4D mask reaches the attention as it is: SDPA takes booleans, eager adds it to the scores.
            kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(model.dtype).min)
        hidden = model.base_model(*args, **kwargs).last_hidden_state                 # (B or S, L, H), final norm applied
        if source is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[source]                    # (B, T, H)
            return chunked_logprobs(hidden, model.get_output_embeddings(), logprobs_of, temperature, chunk)
        return chunked_logprobs(hidden[:, scored_from:-1], model.get_output_embeddings(), logprobs_of,
                                temperature, chunk)                                   # (B, L - 1 - scored_from)

    model.forward = forward
    return model


PREFIX_ATTENTION = "rlsys_prefix"
"""The learner's attention implementation: HF's SDPA, except where a shared layout's blocks are
passed (prefix_blocks=): then rlsys.math.prefix.prefix_attention, which attends block by block
instead of applying the block mask densely."""


def register_prefix_attention() -> str:
    """Register PREFIX_ATTENTION with transformers (attention and mask functions); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prefix_blocks=None, **kwargs):
        if prefix_blocks is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        assert dropout == 0.0, "prefix attention has no dropout (the learner loads models without it)"
        return prefix_attention(query, key, value, prefix_blocks, scaling), None

    AttentionInterface.register(PREFIX_ATTENTION, attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    return PREFIX_ATTENTION


def chunked_logprobs(hidden: torch.Tensor, output_layer: torch.nn.Module, targets: torch.Tensor,
                     temperature: float, chunk: int) -> torch.Tensor:
    """hidden (B, T, H) final hidden states, targets (B, T) the next tokens -> (B, T) log-probs of
    the targets under softmax(output_layer(hidden) / temperature), about `chunk` tokens (rows x
    positions) at a time.

    Each chunk's logits (B, c, V), c = chunk // B, live only inside it: with grad the chunk is recomputed in the
    backward pass (activation checkpointing), so neither pass ever holds a whole (B, T, V) tensor
    (at 8k tokens and a 152k vocabulary one fp32 copy is 5 GB a row). log p = logit - logsumexp,
    without a separate log-softmax copy."""

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = output_layer(h).float()                                             # (B, c, V)
        if temperature != 1.0:  # a vocabulary-wide pass saved at the default temperature
            logits = logits / temperature
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, c)

    pieces = []
    c = max(1, chunk // max(1, hidden.shape[0]))
    for i in range(0, hidden.shape[1], c):
        h, t = hidden[:, i:i + c], targets[:, i:i + c]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False))
        else:
            pieces.append(piece(h, t))
    return torch.cat(pieces, dim=1) if pieces else hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)


def generator_mismatch(gen_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask: torch.Tensor
                       ) -> torch.Tensor:
    """How far the generators' policy is from the learner's on the sampled tokens, (B, T) each:
    [sum |learner - generator| log-prob, sum of k3 KL(generator || learner), tokens, max |diff|]
    over the mask. The tokens were sampled by the generator, so k3 with r = learner - generator
    (exp(r) - r - 1) estimates KL(generator || learner) without bias. Both sides are the tempered
    distribution (vLLM's processed log-probs, the learner's logits / temperature): the gap is a real
    mismatch (kernels, precision, stale weights), not the temperature.

    >>> g = torch.tensor([[0.0, -1.0, -2.0]]); l = torch.tensor([[0.0, -1.5, -2.0]]); m = torch.tensor([[0., 1., 1.]])
    >>> [round(v, 4) for v in generator_mismatch(g, l, m).tolist()]  # k3(-0.5) = exp(-0.5) + 0.5 - 1
    [0.5, 0.1065, 2.0, 0.5]
    """
    gen, learner, m = gen_logprobs.double(), learner_logprobs.double(), mask.double()      # (B, T)
    diff = (learner - gen) * m                                                             # (B, T)
    k3 = (torch.exp(diff) - diff - 1.0) * m                                                # (B, T)
    max_diff = diff.abs().max() if m.any() else torch.zeros((), dtype=torch.float64)
    return torch.stack([diff.abs().sum(), k3.sum(), m.sum(), max_diff])


def resolve_logprob_chunk(chunk: int | None, cuda: bool) -> int:
    """learner.logprob_chunk, or when None by the rank's device: 128 positions on CPUs (a chunk's
    fp32 logits stay under the size up to which malloc reuses freed memory: rlsys.actors.heap),
    1024 on GPUs (fewer, larger kernels; at a 152k vocabulary a chunk's fp32 logits are 0.6 GiB).

    >>> resolve_logprob_chunk(None, cuda=False), resolve_logprob_chunk(None, cuda=True), resolve_logprob_chunk(0, cuda=True)
    (128, 1024, 0)
    """
    if chunk is not None:
        return chunk
    return 1024 if cuda else 128


def scored_from(loss_mask: torch.Tensor) -> int:
    """The first position whose logits any row needs: one before the earliest response token."""
    scored = loss_mask.any(dim=0).nonzero()
    return max(0, int(scored[0]) - 1) if len(scored) else 0


def lr_factor(step: int, cfg: LearnerConfig, total: int) -> float:
    """The share of cfg.lr that optimizer step `step` (0-based, of `total`) uses: linear warm-up
    over cfg.warmup_steps (step s < warmup uses (s + 1) / warmup, so no step is wasted at 0), then
    constant, or a half cosine from 1 at the first step after warm-up to cfg.min_lr_ratio at the last.

    >>> cfg = LearnerConfig(lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.0)
    >>> [round(lr_factor(s, cfg, total=5), 4) for s in range(5)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = total - cfg.warmup_steps - 1
    progress = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_without_dropout(model_path: str, dtype):
    """The HF model with every dropout probability in its config set to 0 (attention, hidden,
    embedding, residual: the names differ by architecture), and any nn.Dropout left in the modules
    set to p=0. Dropout would make the training forward score another policy than the old-log-prob
    and reference passes (which run in eval mode) and than the generators."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_pretrained(model_path, config=config, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


LEARNER_STATE, STATE_TAG = "learner", "state"
"""A checkpoint's DeepSpeed state lives in <checkpoint>/learner/state/ (one set of files per rank)."""


def resident(method):
    """Bring the rank's state back to its device (after `Learner.offload`) before `method` runs."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.offloaded:
            self.engine.reload_states()
            self.offloaded = False
        return method(self, *args, **kwargs)
    return wrapper


class Learner:
    def __init__(self, model_path: str, dtype: str, cfg: LearnerConfig, algo: AlgoConfig, temperature: float,
                 rank: int, world: int, backend: str, seed: int, total_updates: int = 1,
                 updates_per_batch: int | None = None):
        """total_updates: optimizer steps in the whole run (the LR schedule's length).
        updates_per_batch: the optimizer steps a full rollout batch takes (GRPO runs); each `train`
        then starts at its batch's place in the schedule, so a short batch (DAPO's dynamic
        sampling cuts one to whole mini-batches) skips the steps it did not take instead of
        stretching the schedule past the run's last step. None (SFT): the schedule counts steps."""
        cfg = dataclasses.replace(cfg, logprob_chunk=resolve_logprob_chunk(cfg.logprob_chunk, cuda=backend == "nccl"))
        self.model_path, self.dtype, self.cfg, self.algo = model_path, dtype, cfg, algo
        self.temperature, self.rank, self.world, self.backend, self.seed = temperature, rank, world, backend, seed
        self.total_updates, self.updates_per_batch = total_updates, updates_per_batch
        self.engine = self.ref = None
        self.sync_group = None
        self.shares = Shares()  # the buffer the engines on this node map (share_weights)
        self.steps = 0
        self.offloaded = False  # the state waits in host memory (offload) until a `resident` method runs
        self.said_no_offload = False

    def offload(self) -> bool:
        """learner.offload_states: the rank's optimizer state, fp32 master weights and gradients to
        host memory until its next update or save (`resident`), while engines sharing its GPU take
        their weights and generate. The model's own weights stay: the push reads them (by handle,
        or its broadcast) while the state waits, and they are the smallest part (Adam's moments
        and the master copy are 12 bytes a parameter). The frozen reference (algo.beta > 0) stays
        too: DeepSpeed offloads an optimizer's state only. False where there is nothing to move: a
        CPU rank's state is in host memory already."""
        if self.backend != "nccl":
            if not self.said_no_offload:
                print(f"[rlsys] learner {self.rank}: learner.offload_states: this rank runs on CPUs, where its state "
                      f"is in host memory already; nothing to offload", flush=True)
                self.said_no_offload = True
            return False
        if not self.offloaded:
            from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

            self.engine.offload_states(include=[State.optim_states, State.hp_params, State.lp_grads,
                                                State.contiguous_grad_buffer])
            self.offloaded = True
        return True

    def free_port(self) -> int:
        """A free port on this rank's node (rank 0 hosts the rendezvous of both groups)."""
        return free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        """Collective: every rank calls it at once."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if self.backend == "gloo":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # The shared-memory comm op would be JIT-compiled for a minute at start; gloo needs none of it.
            importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
        import deepspeed

        if self.backend == "gloo":
            keep_freed_memory()
        deepspeed.init_distributed(dist_backend=self.backend)
        torch.manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        if self.cfg.zero_stage == 3:
            # transformers then builds the model inside deepspeed.zero.Init and loads the checkpoint
            # into the shards: no rank ever holds the whole model (one larger than a host can train).
            # transformers reads it through a global weak reference: alive while the models load, then unset.
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_init = HfDeepSpeedConfig(self._ds_config(train=True))
        model = with_logprob_forward(load_without_dropout(self.model_path, dtype))
        if self.cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs and ZeRO-3
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Client-side AdamW: no JIT-compiled optimizer op, same math on CPU and GPU. fused: one pass
        # over each parameter's state instead of a pass per operation (SmolLM2-135M on 2 Intel
        # cores: 0.10 s a step against 0.56 s for the default foreach kernels).
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                      fused=True)
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731 - DeepSpeed calls it with its optimizer
            opt, lambda step: lr_factor(step, self.cfg, self.total_updates))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=self._ds_config(train=True))
        if self.cfg.zero_stage == 0:  # on its device; ZeRO-1/2 flatten the parameters themselves, ZeRO-3 shards them
            flatten_parameters(self.engine.module)
        # Checkpoint state as JSON + safetensors: DeepSpeed's own pickles it (torch.save) and
        # unpickles it with weights_only=False, which runs whatever code a file holds.
        self.engine.checkpoint_engine = SafetensorsCheckpointEngine(self.engine.checkpoint_engine)
        if self.algo.beta > 0:
            ref = with_logprob_forward(load_without_dropout(self.model_path, dtype)).eval().requires_grad_(False)
            self.ref, *_ = deepspeed.initialize(model=ref, config=self._ds_config(train=False))
        if self.cfg.zero_stage == 3:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # later models in this process (none in a run, some in tests) load whole
            del self._zero3_init

    def _ds_config(self, train: bool) -> dict:
        per_rank = self.cfg.mini_batch_size // self.world
        cfg = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": per_rank // self.cfg.micro_batch_size,
            "train_batch_size": self.cfg.mini_batch_size,
            "zero_optimization": {"stage": self.cfg.zero_stage if train or self.cfg.zero_stage == 3 else 0},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "steps_per_print": 1 << 30,
        }
        if self.dtype == "bfloat16" and train:
            # fp32 gradient accumulation over micro-batches and fp32 all-reduce / reduce-scatter:
            # bf16 sums lose the small gradients of a large mini-batch (8 bits of mantissa).
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
            cfg["communication_data_type"] = "fp32"
        if train:
            # Stage 0 fp32: rlsys clips (_clip_or_drop_plain_grads), to drop a non-finite step first.
            cfg["gradient_clipping"] = 0.0 if self._plain else self.cfg.grad_clip
        return cfg

    # ---- training

    def _logprobs(self, model, batch: TrainBatch, shared: bool) -> torch.Tensor:
        """(B, L) log-probs of the batch's tokens; only response tokens are ever used.

        The output layer and the log-softmax (a vocabulary-wide row per position, forward and
        backward) run only from the position before the earliest response token on: prompt
        positions need hidden states, not logits. Columns before that are 0. With
        learner.logprob_chunk they run over that many positions at a time (chunked_logprobs);
        shared (the shard was planned so: rlsys.math.packing.shard): rows with one prompt are one
        sequence (rlsys.math.prefix)."""
        device = self.engine.device
        start = scored_from(batch.loss_mask)
        if shared:
            lay = share_prompts(batch.input_ids, batch.attention_mask.sum(dim=1), batch.prompt_lens, start)
            picked = model(input_ids=lay.input_ids.to(device), position_ids=lay.position_ids.to(device),
                           attention_mask=lay.attention_mask.to(device),
                           prefix_blocks=lay.blocks.to(device) if lay.blocks is not None else None,
                           logprobs_of=lay.targets.to(device),
                           source=lay.source.to(device), temperature=self.temperature,
                           chunk=self.cfg.logprob_chunk or max(1, lay.targets.shape[1]))  # (B, L - 1 - start)
            return torch.nn.functional.pad(picked, (start + 1, 0))                    # (B, L)
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        if not self.cfg.logprob_chunk:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - start).logits  # (B, L - start, V)
            return torch.nn.functional.pad(token_logprobs(logits, ids[:, start:], self.temperature), (start, 0))
        picked = model(input_ids=ids, attention_mask=mask, logprobs_of=ids[:, start + 1:], scored_from=start,
                       temperature=self.temperature, chunk=self.cfg.logprob_chunk)     # (B, L - 1 - start)
        return torch.nn.functional.pad(picked, (start + 1, 0))                        # (B, L)

    @resident
    def train_profiled(self, work: TrainBatch | Shard) -> tuple[dict[str, float], dict[str, float], float]:
        """`train` under torch.profiler (CPU ops): its metrics, each op's self seconds summed over the
        update (op name -> seconds), and the update's wall seconds. For benchmarks/limits.py's "where
        the update goes"; the profiler slows the update, so read the shares, not the seconds."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            metrics = self.train(work)
            wall = time.perf_counter() - start
        return metrics, {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}, wall

    def model_shape(self) -> Shape:
        """The model's dimensions, for FLOP counts (the layouts' costs, MFU)."""
        return Shape.of(self.engine.module.config)

    @torch.no_grad()
    def _frozen_logprobs(self, model, work: Shard) -> torch.Tensor:
        """(B, L) log-probs of every row of this rank's shard, micro-batch by micro-batch."""
        out = torch.zeros(work.batch.input_ids.shape)
        for micros in work.minis:
            for rows in micros:
                micro = work.batch.select(rows)
                out[rows, :micro.input_ids.shape[1]] = self._logprobs(model, micro, work.shared).float().cpu()
        return out

    def shard(self, batch: TrainBatch, grpo: bool = True) -> Shard:
        """This rank's part of a whole rollout batch (rlsys.math.packing; the driver cuts the same)."""
        return cut(batch, self.rank, self.world, self.cfg, self.algo, self.seed, self.steps, self.model_shape(), grpo)

    @resident
    def train(self, work: TrainBatch | Shard) -> dict[str, float]:
        """One GRPO update on a rollout batch: this rank's Shard of it (the driver cuts the batch and
        sends each rank its rows), or the whole batch (cut here, the same way)."""
        if isinstance(work, TrainBatch):
            work = self.shard(work)
        assert work.step == self.steps, f"learner {self.rank}: a shard cut for update {work.step}, at update {self.steps}"
        if self.updates_per_batch is not None:
            self._seek_schedule(self.steps * self.updates_per_batch)
        local, W = work.batch, self.world
        self.engine.eval()
        old = self._frozen_logprobs(self.engine.module, work) if self.needs_old_logprobs(len(work.minis)) else None
        ref = self._frozen_logprobs(self.ref.module, work) if self.ref is not None else None
        stale_rows = (local.staleness > 0) if local.staleness is not None else torch.zeros(len(local), dtype=torch.bool)
        # the rows whose tokens algo.off_policy reweights: those of older weights, or every row
        corrected_rows = stale_rows if self.algo.off_policy_rows == "stale" else torch.ones(len(local), dtype=torch.bool)
        lo, hi = off_policy_band(self.algo)
        sums: dict[str, float] = defaultdict(float)
        skipped = 0  # optimizer steps not taken: a non-finite loss or gradient norm
        # generator vs learner on this rank's response tokens: (sum |diff|, sum k3 KL, tokens), max |diff|
        gen_sums, gen_max = torch.zeros(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        off_sums = torch.zeros(3, dtype=torch.float64)  # the same on rows sampled by older weights
        self.engine.train()
        for epoch in range(self.cfg.epochs):
            for micros, normalizer in zip(work.minis, work.normalizers):
                for k, rows in enumerate(micros):
                    micro = local.select(rows)
                    width = micro.input_ids.shape[1]
                    # The last micro-batch of the mini-batch reduces the gradients and steps the
                    # optimizer (token budgets give a varying count: the boundary is set, not counted).
                    self.engine.set_gradient_accumulation_boundary(k == len(micros) - 1)
                    logp = self._logprobs(self.engine, micro, work.shared)
                    # on-policy (no separate pass): this forward runs on the weights that generated the batch
                    old_micro = logp.detach() if old is None else old[rows, :width].to(logp.device)
                    stale = stale_rows[rows]
                    if epoch == 0:  # every row of this rank once; stale rows apart (their gap is the policy's move)
                        fresh_mask = micro.loss_mask * (~stale).unsqueeze(1)
                        mismatch = generator_mismatch(micro.gen_logprobs, old_micro.cpu(), fresh_mask)
                        gen_sums += mismatch[:3]
                        gen_max = torch.maximum(gen_max, mismatch[3:])
                        off_sums += generator_mismatch(micro.gen_logprobs, old_micro.cpu(),
                                                       micro.loss_mask - fresh_mask)[:3]
                    corrected = corrected_rows[rows]
                    weights, masked = (off_policy_weights(old_micro, micro.gen_logprobs.to(logp.device),
                                                          micro.loss_mask.to(logp.device), corrected.to(logp.device),
                                                          self.algo.off_policy, lo, hi)
                                       if bool(corrected.any()) else (None, None))
                    loss, metrics = grpo_loss(
                        logp, old_micro,
                        None if ref is None else ref[rows, :width].to(logp.device),
                        micro.advantages.to(logp.device), micro.loss_mask.to(logp.device),
                        eps_low=self.algo.epsilon, eps_high=self.algo.epsilon_high or self.algo.epsilon,
                        beta=self.algo.beta, aggregation=self.algo.aggregation, normalizer=normalizer,
                        dual_clip=self.algo.dual_clip, is_weights=weights,
                    )
                    # The normaliser already spans the mini-batch: no further 1/GAS scaling.
                    self.engine.backward(loss, scale_wrt_gas=False)
                    boundary_norm, step_lr = self._step()
                    if step_lr is not None:
                        lr = step_lr
                    sums["loss"] += float(loss.detach())
                    tokens = float(micro.loss_mask.sum())
                    for key, v in metrics.items():  # per-token shares are weighted by the micro-batch's tokens
                        sums[key] += float(v) * (1.0 if key in PER_STEP else tokens)
                    sums["tokens"] += tokens
                    if epoch == 0:  # the importance weights' share of this rank's tokens, once per row
                        m = micro.loss_mask.to(logp.device)
                        w = torch.ones_like(m) if weights is None else weights
                        sums["is_weight_mean"] += float((w * m).sum())
                        capped = (w >= hi) if self.algo.off_policy == "tis" else torch.zeros_like(m, dtype=torch.bool)
                        sums["is_capped_frac"] += float((capped * m).sum())
                        sums["stale_frac"] += float((stale.to(m.device).unsqueeze(1) * m).sum())
                        out_tokens = torch.zeros_like(m, dtype=torch.bool) if masked is None else masked
                        sums["is_masked_frac"] += float((out_tokens * m).sum())
                        sums["is_masked_seq_frac"] += float(out_tokens.any(dim=1).sum())
                        sums["rows"] += micro.loss_mask.shape[0]
                norm = self.engine.get_global_grad_norm() if boundary_norm is None else boundary_norm
                assert norm is not None, "DeepSpeed reported no gradient norm"
                if math.isfinite(float(norm)):
                    sums["grad_norm"] += float(norm)
                else:  # the same on every rank: the norm is global
                    skipped += 1
        self.steps += 1
        # Each micro-batch loss is its share of the mini-batch loss (whole-mini-batch normaliser):
        # summed over micro-batches and averaged over ranks it is the mini-batch value, per step.
        # The per-token shares (clip_frac, ratio_mean, ...) are token-weighted over every rank, so
        # they do not depend on how rows fall into micro-batches or ranks.
        keys = sorted(sums)
        totals = dict(zip(keys, self._reduce(torch.tensor([sums[k] for k in keys]), dist.ReduceOp.SUM).tolist()))
        n_steps = self.cfg.epochs * len(work.minis)
        first_epoch_tokens = max(totals["tokens"] / self.cfg.epochs, 1.0)
        out = {k: v / ((n_steps - skipped if k == "grad_norm" else n_steps) * W if k in PER_STEP
                       else first_epoch_tokens if k in ONCE else max(totals["rows"], 1.0) if k in PER_ROW
                       else max(totals["tokens"], 1.0))
               for k, v in totals.items() if k not in ("tokens", "rows")}
        if skipped == n_steps:  # no update taken: no norm to report
            out["grad_norm"] = float("nan")
        # The generator/learner gap is token-weighted over all ranks (sums, then one division), its max a max.
        diff_sum, kl_sum, tokens = self._reduce(gen_sums, dist.ReduceOp.SUM).tolist()
        out["gen_logprob_abs_diff"] = diff_sum / max(tokens, 1.0)
        out["gen_logprob_max_abs_diff"] = float(self._reduce(gen_max, dist.ReduceOp.MAX)[0])
        out["gen_kl"] = kl_sum / max(tokens, 1.0)
        off_diff, off_kl, off_tokens = self._reduce(off_sums, dist.ReduceOp.SUM).tolist()
        out["offpolicy_logprob_abs_diff"] = off_diff / max(off_tokens, 1.0)
        out["offpolicy_kl"] = off_kl / max(off_tokens, 1.0)
        # k3 KL(generator || learner) over every response token, fresh and stale rows together
        out["mismatch_kl"] = (kl_sum + off_kl) / max(tokens + off_tokens, 1.0)
        out["shared_prompt_frac"] = float(work.shared)  # the plan is the batch's (packing.shard): every rank's the same
        out["rows_computed_frac"] = work.rows_computed_frac  # the plan's, over every rank
        out["lr"] = lr
        out["skipped_updates"] = float(skipped)
        return out

    @resident
    def train_sft(self, work: TrainBatch | Shard) -> dict[str, float]:
        """One supervised step (rlsys.math.sft, `rlsys sft`): the NLL of the response tokens of this
        rank's micro-batches, each normalised by the whole mini-batch's token count over the ranks,
        then one optimizer step. The batch is one mini-batch (the driver sends one per step)."""
        if isinstance(work, TrainBatch):
            work = self.shard(work, grpo=False)
        assert work.step == self.steps, f"learner {self.rank}: a shard cut for step {work.step}, at step {self.steps}"
        assert len(work.minis) == 1, f"an SFT step is one mini-batch, got {len(work.minis)}"
        micros, normalizer = work.minis[0], work.normalizers[0]
        self.engine.train()
        sums = torch.zeros(2, dtype=torch.float64)  # summed NLL, response tokens
        for k, rows in enumerate(micros):
            micro = work.batch.select(rows)
            self.engine.set_gradient_accumulation_boundary(k == len(micros) - 1)
            logp = self._logprobs(self.engine, micro, work.shared)                       # (b, L)
            loss, metrics = sft_loss(logp, micro.loss_mask.to(logp.device), normalizer)
            self.engine.backward(loss, scale_wrt_gas=False)  # the normaliser spans the mini-batch already
            boundary_norm, lr = self._step()
            sums += torch.tensor([metrics["nll_sum"], float(micro.loss_mask.sum())], dtype=torch.float64)
        self.steps += 1
        norm = self.engine.get_global_grad_norm() if boundary_norm is None else boundary_norm
        assert norm is not None, "DeepSpeed reported no gradient norm"
        nll, tokens = self._reduce(sums, dist.ReduceOp.SUM).tolist()
        finite = math.isfinite(float(norm))
        return {"loss": nll / max(tokens, 1.0), "nll": nll / max(tokens, 1.0),
                "grad_norm": float(norm) if finite else float("nan"), "lr": lr, "skipped_updates": float(not finite)}

    def _seek_schedule(self, position: int) -> None:
        """The next optimizer step uses the learning rate of schedule step `position` (LambdaLR's
        own step() would set it from its counter + 1; DeepSpeed steps it after every optimizer step)."""
        schedule = self.engine.lr_scheduler
        schedule.last_epoch = position
        factor = lr_factor(position, self.cfg, self.total_updates)
        for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * factor
        schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]

    def _step(self) -> tuple[float | None, float | None]:
        """engine.step() after a micro-batch's backward. At the accumulation boundary the plain
        path (stage 0, fp32) first reads the gradient norm and clips or drops the gradients; returns
        (that norm, the learning rate this optimizer step uses) there, (None, None) elsewhere."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None, None
        lr = self.engine.get_lr()[0]
        norm = self._plain_grad_norm()
        if norm is not None:
            self._clip_or_drop_plain_grads(norm)
        self.engine.step()
        return norm, lr

    def needs_old_logprobs(self, mini_batches: int) -> bool:
        """A separate no-grad pass for the old log-probs is needed only when some forward runs after
        an optimizer step. With one epoch over one mini-batch every forward sees the weights that
        generated the batch, so each micro-batch's own log-probs, detached, are the old ones (the
        ratio is exactly 1 and the gradient the same) and that pass, a quarter of the update's
        FLOPs, is skipped (TRL and verl do the same)."""
        return self.cfg.epochs > 1 or mini_batches > 1

    def _plain_grad_norm(self) -> float | None:
        """Stage 0 in fp32 steps torch's optimizer and keeps no norm; there the gradients are whole
        and already averaged over ranks after the boundary backward, so the norm is read here."""
        if not self._plain:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    @property
    def _plain(self) -> bool:
        return self.cfg.zero_stage == 0 and self.dtype == "float32"

    def _clip_or_drop_plain_grads(self, norm: float) -> None:
        """Stage 0 fp32, at an accumulation boundary: clip to learner.grad_clip (rlsys clips here,
        not DeepSpeed, see _ds_config), or, for a non-finite norm, drop every gradient so that
        torch's optimizer leaves weights and moments alone (it skips parameters without one).
        ZeRO 1-3 skip such a step themselves (their overflow check). One difference remains: a
        step skipped here still advances the LR schedule by one update."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not math.isfinite(norm):
            for p in params:
                p.grad = None
            return
        coef = self.cfg.grad_clip / (norm + 1e-6)  # DeepSpeed's and torch's clip_grad_norm_ formula
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)

    def _reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        t = values.to(dtype=torch.float64, device=device_for(self.backend))
        dist.all_reduce(t, op=op)
        return t.cpu()


    # ---- weight sync

    def _named_params(self):
        return list(self.engine.module.named_parameters())

    def sync_plan(self) -> list[Bucket]:
        metas = [TensorMeta(n, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                 for n, p in self._named_params()]
        return plan_buckets(metas, int(self.cfg.sync_bucket_mb * 2**20))

    def senders(self) -> int:
        """How many learner ranks send weights (ranks 0 .. senders-1), each over its own group
        (learner.sync_from_all_ranks; None: all under ZeRO-3, else rank 0 alone)."""
        return sending_ranks(self.cfg, self.world)

    def sync_shards(self) -> int:
        """How many pieces each bucket travels in: under ZeRO-3 with every rank sending, each rank
        sends its own partition of every parameter (no gather among the learners); else 1 (whole
        buckets, dealt round robin to the senders)."""
        return self.world if self.cfg.zero_stage == 3 and self.senders() == self.world > 1 else 1

    def join_sync(self, addr: str, port: int, world: int, timeout_s: float) -> None:
        """A sending rank: rank 0 of its own sync group, hosting its rendezvous; timeout_s: how
        long its collectives may wait (deadlines.sync_s)."""
        assert self.rank < self.senders(), f"learner rank {self.rank} does not send weights"
        self.sync_group = make_group(self.backend, addr, port, 0, world, timeout_s)

    def broadcast_weights(self, plan: list[Bucket]) -> dict[int, int]:
        """_broadcast_weights, and when it fails (an engine died under the push) this rank's sync
        group is dropped before the error leaves: its connections close, so the engines still
        waiting on this push fail at once. A pending gloo receive cannot be cancelled (abort()
        and shutdown() leave it waiting); it ends when a peer's sockets close, or at the group's
        timeout (deadlines.sync_s). The next push builds a new group."""
        try:
            return self._broadcast_weights(plan)
        except RuntimeError as e:  # gloo's and NCCL's errors; the traceback holds the group: let it go
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        self.sync_group = None
        gc.collect()  # the failed send's frames are gone with the exception: the group closes now
        raise RuntimeError(f"learner rank {self.rank}: the weight push failed ({failure}); its sync group is closed")

    def _broadcast_weights(self, plan: list[Bucket]) -> dict[int, int]:
        """Collective over all learner ranks (ZeRO-3 gathers need them): each sending rank
        broadcasts the buckets it owns (_my_buckets) over its sync group and returns their
        checksums by bucket index; the others return {}."""
        mine, buckets = self._my_buckets(plan)
        if not mine:
            return {}
        return dict(zip(mine, send_buckets(self.sync_group, buckets, device_for(self.backend))))

    def share_weights(self, plan: list[Bucket]) -> dict | None:
        """The same buckets as broadcast_weights, by handle, for the engines on this rank's node
        (rlsys.actors.shared_weights): copied into this rank's shared buffer; returns its handle and
        each bucket's place and checksum, or None from a rank that sends nothing. Collective over
        all learner ranks, as broadcast_weights."""
        mine, buckets = self._my_buckets(plan)
        if not mine:
            return None
        return self.shares.share(plan, mine, buckets, device_for(self.backend), self.sync_shards())

    def _my_buckets(self, plan: list[Bucket]) -> tuple[list[int], Iterator[list[torch.Tensor]]]:
        """The buckets this rank sends (their plan indices) and an iterator over their tensors,
        one bucket at a time. ZeRO 0-2: a rank holds every parameter whole and touches only its
        own buckets (weight_sync.owners). ZeRO-3 with every rank sending (sync_shards > 1): each
        rank's own partition of every bucket's parameters, as it holds them (no gather). ZeRO-3
        with rank 0 sending alone: every rank gathers every bucket, in plan order, and rank 0
        yields it; a rank with no buckets takes part in every gather here and gets none."""
        params = dict(self._named_params())
        if self.sync_shards() > 1:
            shards = [[params[m.name].ds_tensor for m in bucket] for bucket in plan]
            for bucket, pieces in zip(plan, shards):
                for m, piece in zip(bucket, pieces):
                    assert piece.numel() == partition(m.numel, self.world), f"{m.name}: partition of {piece.numel()}"
            return list(range(len(plan))), iter(shards)
        zero3 = self.cfg.zero_stage == 3
        owner = owners(len(plan), self.senders())
        mine = [i for i in range(len(plan)) if owner[i] == self.rank]

        def buckets():
            import deepspeed

            for i, bucket in enumerate(plan):
                if not zero3 and owner[i] != self.rank:
                    continue
                tensors = [params[m.name] for m in bucket]
                # ZeRO-3: every rank gathers the bucket; the owner's copy out of it happens inside.
                with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None, enabled=zero3):
                    if owner[i] == self.rank:
                        yield [t.data for t in tensors]

        if not mine:
            if zero3:  # the gathers are collective: a rank that sends nothing still takes part in each
                for _ in buckets():
                    pass
            return [], iter(())
        return mine, buckets()

    def broadcast_raw(self, numel: int, dtype: str) -> None:
        """Rank 0: one flat buffer over its sync group (the reference for the sync benchmark)."""
        if self.rank == 0:
            raw_broadcast(self.sync_group, numel, dtype, device_for(self.backend))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every parameter, whole, on CPU, on rank 0 only (None on the others): the one full copy
        a save, an export or a check needs. Under ZeRO-3 every rank takes part in each gather, one
        parameter at a time, and only rank 0 keeps a copy; otherwise the parameters are whole on
        rank 0 already and the other ranks do nothing (no gather, no copy)."""
        import deepspeed

        zero3 = self.cfg.zero_stage == 3
        if not zero3 and self.rank != 0:
            return None
        out = {}
        for name, p in self._named_params():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=zero3):
                if self.rank == 0:  # ZeRO-3 frees the gathered storage on exit: copy it
                    out[name] = p.data.detach().to("cpu", copy=zero3)
        return out if self.rank == 0 else None

    @resident
    def save(self, folder: str, state: bool = True) -> None:
        """Write this rank's part of a checkpoint into `folder` (created if missing): rank 0 the HF
        weights (safetensors, config, tokenizer) that transformers and vLLM load directly; with
        `state`, every rank its DeepSpeed state under learner/ (optimizer, LR scheduler, update
        count, RNG). Collective. The caller writes into a temporary folder and renames it when whole
        (rlsys.checkpoint.commit): a reader never sees a half-written checkpoint."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        weights = self.full_state_dict()
        if weights is not None:
            self._write_hf(weights, out)
        del weights
        if state:
            self.engine.save_checkpoint(str(out / LEARNER_STATE), tag=STATE_TAG, save_latest=False,
                                        client_state={"rlsys": self._client_state()})
            # DeepSpeed's conversion scripts (zero_to_fp32.py, ...) read its pickles, not these files.
            for script in (out / LEARNER_STATE).glob("zero_to_*.py") if self.rank == 0 else []:
                script.unlink(missing_ok=True)

    @resident
    def load_state(self, folder: str) -> int:
        """Continue from a checkpoint written by `save`: weights, optimizer, LR scheduler, update
        count and RNG. Collective. Returns the number of batches trained so far."""
        path, client = self.engine.load_checkpoint(str(Path(folder) / LEARNER_STATE), tag=STATE_TAG,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or "rlsys" not in client:
            raise FileNotFoundError(f"{folder}: no learner state for rank {self.rank} under {LEARNER_STATE}/")
        mine = client["rlsys"]
        self.steps = mine["steps"]
        torch.set_rng_state(mine["torch_rng"])
        random.setstate(mine["python_rng"])
        return self.steps

    @resident
    def upload_part(self, uri: str, rel: str, state: bool = True) -> dict[str, dict]:
        """This rank's part of a checkpoint straight to a storage URI (trainer.output_dir), never
        through the driver: written (`save`) to a temporary folder on this node, each file uploaded
        to `rel` under `uri` a chunk at a time (rlsys.cluster.storage.RunStorage.put), the folder
        removed. Returns {name relative to the checkpoint: {"size", "sha256"}} as uploaded: the
        driver writes them into the checkpoint's checksums.json. Collective (the save is)."""
        from rlsys.cluster.storage import RunStorage  # pyarrow only: no Ray comes with it

        with tempfile.TemporaryDirectory(prefix="rlsys-ckpt-") as tmp:
            self.save(tmp, state)
            storage = RunStorage(uri, Path(tmp))
            names = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
            return {name: storage.put(Path(tmp) / name, f"{rel}/{name}") for name in names}

    def fetch_part(self, uri: str, rel: str, files: dict[str, dict], key: str) -> None:
        """Download `files` ({name relative to the checkpoint: its checksums.json entry}) of the
        checkpoint at `rel` under storage `uri` into this node's received folder `key` (as
        `receive_state_chunk` fills it), a chunk at a time, each file's size and sha256 checked:
        a mismatch stops the resume naming the file and the URI. Then `load_received_state`."""
        from rlsys.cluster.storage import RunStorage

        folder = self._received(key)
        storage = RunStorage(uri, folder)
        for name, want in files.items():
            storage.get(f"{rel}/{name}", folder / safe_relative(name), want)

    def receive_state_chunk(self, key: str, name: str, offset: int, data: bytes) -> None:
        """One chunk of a checkpoint's state file (rlsys.checkpoint.file_chunks), for a rank that
        cannot read the run folder: written at its offset into the node's temporary folder `key`
        (one per resume, shared by this node's ranks: a file several of them read, the module
        states, arrives once per node). A chunk at a time, never a whole file, so neither the
        driver nor the object store ever holds a model-sized argument."""
        write_chunk(self._received(key), name, offset, data)

    def load_received_state(self, key: str, sizes: dict[str, int]) -> int:
        """`load_state` from the node's received folder `key`, once each file this rank reads has
        its size in `sizes` (relative name: bytes, as the driver read them). Collective."""
        folder = self._received(key)
        got = {name: (folder / name).stat().st_size if (folder / name).is_file() else None for name in sizes}
        wrong = sorted(name for name in sizes if got[name] != sizes[name])
        if wrong:
            raise RuntimeError(f"learner {self.rank}: the state files received into {folder} differ from the "
                               f"checkpoint's: " + ", ".join(f"{n}: {got[n]} bytes, expected {sizes[n]}"
                                                            for n in wrong[:5]))
        return self.load_state(str(folder))

    def drop_received_state(self, key: str) -> None:
        """The node's received folder `key` goes, once every rank on the node has loaded from it."""
        folder = self._received(key)
        if folder.exists():
            shutil.rmtree(folder)

    @staticmethod
    def _received(key: str) -> Path:
        assert key.startswith("rlsys-resume-") and "/" not in key, f"not a received-state folder name: {key!r}"
        return Path(tempfile.gettempdir()) / key

    def _client_state(self) -> dict:
        """What DeepSpeed does not keep: the update count (it seeds each update's shuffle) and the
        RNG states (plain types: rlsys.actors.state_tree writes them)."""
        return {"steps": self.steps, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}

    def save_files(self, state: bool = True, chunk_bytes: int = 64 << 20) -> Iterator[tuple[str, bytes]]:
        """The same checkpoint for a driver on another node without shared storage: this rank
        writes its part (`save`) to a local temporary folder and streams the files back as
        (relative name, chunk) pairs (a Ray streaming generator: a chunk at a time in flight, never
        the whole model in the object store); the driver writes them into the run folder
        (rlsys.checkpoint.receive). A rank with nothing to write (not rank 0, no state, ZeRO 0-2)
        yields nothing."""
        with tempfile.TemporaryDirectory(prefix="rlsys-ckpt-") as tmp:
            self.save(tmp, state)
            for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                name = file.relative_to(tmp).as_posix()
                with open(file, "rb") as f:
                    while chunk := f.read(chunk_bytes):
                        yield name, chunk
                yield name, b""  # end of this file (an empty file is one empty chunk)

    def _write_hf(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(folder)
