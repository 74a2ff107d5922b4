"""Weight sync: the learner ranks broadcast every parameter to every generator engine.

Each sending learner rank has a process group of its own (gloo on CPU, NCCL on GPU) holding it
(rank 0) and every inference worker of every engine (ranks 1..); the learners' own group is
untouched. The buckets are dealt round robin to the senders (learner.sync_from_all_ranks: every
rank; else rank 0 alone), which send at once, each its own buckets.
Parameters travel in buckets: a plan (names, shapes, dtypes, bucket boundaries) is agreed
once, then each bucket is one flat buffer, one broadcast. A ZeRO-3 learner whose every rank
sends is sharded on the wire too: each rank sends its own partition of every bucket's parameters
(no gather among the learners), and the engines put each parameter together from its pieces
(`shards`); a ZeRO-3 rank 0 sending alone gathers one bucket at a time, never the whole model.

The receiving side runs inside vLLM's workers (rlsys.actors.engine_worker): it feeds vLLM's
in-place reload a lazy iterator over receive_buckets, so each bucket is received only when the
loader asks for its first tensor and the engine never holds a second copy of the model.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from rlsys.config import LearnerConfig

@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


Bucket = list[TensorMeta]


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Consecutive tensors of one dtype, up to bucket_bytes each (a larger tensor gets its own)."""
    buckets: list[Bucket] = []
    size = 0
    for m in metas:
        nbytes = m.numel * torch.empty(0, dtype=getattr(torch, m.dtype)).element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != m.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(m)
        size += nbytes
    return buckets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_group(backend: str, addr: str, port: int, rank: int, world: int, timeout_s: float) -> dist.ProcessGroup:
    """A standalone process group (no global init), so it can sit beside any other group.
    timeout_s (deadlines.sync_s): how long its rendezvous, and each of its broadcasts, may wait
    for the other members before raising; a push or group rebuild has that long as a whole, so
    no one collective may wait longer (a member that never posts would hold the others past the
    user's deadline)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore("rlsys-wsync", dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout))
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"unknown weight-sync backend {backend!r}")


def device_for(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def checksum(flat: torch.Tensor, offset: int = 0) -> int:
    """The buffer's bytes summed as little-endian 64-bit words, modulo 2^64: byte i counts
    b_i * 256^((offset + i) % 8), a last partial word as if padded with zeros. Exact and
    independent of the order of the sum (integer addition wraps the same way on every CPU and
    GPU), so the same on both sides of a correct transfer, on any device and wherever the bytes
    lie in memory; a corrupted, truncated or stale buffer changes it (a permutation of words would
    not). Summing 64-bit words runs at memory speed: summing 32-bit words into 64 bits took 32 ms
    per 32 MB bucket, more than the broadcast itself.

    `offset`: where these bytes start within a larger buffer they are a piece of; the pieces'
    checksums, each with its offset, then add up (`combined`) to the whole buffer's, at any split
    point. A bucket's pieces on the wire are each checksummed whole (offset 0) on both sides.

    >>> checksum(torch.tensor([1.0, -2.0])) == checksum(torch.tensor([1.0, -2.0])) != checksum(torch.tensor([1.0, 2.0]))
    True
    >>> checksum(torch.tensor([1.0, 2.0, 3.0])) != checksum(torch.tensor([1.0, 2.0, 4.0]))  # 12 bytes: a tail of 4
    True
    >>> b = torch.arange(1, 11, dtype=torch.uint8)  # bytes 1..10: one word, then a word of 9 and 10
    >>> checksum(b) == sum((i + 1) * 256**(i % 8) for i in range(10))
    True
    >>> checksum(b[3:]) == sum((i + 1) * 256**(i - 3) for i in range(3, 10)) % 2**64  # a view at byte 3
    True
    >>> combined([checksum(b[:3]), checksum(b[3:], offset=3)]) == checksum(b)
    True
    """
    raw = flat.detach().contiguous().reshape(-1).view(torch.uint8)
    phase = offset % 8
    if (raw.storage_offset() - phase) % 8 == 0:  # its words lie on 8-byte boundaries: summed in place
        return _word_sum(raw, phase)
    # A view that starts mid-word (a ZeRO-3 partition inside its rank's flat buffer, a bucket of
    # flat bf16 parameters) cannot be viewed as int64: copy it, a chunk at a time, into an aligned
    # buffer small enough to stay in cache, and sum that.
    scratch = torch.empty(8 + min(raw.numel(), CHECKSUM_CHUNK), dtype=torch.uint8, device=raw.device)
    total = 0
    for start in range(0, raw.numel(), CHECKSUM_CHUNK):  # a multiple of 8: every chunk starts at `phase`
        chunk = raw[start:start + CHECKSUM_CHUNK]
        aligned = scratch[phase:phase + chunk.numel()]
        aligned.copy_(chunk)
        total += _word_sum(aligned, phase)
    return total % 2**64


CHECKSUM_CHUNK = 4 * 2**20  # bytes; a multiple of 8


def _word_sum(raw: torch.Tensor, phase: int) -> int:
    """checksum of bytes whose first byte sits at position `phase` of its word, in memory too
    (raw.storage_offset() % 8 == phase): the whole words are summed as int64 in place, the
    partial words at either end (at most 7 bytes each) in Python."""
    head = min(raw.numel(), (8 - phase) % 8)
    body = (raw.numel() - head) // 8 * 8
    words = int(raw[head:head + body].view(torch.int64).sum()) if body else 0
    return (_partial_word(raw[:head], phase) + words + _partial_word(raw[head + body:], 0)) % 2**64


def _partial_word(raw: torch.Tensor, phase: int) -> int:
    return int.from_bytes(raw.cpu().numpy().tobytes(), "little") << 8 * phase


def combined(sums: list[int]) -> int:
    """The checksum of a bucket that travelled in pieces (one per sending rank): the pieces'
    checksums summed modulo 2^64, the same on both sides.

    >>> combined([2**64 - 1, 2]), combined([5])
    (1, 5)
    """
    return sum(sums) % 2**64


def partition(numel: int, shards: int) -> int:
    """Elements of a parameter that each of `shards` ZeRO-3 ranks holds: DeepSpeed pads the
    parameter to a multiple of the ranks and gives rank r elements [r * p, (r + 1) * p).

    >>> partition(10, 4), partition(8, 4), partition(1, 2)
    (3, 2, 1)
    """
    return -(-numel // shards)


def sending_ranks(cfg: LearnerConfig, world: int) -> int:
    """How many learner ranks send weights (ranks 0 .. n-1), each over a group of its own:
    learner.sync_from_all_ranks, or when None every rank under ZeRO-3 (no rank holds a whole
    bucket) and rank 0 alone under ZeRO 0-2.

    >>> sending_ranks(LearnerConfig(zero_stage=3), 4), sending_ranks(LearnerConfig(zero_stage=1), 4)
    (4, 1)
    >>> sending_ranks(LearnerConfig(zero_stage=1, sync_from_all_ranks=True), 4)
    4
    """
    all_ranks = cfg.sync_from_all_ranks
    return world if (cfg.zero_stage == 3 if all_ranks is None else all_ranks) else 1


def owners(buckets: int, senders: int) -> list[int]:
    """The learner rank that sends each bucket: round robin over the sending ranks, so that each
    sends about 1/senders of the bytes, all at once, each over its own group.

    >>> owners(5, 2), owners(3, 1)
    ([0, 1, 0, 1, 0], [0, 0, 0])
    """
    return [i % senders for i in range(buckets)]


def send_buckets(group: dist.ProcessGroup, buckets: Iterator[list[torch.Tensor]], device: torch.device) -> list[int]:
    """Broadcast each bucket as one flat buffer; returns each bucket's checksum. Two in flight:
    bucket k+1 is copied (and, under ZeRO-3, gathered) while bucket k travels; receive_buckets
    pipelines the same way."""
    in_flight: list[tuple[torch.Tensor, dist.Work]] = []
    sums = []
    for k, tensors in enumerate(buckets):
        flat = adjacent_view(tensors, device)
        if flat is None:
            flat = _send_buffer(k % 2, sum(t.numel() for t in tensors), tensors[0].dtype, device)
            torch.cat([t.detach().reshape(-1).to(device) for t in tensors], out=flat)
        work = group.broadcast(flat, 0)
        sums.append(checksum(flat))  # while the bucket travels: both only read it
        in_flight.append((flat, work))  # flat must live until its broadcast is done
        if len(in_flight) > 1:
            in_flight.pop(0)[1].wait()
    for _, work in in_flight:
        work.wait()
    if device.type == "cuda":  # NCCL's wait() orders the stream, not the host: the loop goes on only once every bucket has left
        torch.cuda.synchronize(device)
    return sums


def adjacent_view(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """One flat view over the tensors when they already lie one after the other in one storage
    on `device` (a bucket of a learner whose parameters are flat: flatten_parameters, or ZeRO-1/2's
    own flat buffers); None when they do not, and the bucket is copied. The view saves the copy, a
    pass over every byte of the model on every push (on CPU about a third of a push's wire time).

    >>> flat = torch.arange(6.0)
    >>> adjacent_view([flat[:2], flat[2:6].view(2, 2)], flat.device).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    >>> adjacent_view([flat[:2], flat[3:6]], flat.device) is None  # a gap
    True
    """
    first = tensors[0]
    if any(t.device != device or t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return None
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.data_ptr() != end:
            return None
        end += t.numel() * t.element_size()
    numel = sum(t.numel() for t in tensors)
    return first.detach().as_strided((numel,), (1,), first.storage_offset())


def flatten_parameters(module: torch.nn.Module) -> None:
    """Move the module's parameters into one flat buffer per dtype, in named_parameters order,
    each parameter a view of it: the weight sync's buckets (consecutive parameters) are then slices
    of that buffer and go on the wire without a copy (adjacent_view). ZeRO-1/2 do the same to the
    parameters themselves; ZeRO-0 leaves one allocation per parameter. The Parameter objects stay
    (an optimizer holds them); only their storage moves, so call it before the first optimizer step."""
    params = [p for _, p in module.named_parameters()]  # tied weights once
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group in by_dtype.items():
        flat = torch.empty(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
        offset = 0
        for p in group:
            view = flat[offset:offset + p.numel()].view(p.shape)
            view.copy_(p.data)
            p.data = view
            offset += p.numel()


_SEND_BUFFERS: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _send_buffer(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The first `numel` elements of send buffer `slot` (0 or 1: one is filled while the other
    travels), kept from push to push and grown to the largest bucket: a new buffer per bucket
    would fault in its pages on every push."""
    key = (slot, dtype, str(device))
    buf = _SEND_BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SEND_BUFFERS[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def receive_buckets(groups: list[dist.ProcessGroup], plan: list[Bucket], device: torch.device,
                    sums: list[int] | None = None, shards: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) bucket by bucket, bucket i from its sender's group
    (groups[owners(len(plan), len(groups))[i]]); each received bucket's checksum goes to `sums`.
    shards > 1 (a ZeRO-3 learner, every rank sending): every bucket arrives in `shards` pieces at
    once, piece r from groups[r] holding rank r's partition of each parameter, and each parameter
    is put together from its pieces (one copy; the padding of the last partition dropped).
    The next bucket's broadcasts are posted before this one's tensors are handed out, so it arrives
    while the engine loads this one (and, with several senders, comes from another learner rank)."""
    owner = owners(len(plan), len(groups))
    assert shards == 1 or shards == len(groups), f"{shards} shards over {len(groups)} sending ranks"

    def post(i: int) -> list[tuple[torch.Tensor, dist.Work]]:
        bucket = plan[i]
        dtype = getattr(torch, bucket[0].dtype)
        if shards == 1:
            flat = torch.empty(sum(m.numel for m in bucket), dtype=dtype, device=device)
            return [(flat, groups[owner[i]].broadcast(flat, 0))]
        pieces = [torch.empty(sum(partition(m.numel, shards) for m in bucket), dtype=dtype, device=device)
                  for _ in range(shards)]
        return [(piece, group.broadcast(piece, 0)) for piece, group in zip(pieces, groups)]

    pending = post(0) if plan else None
    for i, bucket in enumerate(plan):
        for _, work in pending:
            work.wait()
        pieces = [piece for piece, _ in pending]
        if i + 1 < len(plan):
            pending = post(i + 1)
        if sums is not None:  # while the next bucket arrives
            sums.append(combined([checksum(piece) for piece in pieces]))
        yield from unshard(bucket, pieces)


def unshard(bucket: Bucket, pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each parameter of a bucket received in pieces, piece r holding rank r's
    ZeRO-3 partition of every parameter one after the other (`partition` elements each, the last
    rank's padded); one piece: the bucket whole, each tensor a view of it (no copy).

    >>> a, b = torch.tensor([0., 1., 2., 5., 6.]), torch.tensor([3., 4., -1., 7., 8.])  # params of 5 and 4
    >>> [(n, t.tolist()) for n, t in unshard([TensorMeta("x", (5,), "float32"), TensorMeta("y", (2, 2), "float32")], [a, b])]
    [('x', [0.0, 1.0, 2.0, 3.0, 4.0]), ('y', [[5.0, 6.0], [7.0, 8.0]])]
    """
    offset = 0
    for m in bucket:
        if len(pieces) == 1:
            yield m.name, pieces[0][offset:offset + m.numel].view(m.shape)
            offset += m.numel
        else:
            part = partition(m.numel, len(pieces))
            whole = torch.cat([piece[offset:offset + part] for piece in pieces])[:m.numel]
            yield m.name, whole.view(m.shape)
            offset += part


_RAW_BUFFERS: dict[tuple[int, str, str], torch.Tensor] = {}


def raw_broadcast(group: dist.ProcessGroup, numel: int, dtype: str, device: torch.device) -> None:
    """One flat buffer of numel elements, rank 0 to all: the link's best case, with nothing to
    gather, copy or load. The weight-sync benchmark measures `push` against it. The buffer is
    allocated once and reused, so neither side pays for allocation or page faults."""
    key = (numel, dtype, str(device))
    if key not in _RAW_BUFFERS:
        _RAW_BUFFERS.clear()  # keep one size at a time
        _RAW_BUFFERS[key] = torch.ones(numel, dtype=getattr(torch, dtype), device=device)
    group.broadcast(_RAW_BUFFERS[key], 0).wait()
