"""Weights by handle: a sending learner rank and the engines on its node share the buckets' memory
instead of passing them through a collective (cluster.placement=colocated, and any engine that
happens to sit on the node of every sending rank; learner.sync_by_handle).

The sending rank copies its buckets, one after the other, into one buffer that other processes on
its node can map, and hands out the buffer's handle with each bucket's place in it:
- CPU: a memfd (anonymous shared memory), reached as /proc/<pid>/fd/<n>. It lives exactly as long
  as the learner's process holds it, so a killed learner leaves nothing behind in /dev/shm.
- GPU: a CUDA allocation, reached through a CUDA IPC handle as torch.multiprocessing.reductions
  makes it, opened on the engine's device that is the same physical GPU (matched by UUID).
The engine's workers map the buffer (once: the mapping is kept while the learner keeps the buffer)
and load each bucket from views into it: no copy on the way; vLLM's load is the one copy. The two
devices differ only in `SharedBuffer.create` and `open_shared`; the layout, checksums, ZeRO-3
pieces and vLLM's reload are the collective path's code (rlsys.actors.weight_sync), and the CPU
tests run all of it.

What a handle looks like crosses vLLM's msgpack boundary (tensor-parallel engines): plain lists,
strings, ints and bytes only.
"""

from __future__ import annotations

import os
import pickle
import uuid
from typing import Iterator

import torch

from rlsys.actors.weight_sync import Bucket, checksum, combined, owners, partition, unshard

ALIGN = 64  # bytes: every bucket starts on a cache line, so a view of any dtype is aligned


class SharedBuffer:
    """A buffer of `nbytes` that processes on this node can map by `handle` (see the module)."""

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes, self.device = nbytes, device
        token = uuid.uuid4().hex  # names this buffer: an engine keeps its mapping while the token stays
        self._fd: int | None = None
        if device.type == "cpu":
            self._fd = os.memfd_create(f"rlsys-weights-{token[:8]}", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, nbytes)
            storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{self._fd}", shared=True, nbytes=nbytes)
            self.tensor = torch.empty(0, dtype=torch.uint8).set_(storage)                   # (nbytes,)
            self.handle = ["memfd", token, nbytes, f"/proc/{os.getpid()}/fd/{self._fd}"]
        elif device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)             # (nbytes,)
            gpu = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = ["cuda", token, nbytes, pickle.dumps(reduce_tensor(self.tensor)), gpu]
        else:
            raise ValueError(f"weights by handle: no shared buffer for device {device}")

    def close(self) -> None:
        """Drop this process's hold on the buffer; engines that mapped it keep their mapping until
        they let it go (a grown buffer replaces this one)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def open_shared(handle: list) -> torch.Tensor:
    """The (nbytes,) uint8 tensor behind a SharedBuffer's handle, in this process (same node)."""
    kind, token, nbytes = handle[:3]
    if kind == "memfd":
        path = handle[3]
        try:
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
        except (RuntimeError, OSError) as e:
            raise RuntimeError(
                f"weights by handle: cannot map the learner's buffer {path} ({e}); the learner rank must "
                f"run on this node, in this process namespace (learner.sync_by_handle=false sends over "
                f"the collective instead)") from e
        return torch.empty(0, dtype=torch.uint8).set_(storage)
    if kind == "cuda":
        rebuild, args = pickle.loads(handle[3])
        args = list(args)
        args[6] = _device_with_uuid(handle[4])  # the IPC handle names the learner's device index, not ours
        return rebuild(*args)
    raise ValueError(f"weights by handle: unknown handle kind {kind!r}")


def _device_with_uuid(gpu: str) -> int:
    """This process's index of the GPU with that UUID (its CUDA_VISIBLE_DEVICES may number the
    learner's GPU differently, or not show it at all)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == gpu:
            return i
    raise RuntimeError(f"weights by handle: the learner's GPU {gpu} is not visible to this engine worker "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                       f"learner.sync_by_handle=false sends over the collective instead")


def bucket_nbytes(bucket: Bucket, shards: int = 1) -> int:
    """Bytes of one bucket in a sender's buffer: every parameter whole, or (shards > 1) this
    rank's ZeRO-3 partition of each."""
    size = torch.empty(0, dtype=getattr(torch, bucket[0].dtype)).element_size()
    return size * sum(m.numel if shards == 1 else partition(m.numel, shards) for m in bucket)


def layout(plan: list[Bucket], mine: list[int], shards: int = 1) -> tuple[dict[int, int], int]:
    """Where each of this rank's buckets starts in its buffer (bytes, aligned), and the buffer's size.

    >>> from rlsys.actors.weight_sync import TensorMeta
    >>> plan = [[TensorMeta("a", (3,), "float32")], [TensorMeta("b", (20,), "float32")], [TensorMeta("c", (2,), "bfloat16")]]
    >>> layout(plan, [0, 2])  # 12 bytes, then the third bucket on the next 64-byte line
    ({0: 0, 2: 64}, 68)
    >>> layout(plan, [1], shards=2)  # a partition of 10 floats
    ({1: 0}, 40)
    """
    offsets, end = {}, 0
    for i in mine:
        start = -(-end // ALIGN) * ALIGN
        offsets[i] = start
        end = start + bucket_nbytes(plan[i], shards)
    return offsets, end


class Shares:
    """One sending learner rank's side: its buffer, kept from push to push (a new one only when the
    buckets outgrow it), so its pages are faulted in once."""

    def __init__(self):
        self.buffer: SharedBuffer | None = None

    def share(self, plan: list[Bucket], mine: list[int], buckets: Iterator[list[torch.Tensor]], device: torch.device,
              shards: int = 1) -> dict:
        """Copy this rank's buckets (`buckets` yields the tensors of plan[i] for each i in `mine`, in
        order) into the buffer; returns {"handle": ..., "buckets": [[i, offset, checksum], ...]}."""
        offsets, nbytes = layout(plan, mine, shards)
        if self.buffer is None or self.buffer.nbytes < nbytes or self.buffer.device != device:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = SharedBuffer(max(nbytes, 1), device)
        out = []
        for i, tensors in zip(mine, buckets):
            dtype = tensors[0].dtype
            numel = sum(t.numel() for t in tensors)
            flat = self.buffer.tensor[offsets[i]:offsets[i] + numel * tensors[0].element_size()].view(dtype)
            torch.cat([t.detach().reshape(-1).to(device) for t in tensors], out=flat)
            assert flat.nbytes == bucket_nbytes(plan[i], shards), f"bucket {i}: {flat.nbytes} bytes copied"
            out.append([i, offsets[i], checksum(flat)])
        assert [i for i, _, _ in out] == list(mine), f"buckets shared: {[i for i, _, _ in out]} of {list(mine)}"
        if device.type == "cuda":  # the copies are queued on the stream: done before an engine reads them
            torch.cuda.synchronize(device)
        return {"handle": self.buffer.handle, "buckets": out}


class Mapped:
    """An engine worker's side: the senders' buffers it has mapped, by token, kept while the learner
    keeps them (a mapping costs its page faults on first read)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def open(self, shares: list[dict]) -> list[torch.Tensor]:
        tokens = [s["handle"][1] for s in shares]
        for token in [t for t in self.buffers if t not in tokens]:  # a buffer the learners replaced
            del self.buffers[token]
        for s, token in zip(shares, tokens):
            if token not in self.buffers:
                self.buffers[token] = open_shared(s["handle"])
        return [self.buffers[t] for t in tokens]

    def buckets(self, shares: list[dict], plan: list[Bucket], sums: list[int] | None = None,
                shards: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every parameter, bucket by bucket, as receive_buckets yields them,
        from views into the senders' buffers (shares[r]: sending rank r's share). Bucket i comes
        from its owner's buffer, or (shards > 1) in pieces from every rank's; each bucket's
        checksum as read goes to `sums`."""
        buffers = self.open(shares)
        offsets = [{i: offset for i, offset, _ in s["buckets"]} for s in shares]
        owner = owners(len(plan), len(shares))
        assert shards == 1 or shards == len(shares), f"{shards} shards over {len(shares)} sending ranks"
        for i, bucket in enumerate(plan):
            ranks = range(shards) if shards > 1 else [owner[i]]
            dtype = getattr(torch, bucket[0].dtype)
            size = bucket_nbytes(bucket, shards)
            pieces = []
            for r in ranks:
                offset = offsets[r][i]
                assert offset + size <= buffers[r].numel(), f"bucket {i} lies past the end of rank {r}'s buffer"
                pieces.append(buffers[r][offset:offset + size].view(dtype))
            if sums is not None:
                sums.append(combined([checksum(piece) for piece in pieces]))
            yield from unshard(bucket, pieces)
