"""The weight sync's own parts, without Ray or vLLM: the bucket checksum at any byte offset and
length, a ZeRO-3 bucket sent in pieces over real gloo groups, and the sync group's timeout.
(tests/test_sync.py runs the whole push between real learners and engines.)"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlsys.actors import weight_sync
from rlsys.actors.weight_sync import (TensorMeta, adjacent_view, checksum, combined, free_port, make_group, partition,
                                      receive_buckets, send_buckets)

CPU = torch.device("cpu")


def by_hand(data: bytes, offset: int = 0) -> int:
    """The checksum's definition, one byte at a time: byte i weighs 256^((offset + i) % 8)."""
    return sum(b * 256 ** ((offset + i) % 8) for i, b in enumerate(data)) % 2**64


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_checksum_of_two_floats_worked_by_hand_at_an_aligned_and_an_unaligned_address():
    # 1.0f is 0x3F800000, -2.0f is 0xC0000000: little-endian, they make the one word 0xC0000000_3F800000.
    assert checksum(torch.tensor([1.0, -2.0])) == 0xC000_0000_3F80_0000
    shifted = torch.tensor([5.0, 1.0, -2.0])[1:]  # starts 4 bytes into its storage: not an int64 boundary
    assert shifted.storage_offset() * 4 % 8 == 4
    assert checksum(shifted) == 0xC000_0000_3F80_0000
    assert checksum(torch.tensor([1.0])) == 0x3F80_0000  # a lone partial word, padded with zeros
    assert checksum(torch.tensor([], dtype=torch.float32)) == 0


@pytest.mark.parametrize("start", [0, 1, 3, 7, 8, 11])
@pytest.mark.parametrize("size", [0, 1, 5, 7, 8, 9, 13, 684, 1001])
def test_checksum_of_a_byte_view_at_any_offset_and_length_follows_the_definition(start, size):
    buf = random_bytes(2048, seed=start * 10_000 + size)
    view = buf[start:start + size]
    assert checksum(view) == by_hand(bytes(view.tolist()))
    assert checksum(view) == checksum(view.clone())  # the same bytes at an aligned address


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("first", [1, 3, 7])
@pytest.mark.parametrize("numel", [1, 3, 171, 257])
def test_checksum_of_float_views_at_odd_element_offsets_is_that_of_their_bytes(dtype, first, numel):
    values = torch.randn(600, generator=torch.Generator().manual_seed(numel)).to(dtype)
    view = values[first:first + numel]
    data = bytes(view.clone().view(torch.uint8).tolist())
    assert len(data) == numel * view.element_size()
    assert checksum(view) == by_hand(data)


def test_checksum_across_many_chunks_of_the_unaligned_path(monkeypatch):
    """An unaligned view is copied through an aligned buffer a chunk at a time; 16-byte chunks
    make a 1001-byte view cross 63 of them."""
    monkeypatch.setattr(weight_sync, "CHECKSUM_CHUNK", 16)
    buf = random_bytes(1010, seed=1)
    for start in (1, 3, 5):
        view = buf[start:start + 1001]
        assert checksum(view) == by_hand(bytes(view.tolist()))
        assert checksum(view, offset=6) == by_hand(bytes(view.tolist()), offset=6)


def test_the_pieces_of_a_split_at_any_point_add_up_to_the_whole():
    whole = random_bytes(37, seed=2)
    for cut in range(0, 38):
        assert combined([checksum(whole[:cut]), checksum(whole[cut:], offset=cut)]) == checksum(whole), cut
    for a, b in [(1, 2), (3, 20), (7, 8), (5, 36)]:
        pieces = [checksum(whole[:a]), checksum(whole[a:b], offset=a), checksum(whole[b:], offset=b)]
        assert combined(pieces) == checksum(whole), (a, b)
    # offsets that are multiples of 8 change nothing: a split on word boundaries needs none
    assert combined([checksum(whole[:16]), checksum(whole[16:])]) == checksum(whole)


def test_a_single_changed_byte_changes_the_checksum():
    buf = random_bytes(1001, seed=3)
    view = buf[3:1000]  # unaligned, with a partial word at either end
    before = checksum(view)
    for at in (0, 1, 4, 5, 500, 995, 996):
        changed = view.clone()
        changed[at] ^= 1
        assert checksum(changed) != before, at
        changed[at] ^= 1
        assert checksum(changed) == before, at


def zero3_partitions(bucket: list[TensorMeta], whole: dict[str, torch.Tensor], shards: int,
                     lead: int) -> list[list[torch.Tensor]]:
    """What each ZeRO-3 rank holds of the bucket, as DeepSpeed lays it out: one flat buffer per
    rank, `lead` elements of earlier parameters, then rank r's partition of each parameter in turn
    (elements [r * p, (r + 1) * p) of it padded to shards * p; the padding here is -7)."""
    dtype = whole[bucket[0].name].dtype
    size = lead + sum(partition(m.numel, shards) for m in bucket)
    ranks = []
    for r in range(shards):
        flat = torch.full((size,), 99.0, dtype=dtype)
        views, at = [], lead
        for m in bucket:
            p = partition(m.numel, shards)
            padded = torch.cat([whole[m.name].reshape(-1), torch.full((p * shards - m.numel,), -7.0, dtype=dtype)])
            flat[at:at + p] = padded[r * p:(r + 1) * p]
            views.append(flat[at:at + p])
            at += p
        ranks.append(views)
    return ranks


@pytest.mark.parametrize("shards", [3, 12])
def test_a_zero3_bucket_sent_in_pieces_over_gloo_arrives_with_the_checksums_the_senders_computed(shards):
    """Each of `shards` ranks broadcasts its partition of every parameter (a view into its flat
    buffer at an odd byte offset; over 12 ranks the 2052-element parameter gives 684-byte pieces)
    to one receiver over a gloo group of its own; the receiver's combined checksum of each bucket
    equals the senders', and the parameters are put together exactly."""
    plan = [[TensorMeta("a", (2052,), "float32"), TensorMeta("b", (10,), "float32"), TensorMeta("c", (3, 19), "float32")],
            [TensorMeta("d", (7,), "bfloat16"), TensorMeta("e", (36, 57), "bfloat16"), TensorMeta("f", (1,), "bfloat16")]]
    gen = torch.Generator().manual_seed(shards)
    whole = {m.name: torch.randn(m.shape, generator=gen).to(getattr(torch, m.dtype)) for b in plan for m in b}
    per_bucket = [zero3_partitions(bucket, whole, shards, lead=5) for bucket in plan]  # [bucket][rank][param]
    if shards == 12:
        assert per_bucket[0][1][0].numel() * 4 == 684
    for ranks in per_bucket:
        for views in ranks:
            flat = adjacent_view(views, CPU)
            assert flat is not None and flat.storage_offset() * flat.element_size() % 8 != 0  # no copy, mid-word
    ports = [free_port() for _ in range(shards)]

    def send(r: int) -> list[int]:
        group = make_group("gloo", "127.0.0.1", ports[r], 0, 2, 60.0)
        return send_buckets(group, iter([per_bucket[b][r] for b in range(len(plan))]), CPU)

    def receive() -> tuple[list[int], dict[str, torch.Tensor]]:
        groups = [make_group("gloo", "127.0.0.1", port, 1, 2, 60.0) for port in ports]
        sums: list[int] = []
        got = {name: t.clone() for name, t in receive_buckets(groups, plan, CPU, sums, shards)}
        return sums, got

    with ThreadPoolExecutor(max_workers=shards + 1) as pool:
        sends = [pool.submit(send, r) for r in range(shards)]
        received = pool.submit(receive)
        sent = [s.result(timeout=120) for s in sends]  # [rank][bucket]
        sums, got = received.result(timeout=120)
    assert sums == [combined([sent[r][b] for r in range(shards)]) for b in range(len(plan))]
    assert sums[0] != sums[1]
    for name, t in whole.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("shards", [3, 12])
def test_a_bucket_checksummed_from_its_zero3_partitions_with_their_offsets_is_the_whole_buckets(shards):
    """The checksum's additivity applied to ZeRO-3's split: each parameter's partitions, padding
    cut off, checksummed where they lie in the whole bucket, add up to the whole bucket's."""
    bucket = [TensorMeta("a", (2052,), "float32"), TensorMeta("b", (10,), "float32"), TensorMeta("c", (57,), "float32")]
    gen = torch.Generator().manual_seed(7)
    whole = {m.name: torch.randn(m.shape, generator=gen) for m in bucket}
    ranks = zero3_partitions(bucket, whole, shards, lead=3)
    sums, start = [], 0  # start: the parameter's first byte in the whole bucket
    for i, m in enumerate(bucket):
        p = partition(m.numel, shards)
        for r in range(shards):
            real = max(0, min(p, m.numel - r * p))  # the last ranks hold padding only past the end
            sums.append(checksum(ranks[r][i][:real], offset=start + r * p * 4))
        start += m.numel * 4
    assert combined(sums) == checksum(torch.cat([whole[m.name] for m in bucket]))


def finish_within(seconds: float, call) -> tuple[BaseException | None, float]:
    """Run call() in a daemon thread; (what it raised, seconds it took). Fails the test if it
    is still running after `seconds` (a group without the timeout would wait 10 minutes)."""
    outcome: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test to assert on
            outcome["error"] = e
        outcome["took"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds}s"
    return outcome.get("error"), outcome["took"]


def test_a_broadcast_that_a_member_never_posts_fails_after_the_groups_timeout():
    """Two members, timeout 3 s: the receiver's broadcast raises after about 3 s when the sender
    never posts its side (the user's deadlines.sync_s, not a fixed 10 minutes)."""
    port, quiet = free_port(), threading.Event()

    def idle_sender() -> None:
        group = make_group("gloo", "127.0.0.1", port, 0, 2, 3.0)
        quiet.wait(60)  # a member of the group that never posts (and keeps the group, or its peer sees a reset)
        del group

    sender = threading.Thread(target=idle_sender, daemon=True)
    sender.start()
    group = make_group("gloo", "127.0.0.1", port, 1, 2, 3.0)
    error, took = finish_within(30, lambda: group.broadcast(torch.zeros(4), 0).wait())
    quiet.set()
    sender.join(10)
    assert isinstance(error, RuntimeError) and "timed out" in str(error).lower(), error
    assert 2.5 <= took <= 10, took


def test_a_rendezvous_that_a_member_never_joins_fails_after_the_groups_timeout():
    error, took = finish_within(30, lambda: make_group("gloo", "127.0.0.1", free_port(), 0, 2, 2.0))
    assert error is not None and "timed out" in str(error).lower(), error
    assert 1.5 <= took <= 10, took
