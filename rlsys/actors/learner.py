"""One learner rank: a DeepSpeed engine training the policy with GRPO (Ray is applied in rlsys/cluster/).

This module holds the rank's set-up and its update; its side of the weight push is
rlsys.actors.learner_sync (WeightSender), its checkpoint I/O rlsys.actors.learner_checkpoint
(CheckpointIO), the log-prob forward it trains through rlsys.actors.logprobs.

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
import importlib
import math
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from rlsys.actors.state_tree import SafetensorsCheckpointEngine
from rlsys.math.grpo import grpo_loss, off_policy_weights
from rlsys.math.packing import Shard, cut
from rlsys.math.flops import Shape
from rlsys.math.prefix import share_prompts
from rlsys.math.sft import sft_loss
from rlsys.config import AlgoConfig, LearnerConfig, off_policy_band
from rlsys.types import TrainBatch
from rlsys.actors.heap import keep_freed_memory
from rlsys.actors.learner_checkpoint import CheckpointIO, resident
from rlsys.actors.learner_sync import WeightSender
from rlsys.actors.logprobs import (generator_mismatch, load_without_dropout, resolve_logprob_chunk, scored_from,
                                   token_logprobs, with_logprob_forward)
from rlsys.actors.shared_weights import Shares
from rlsys.actors.weight_sync import device_for, flatten_parameters, free_port


PER_STEP = ("loss", "pg_loss", "kl", "grad_norm")
"""Metrics with one value per optimizer step (averaged over steps and ranks); the others are
per-token shares."""
ONCE = ("is_weight_mean", "is_capped_frac", "is_masked_frac", "stale_frac")
"""Per-token shares counted once per row (the first epoch), not once per epoch."""
PER_ROW = ("is_masked_seq_frac",)
"""Shares of rows, counted once per row (the first epoch)."""


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


class Learner(WeightSender, CheckpointIO):
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

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the policy as the engine holds it (ZeRO-3: shards); the weight push
        (learner_sync) and the checkpoint I/O (learner_checkpoint) read them here."""
        return list(self.engine.module.named_parameters())

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
