"""The weights-by-handle transport (rlsys/actors/shared_weights.py) between real processes: a
learner's shared buffer mapped by another process, the bucket layout and checksums, ZeRO-3 pieces,
what a mapping keeps and when a buffer is gone. (tests/test_sync.py pushes by handle between real
learners and vLLM engines and compares every served weight.)"""

from __future__ import annotations

import doctest
import multiprocessing as mp
import os

import pytest
import torch

from rlsys.actors import shared_weights
from rlsys.actors.shared_weights import Mapped, Shares, SharedBuffer, layout, open_shared
from rlsys.actors.weight_sync import TensorMeta, checksum, partition, plan_buckets

CPU = torch.device("cpu")


def test_doctests():
    assert doctest.testmod(shared_weights).failed == 0


def _read_and_write(handle: list, queue) -> None:
    """In another process: the bytes behind the handle, then write 7 into the first byte."""
    t = open_shared(handle)
    queue.put(bytes(t[:16].tolist()))
    t[0] = 7


def test_a_buffer_is_the_same_memory_in_another_process():
    buf = SharedBuffer(1 << 20, CPU)
    buf.tensor[:16] = torch.arange(16, dtype=torch.uint8)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_read_and_write, args=(buf.handle, queue))
    p.start()
    seen = queue.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert seen == bytes(range(16))
    assert int(buf.tensor[0]) == 7, "the other process wrote into a copy, not the shared buffer"


def _make_buffer(out, hold) -> None:
    buf = SharedBuffer(4096, CPU)
    buf.tensor.fill_(1)
    out.put(buf.handle)
    hold.get()  # held until the test has mapped it; then the process ends without closing anything


def test_a_buffer_dies_with_its_process_and_leaves_nothing_in_dev_shm():
    before = os.listdir("/dev/shm")
    ctx = mp.get_context("spawn")
    out, hold = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_make_buffer, args=(out, hold))
    p.start()
    handle = out.get(timeout=60)
    mapped = open_shared(handle)
    assert int(mapped.sum()) == 4096
    hold.put(None)
    p.join(60)
    assert p.exitcode == 0
    assert int(mapped.sum()) == 4096, "a mapping made while the learner lived stays valid"
    with pytest.raises(RuntimeError, match=r"cannot map the learner's buffer /proc/\d+/fd/\d+.*sync_by_handle=false"):
        open_shared(handle)
    # (the test's own multiprocessing queues keep semaphores there, sem.*, until they are collected)
    assert {f for f in os.listdir("/dev/shm") if not f.startswith("sem.")} == {f for f in before if not f.startswith("sem.")}


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(50, 8, generator=g), "w1": torch.randn(8, 3, generator=g),
            "b1": torch.randn(3, generator=g), "w2": torch.randn(7, 5, generator=g).to(torch.bfloat16),
            "odd": torch.randn(13, generator=g).to(torch.bfloat16)}


def plan_of(tensors: dict[str, torch.Tensor], bucket_bytes: int):
    metas = [TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]
    return plan_buckets(metas, bucket_bytes)


@pytest.mark.parametrize("senders", [1, 2, 3])
def test_buckets_shared_by_each_sender_come_back_whole_with_the_checksums_sent(senders):
    tensors = model_tensors()
    plan = plan_of(tensors, 60)
    assert len(plan) == 5  # one tensor a bucket: senders own different buckets, of both dtypes
    shares, sent = [], {}
    ranks = [Shares() for _ in range(senders)]  # each rank keeps its buffer (a dropped one is closed)
    for rank in range(senders):
        mine = [i for i in range(len(plan)) if i % senders == rank]  # weight_sync.owners
        share = ranks[rank].share(plan, mine, iter([[tensors[m.name] for m in plan[i]] for i in mine]), CPU)
        assert [i for i, _, _ in share["buckets"]] == mine
        for i, offset, c in share["buckets"]:
            assert offset % 64 == 0
            sent[i] = c
        shares.append(share)
    got, sums = {}, []
    for name, t in Mapped().buckets(shares, plan, sums):
        got[name] = t.clone()
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    # each checksum that of the bucket's bytes, as the collective path computes it
    assert sums == [sent[i] for i in range(len(plan))]
    assert sums == [checksum(torch.cat([tensors[m.name].reshape(-1) for m in b])) for b in plan]


def test_zero3_pieces_shared_by_every_rank_are_put_together_on_the_engine():
    tensors = {k: v for k, v in model_tensors().items() if v.dtype == torch.float32}
    plan = plan_of(tensors, 300)
    ranks = 3
    shares, holders = [], [Shares() for _ in range(ranks)]
    for r in range(ranks):  # rank r holds elements [r p, (r + 1) p) of each parameter, the last padded
        pieces = []
        for bucket in plan:
            bucket_pieces = []
            for m in bucket:
                p = partition(m.numel, ranks)
                flat = torch.cat([tensors[m.name].reshape(-1), torch.full((p * ranks - m.numel,), -1.0)])
                bucket_pieces.append(flat[r * p:(r + 1) * p])
            pieces.append(bucket_pieces)
        shares.append(holders[r].share(plan, list(range(len(plan))), iter(pieces), CPU, shards=ranks))
    got = {name: t.clone() for name, t in Mapped().buckets(shares, plan, shards=ranks)}
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_a_mapping_is_kept_while_the_buffer_stays_and_dropped_when_it_is_replaced():
    tensors = model_tensors()
    plan = plan_of(tensors, 1 << 20)
    rank = Shares()

    def share(src):
        return rank.share(plan, list(range(len(plan))), iter([[src[m.name] for m in b] for b in plan]), CPU)

    mapped = Mapped()
    first = share(tensors)
    [a] = mapped.open([first])
    again = share(model_tensors(seed=1))  # the next push: same buffer, new contents
    assert again["handle"] == first["handle"]
    [b] = mapped.open([again])
    assert b.data_ptr() == a.data_ptr(), "the same buffer was mapped twice"
    got = dict(mapped.buckets([again], plan))
    assert torch.equal(got["embed"], model_tensors(seed=1)["embed"]), "the kept mapping does not see the new push"
    bigger = dict(tensors, extra=torch.zeros(1000))
    plan = plan_of(bigger, 1 << 20)
    grown = share(bigger)  # outgrows the buffer: a new one, a new token
    assert grown["handle"][1] != first["handle"][1]
    mapped.open([grown])
    assert list(mapped.buffers) == [grown["handle"][1]], "the replaced buffer's mapping is kept"


def test_a_bucket_past_the_end_of_the_buffer_is_refused():
    tensors = model_tensors()
    plan = plan_of(tensors, 1 << 20)
    rank = Shares()
    share = rank.share(plan, [0], iter([[tensors[m.name] for m in plan[0]]]), CPU)
    share["buckets"] = [[0, share["handle"][2] - 8, share["buckets"][0][2]]]  # a place the buffer does not have
    with pytest.raises(AssertionError, match="past the end"):
        list(Mapped().buckets([share], plan))


def test_layout_puts_each_bucket_on_its_own_cache_line():
    plan = plan_of(model_tensors(), 100)
    offsets, size = layout(plan, list(range(len(plan))))
    ends = [offsets[i] + sum(m.numel for m in b) * (2 if b[0].dtype == "bfloat16" else 4) for i, b in enumerate(plan)]
    assert all(o % 64 == 0 for o in offsets.values())
    assert all(ends[i] <= offsets[i + 1] for i in range(len(plan) - 1)) and size == ends[-1]
