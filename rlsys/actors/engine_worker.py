"""The receiving end of the weight sync, inside vLLM's workers: WorkerExtension's methods (vLLM's
`worker_extension_cls`, called by name through `LLM.collective_rpc`), so the same code serves an
in-process CPU engine and the worker processes of a tensor-parallel one. They feed vLLM's in-place
reload path a lazy iterator over the buckets as they arrive (rlsys.actors.weight_sync.receive_buckets),
so the engine never holds a second copy of the model; and read back what an engine serves, for
exactness checks.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Iterator

import torch

from rlsys.actors.heap import keep_freed_memory
from rlsys.actors.shared_weights import Mapped
from rlsys.actors.weight_sync import (Bucket, TensorMeta, device_for, make_group, raw_broadcast,
                                      receive_buckets)


def plan_to_wire(plan: list[Bucket]) -> list[list[list]]:
    """The plan as plain lists, the only form that crosses vLLM's msgpack boundary intact
    (dataclasses arrive as dicts) when the engine core runs in its own process."""
    return [[[m.name, list(m.shape), m.dtype] for m in bucket] for bucket in plan]


def plan_from_wire(wire: list[list[list]]) -> list[Bucket]:
    return [[TensorMeta(name, tuple(shape), dtype) for name, shape, dtype in bucket] for bucket in wire]


class _QuietRotaryReload(logging.Filter):
    """Every in-place reload warns that RotaryEmbedding "failed to load weights": it has none (its
    cos/sin cache is a buffer vLLM restores itself); a tied ParallelLMHead says the same, and
    rlsys_receive re-ties it. Drop those two lines, keep every other warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f"{layer}: Failed to load weights" in message for layer in ("RotaryEmbedding", "ParallelLMHead"))


class WorkerExtension:
    """Mixed into every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`); the generator
    calls these methods by name through `LLM.collective_rpc`, so the same code runs in an
    in-process engine and in the worker processes of a tensor-parallel one (where arguments and
    results cross msgpack: plain lists, numbers, strings and bytes only). `self` is vLLM's worker.
    Each worker holds its shard of every layer; vLLM's loaders cut that shard from the full
    tensors every worker receives."""

    def rlsys_keep_freed_memory(self) -> bool:
        """A CPU worker keeps what vLLM's reload frees for the next push (rlsys.actors.heap)."""
        return keep_freed_memory(mmap_threshold=1 << 30)

    def rlsys_reseed(self, seed: int) -> None:
        """The sampler draws from torch's default generator (no per-request seeds): reseed it."""
        torch.manual_seed(seed)

    def rlsys_join(self, rendezvous: list, first_rank: int, world: int, backend: str, timeout_s: float) -> int:
        """Join every sending learner rank's sync group ([addr, port] each, in rank order) as
        first_rank + this worker's rank inside its engine, each with timeout_s (make_group). Every
        member builds the groups in the same order, so the rendezvous of one never waits on another."""
        rank = first_rank + self.rank
        self.rlsys_sync = ([make_group(backend, addr, port, rank, world, timeout_s) for addr, port in rendezvous],
                           backend)
        return rank

    def rlsys_receive(self, wire_plan: list, shards: int = 1, shares: list | None = None) -> list[int]:
        """_rlsys_receive; when the collective fails (a peer died under the push) this worker's sync
        groups are dropped before the error leaves, closing their connections: the members still
        waiting on this push (a gloo broadcast relays through receivers) fail at once instead of at
        the group's timeout. The next push builds new groups. By handle (`shares`) there is no group."""
        if shares is not None:
            return self._rlsys_receive(wire_plan, shards, shares)
        try:
            return self._rlsys_receive(wire_plan, shards)
        except RuntimeError as e:  # the traceback's frames hold the groups: let them go with it
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        self.rlsys_sync = None
        gc.collect()
        raise RuntimeError(f"weight receive failed ({failure}); this worker's sync groups are closed")

    def _rlsys_receive(self, wire_plan: list, shards: int = 1, shares: list | None = None) -> list[int]:
        """Receive every bucket (in `shards` pieces each; _rlsys_buckets) and load it in place;
        returns each bucket's checksum as received (the senders compare them with what they sent).

        Leaves `self.rlsys_receive_s` = (seconds in all, seconds spent waiting for the wire) for
        the sync benchmark's breakdown (the rest is vLLM's in-place load: on CPU, repacking every
        linear layer's weight for oneDNN)."""
        plan = plan_from_wire(wire_plan)
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _QuietRotaryReload) for f in reload_log.filters):
            reload_log.addFilter(_QuietRotaryReload())
        sums: list[int] = []  # what arrived, per bucket
        count, waited, start = 0, 0.0, time.perf_counter()

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count, waited
            items = self._rlsys_buckets(plan, shards, shares, sums)
            while True:
                t = time.perf_counter()
                item = next(items, None)
                waited += time.perf_counter() - t
                if item is None:
                    return
                count += 1
                yield item

        model = self.model_runner.get_model()
        aliases = tied_parameters(model)
        self.reload_weights(weights_iterator=counted())
        # A layer that loaded nothing because its weight is tied (lm_head = embed_tokens) keeps the
        # kernel vLLM derived from the OLD weight (on CPU a packed GEMM copy), so the engine would
        # serve new embeddings with a stale output layer. Re-tie it and derive its kernel again.
        for alias, primary in aliases:
            module_name, _, attr = alias.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, model.get_parameter(primary))
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)
        device = next(model.parameters()).device
        if device.type == "cuda":  # the loads are queued on the stream: done before the push returns
            torch.cuda.synchronize(device)
        self.rlsys_receive_s = (time.perf_counter() - start, waited)
        expected = sum(len(b) for b in plan)
        # The loader must drain the iterator, or the sender would block on a broadcast nobody takes.
        assert count == expected, f"the engine consumed {count} of {expected} tensors"
        return sums

    def _rlsys_buckets(self, plan: list[Bucket], shards: int, shares: list | None,
                       sums: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every parameter, bucket by bucket, each bucket's checksum into `sums`:
        by handle, as views into the sending ranks' shared buffers (`shares`, one per sending
        rank: rlsys.actors.shared_weights), else received from their sync groups."""
        if shares is not None:
            if getattr(self, "rlsys_mapped", None) is None:
                self.rlsys_mapped = Mapped()  # kept: a buffer is mapped once while the learner keeps it
            return self.rlsys_mapped.buckets(shares, plan, sums, shards)
        groups, backend = self.rlsys_sync
        return receive_buckets(groups, plan, device_for(backend), sums, shards)

    def rlsys_receive_wire(self, wire_plan: list, shards: int = 1, shares: list | None = None) -> list[int]:
        """The wire alone, for the sync benchmark: every bucket received into its buffer (or, by
        handle, mapped) and checksummed as in rlsys_receive, nothing loaded into the model; returns
        the checksums."""
        sums: list[int] = []
        for _ in self._rlsys_buckets(plan_from_wire(wire_plan), shards, shares, sums):
            pass
        return sums

    def rlsys_receive_seconds(self) -> list[float]:
        return list(self.rlsys_receive_s)

    def rlsys_receive_raw(self, numel: int, dtype: str) -> None:
        groups, backend = self.rlsys_sync
        raw_broadcast(groups[0], numel, dtype, device_for(backend))  # from learner rank 0

    def rlsys_served_weights(self) -> bytes:
        """This worker's shard of every weight it serves, by vLLM parameter name, as safetensors
        bytes (tensors do not cross msgpack); for exactness checks."""
        from safetensors.torch import save

        return save(read_weights(self.model_runner.get_model()))


WORKER_EXTENSION = f"{WorkerExtension.__module__}.{WorkerExtension.__qualname__}"


def tied_parameters(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(alias, primary) for every parameter reachable under two names (tied embeddings)."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


def read_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a vLLM model serves, by vLLM parameter name, for exactness checks.

    On CPU vLLM repacks linear weights for oneDNN and leaves `layer.weight` empty, so a linear
    layer's weight is read back by applying the layer's own kernel to an identity matrix
    (y = I @ W^T is exact: each output is one product with 1.0 plus zeros). Values and dtypes
    are what the engine holds: on CPUs with AMX, vLLM keeps the bias of a small bf16 linear layer
    in float32 (tests/test_sync.py's served_as_learner compares after that cast).
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if hasattr(module, "quant_method") and hasattr(module, "input_size_per_partition"):
            eye = torch.eye(module.input_size_per_partition, dtype=module.params_dtype, device=weight.device)
            with torch.no_grad():
                out[f"{name}.weight"] = module.quant_method.apply(module, eye, bias=None).t().contiguous().cpu()
        else:
            out[f"{name}.weight"] = weight.detach().cpu().clone()
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            out[f"{name}.bias"] = bias.detach().cpu().clone()
    return out
