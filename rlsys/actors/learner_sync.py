"""A learner rank's side of the weight push: which buckets it sends, over its sync group or by handle.

A mixin of rlsys.actors.learner.Learner (it reads the rank's DeepSpeed engine and its parameters,
`_named_params`, config and world);
the receiving side is rlsys.actors.engine_worker, the wire format rlsys.actors.weight_sync.
"""

from __future__ import annotations

import gc
from typing import Iterator

import torch

from rlsys.actors.weight_sync import (Bucket, TensorMeta, device_for, make_group, owners, partition, plan_buckets,
                                      raw_broadcast, send_buckets, sending_ranks)


class WeightSender:
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
