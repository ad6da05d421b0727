"""Head-sliced KV transfers (tensor parallelism with different degrees on the two sides): the
plan of who sends which heads to whom, head-sliced staging and wire fields, and real transfers
over gloo on CPU where several senders fill one receiver's heads, one sender's head slices fill
several receivers, and a failure of any part fails the whole request.

Senders and receivers run in this process (each pair still has its own gloo group and threads);
the killed-sender case uses the worker processes of kv_procs."""
from __future__ import annotations

import time
from datetime import timedelta

import msgpack
import pytest
import torch
import zmq
from torch.distributed import TCPStore

from kv_procs import SHAPE, Worker, make_cache
from tandem.kvtransfer import (
    HeadPart, KVReceiver, KVSender, KVTransferConfig, TransferError, plan_head_parts,
)
from tandem.kvtransfer.messages import Begin, MessageError, decode, encode
from tandem.kvtransfer.pair import SENDER_RANK, abort_group, make_pair_group, pair_prefix
from tandem.kvtransfer.staging import gather_layers, scatter_layers
from tandem.kvtransfer.tp_plan import parts_for_dst, parts_from_src
from tests.kvtransfer.test_transfer_processes import FAST

LAYERS, _, NUM_BLOCKS, BLOCK_SIZE, _, HEAD_DIM = SHAPE


def _shape(heads: int) -> tuple[int, ...]:
    return (LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, heads, HEAD_DIM)


def _tp_ranges(num_kv_heads: int, tp: int) -> list[tuple[int, int]]:
    """Each rank's global KV heads, as engine.tensor_parallel.head_shard lays them out."""
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [(r * per, (r + 1) * per) for r in range(tp)]
    replicas = tp // num_kv_heads
    return [(r // replicas, r // replicas + 1) for r in range(tp)]


# ---- the plan ---------------------------------------------------------------------------------

def _check_plan(src: list[tuple[int, int]], dst: list[tuple[int, int]], parts: list[HeadPart]) -> None:
    assert parts == sorted(parts, key=lambda p: (p.dst_rank, p.dst_heads))
    pairs = [(p.src_rank, p.dst_rank) for p in parts]
    assert len(pairs) == len(set(pairs)), "more than one part per (src rank, dst rank)"
    for dst_rank, (lo, hi) in enumerate(dst):
        ranges = parts_for_dst(parts, dst_rank)
        covered = [h for a, b in ranges for h in range(a, b)]
        assert covered == list(range(hi - lo)), (dst_rank, ranges)  # every head exactly once
    for p in parts:
        s_lo, s_hi = src[p.src_rank]
        d_lo, _ = dst[p.dst_rank]
        width = p.src_heads[1] - p.src_heads[0]
        assert width > 0 and width == p.dst_heads[1] - p.dst_heads[0]
        assert 0 <= p.src_heads[0] and s_lo + p.src_heads[1] <= s_hi  # local to the src rank
        assert s_lo + p.src_heads[0] == d_lo + p.dst_heads[0]          # the same global heads
    for src_rank in range(len(src)):
        assert parts_from_src(parts, src_rank) == [p for p in parts if p.src_rank == src_rank]


@pytest.mark.parametrize("heads, p, d, expected", [
    (8, 2, 1, [HeadPart(0, 0, (0, 4), (0, 4)), HeadPart(1, 0, (0, 4), (4, 8))]),
    (8, 1, 2, [HeadPart(0, 0, (0, 4), (0, 4)), HeadPart(0, 1, (4, 8), (0, 4))]),
    (8, 2, 2, [HeadPart(0, 0, (0, 4), (0, 4)), HeadPart(1, 1, (0, 4), (0, 4))]),
    (8, 4, 2, [HeadPart(0, 0, (0, 2), (0, 2)), HeadPart(1, 0, (0, 2), (2, 4)),
               HeadPart(2, 1, (0, 2), (0, 2)), HeadPart(3, 1, (0, 2), (2, 4))]),
    # K=2 over 4 prefill ranks: ranks 0,1 hold head 0, ranks 2,3 head 1 (replicas)
    (2, 4, 1, [HeadPart(0, 0, (0, 1), (0, 1)), HeadPart(2, 0, (0, 1), (1, 2))]),
    (2, 4, 2, [HeadPart(0, 0, (0, 1), (0, 1)), HeadPart(3, 1, (0, 1), (0, 1))]),
    # decode replicas: dst ranks 0,1 hold head 0, ranks 2,3 head 1; one prefill rank feeds all
    (2, 1, 4, [HeadPart(0, 0, (0, 1), (0, 1)), HeadPart(0, 1, (0, 1), (0, 1)),
               HeadPart(0, 2, (1, 2), (0, 1)), HeadPart(0, 3, (1, 2), (0, 1))]),
])
def test_plan_covers_every_dst_head_once(heads, p, d, expected):
    src, dst = _tp_ranges(heads, p), _tp_ranges(heads, d)
    parts = plan_head_parts(src, dst)
    _check_plan(src, dst, parts)
    assert parts == expected


def test_plan_spreads_dst_ranks_over_replicas():
    # K=1 replicated on both sides: each decode rank reads its own prefill replica
    parts = plan_head_parts(_tp_ranges(1, 2), _tp_ranges(1, 2))
    assert [(p.src_rank, p.dst_rank) for p in parts] == [(0, 0), (1, 1)]
    # K=2, p=4, d=4: the two decode ranks holding a head read different replicas of it
    parts = plan_head_parts(_tp_ranges(2, 4), _tp_ranges(2, 4))
    _check_plan(_tp_ranges(2, 4), _tp_ranges(2, 4), parts)
    assert sorted(p.src_rank for p in parts) == [0, 1, 2, 3]
    # K=1, p=4, d=8: every replica serves two decode ranks
    parts = plan_head_parts(_tp_ranges(1, 4), _tp_ranges(1, 8))
    assert [sum(p.src_rank == r for p in parts) for r in range(4)] == [2, 2, 2, 2]
    # deterministic: both groups compute the same plan from the same ranges
    assert plan_head_parts(_tp_ranges(1, 4), _tp_ranges(1, 8)) == parts


def test_plan_rejects_a_head_no_src_rank_holds_and_bad_ranges():
    with pytest.raises(ValueError, match="KV head 4 of dst rank 1"):
        plan_head_parts([(0, 4)], [(0, 4), (4, 8)])
    with pytest.raises(ValueError, match="KV head 2 of dst rank 0"):
        plan_head_parts([(0, 2), (3, 4)], [(0, 4)])
    for bad in ([(2, 2)], [(-1, 1)], [(0, 1.5)], [], "01", [(0, 1, 2)], [(True, 2)]):
        with pytest.raises(ValueError, match="src_kv_heads"):
            plan_head_parts(bad, [(0, 1)])


# ---- staging and wire -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_head_slice_staging_moves_only_those_heads_of_those_blocks(dtype):
    src = make_cache(1, (3, 2, 10, 4, 4, 3), dtype)
    dst = make_cache(2, (3, 2, 10, 4, 4, 3), dtype)
    def bits(t: torch.Tensor) -> torch.Tensor:  # compare FP8 as bytes
        return t.view(torch.uint8) if t.element_size() == 1 else t
    expected = bits(dst).clone()
    src_ids, dst_ids = torch.tensor([7, 1, 7]), torch.tensor([0, 9, 5])
    staging = gather_layers(src, 1, 3, src_ids, (1, 3))
    assert staging.shape == (2, 2, 3, 4, 2, 3) and staging.is_contiguous() and staging.dtype == dtype
    assert torch.equal(bits(staging), bits(src)[1:3][:, :, src_ids, :, 1:3])
    scatter_layers(staging, dst, 1, 3, dst_ids, (2, 4))
    expected[1:3, :, dst_ids, :, 2:4] = bits(src)[1:3][:, :, src_ids, :, 1:3]
    assert torch.equal(bits(dst), expected)  # nothing outside layers 1-2, those blocks, heads 2-3
    # all heads named explicitly is the fast path, the same bytes
    assert torch.equal(bits(gather_layers(src, 0, 3, src_ids, (0, 4))), bits(gather_layers(src, 0, 3, src_ids)))


def test_begin_head_start_on_the_wire():
    msg = Begin("r", 0, [1, 2], 4, "float32", [4, 2, 8], [], 6)
    assert decode(encode(msg)) == msg
    full = Begin("r", 0, [1, 2], 4, "float32", [4, 4, 8])
    # at its default the field is left out, so a receiver that predates it still reads the Begin
    assert "head_start" not in msgpack.unpackb(encode(full), raw=False)
    body = {"type": "begin", "request_id": "r", "epoch": 0, "dst_block_ids": [1], "num_layers": 1,
            "dtype": "float32", "block_shape": [1, 1, 1]}
    assert decode(msgpack.packb(body, use_bin_type=True)).head_start == 0  # an older sender
    for bad in (-1, True, 1.0, 1 << 21):
        with pytest.raises(MessageError, match="head_start"):
            decode(msgpack.packb({**body, "head_start": bad}, use_bin_type=True))


# ---- transfers (in-process senders and receivers, gloo pairs) ----------------------------------

@pytest.fixture
def kv():
    made: list = []

    def make(kind: str, heads: int, seed: int, **config):
        cls = KVReceiver if kind == "receiver" else KVSender
        worker = cls(make_cache(seed, _shape(heads)),
                     KVTransferConfig(**{**FAST, "min_message_bytes": 0, **config}))
        made.append(worker)
        return worker
    yield make
    for worker in sorted(made, key=lambda w: isinstance(w, KVReceiver)):  # senders first
        worker.close()


def _stream(session, groups) -> None:
    for start, end in groups:
        session.send_layers(start, end)


def _refusal(session) -> TransferError:
    """Streams all layers (what a sender does before the refusal arrives: the receiver drains
    them and drops them) and returns how the session failed."""
    try:
        _stream(session, [(0, 2), (2, LAYERS)])
        session.finish(10)
    except TransferError as exc:
        return exc
    raise AssertionError("the session succeeded")


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_expect_rejects_bad_head_ranges(kv):
    receiver = kv("receiver", 4, seed=1)
    bad = [
        ([], "must not be empty"),
        ([(0, 2)], "cover \\[0, 4\\) exactly"),
        ([(0, 2), (3, 4)], "heads \\[2, 3\\) are in no range"),
        ([(0, 3), (2, 4)], "sorted and disjoint"),
        ([(2, 4), (0, 2)], "sorted and disjoint"),
        ([(0, 2), (2, 2), (2, 4)], "is empty"),
        ([(0, 2), (2, 5)], "cover \\[0, 4\\) exactly"),
        ([(-1, 4)], "outside"),
        ([(0, 4.0)], "pairs of ints"),
        ([(0, 1, 4)], "pairs of ints"),
        ("04", "sequence"),
    ]
    for ranges, says in bad:
        with pytest.raises(ValueError, match=says):
            receiver.expect("r", [1], LAYERS, head_ranges=ranges)
    # nothing was registered by the failed calls
    handle = receiver.expect("r", [1], LAYERS, head_ranges=[(0, 1), (1, 4)])
    assert handle.head_ranges == [(0, 1), (1, 4)]
    assert receiver.expect("whole", [2], LAYERS).head_ranges == [(0, 4)]


def test_begin_validates_head_slices(kv):
    sender = kv("sender", 4, seed=1)
    peer = "tcp://127.0.0.1:1"  # never dialled: validation comes first
    for heads in ((0, 5), (2, 2), (-1, 2), (3, 1), (0,), (0, 1.0), (True, 2), "01"):
        with pytest.raises(ValueError, match="src_heads"):
            sender.begin("r", peer, [0], [0], src_heads=heads)
    for start in (-1, 1.0, True, (1 << 20) + 1):
        with pytest.raises(ValueError, match="dst_head_start"):
            sender.begin("r", peer, [0], [0], src_heads=(0, 2), dst_head_start=start)
    # sizing uses the slice: one layer of two heads fits where one layer of all four does not
    one_layer_of_two_heads = 2 * 1 * BLOCK_SIZE * 2 * HEAD_DIM * 4
    small = kv("sender", 4, seed=2, max_message_bytes=one_layer_of_two_heads)
    with pytest.raises(ValueError, match="above max_message_bytes"):
        small.begin("r", peer, [0], [0])
    with pytest.raises(ValueError, match="above max_message_bytes"):
        small.begin("r", peer, [0], [0], src_heads=(0, 3))


@pytest.mark.timeout(60)
def test_two_senders_each_holding_half_the_heads_fill_one_receiver(kv):
    receiver = kv("receiver", 4, seed=10)
    senders = [kv("sender", 2, seed=11), kv("sender", 2, seed=12)]
    initial = receiver.kv_cache.clone()
    src = [[3, 0, 17], [5, 6, 7]]
    dst = [11, 20, 2]
    handle = receiver.expect("r", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])

    # the first part lands completely: its sender is done, the request still waits for heads 2-3
    first = senders[0].begin("r", receiver.address, src[0], dst)  # all its heads, at head 0
    _stream(first, [(0, 1), (1, 4)])
    first.finish(10)
    assert not handle.done() and handle.layers_received == 0
    second = senders[1].begin("r", receiver.address, src[1], dst, dst_head_start=2)
    _stream(second, [(0, 3), (3, 4)])
    second.finish(10)
    handle.wait(10)
    assert handle.layers_received == LAYERS

    expected = initial.clone()
    expected[:, :, dst, :, 0:2] = senders[0].kv_cache[:, :, src[0]]
    expected[:, :, dst, :, 2:4] = senders[1].kv_cache[:, :, src[1]]
    assert torch.equal(receiver.kv_cache, expected)  # bit-exact; every other block untouched
    part_bytes = LAYERS * 2 * len(dst) * BLOCK_SIZE * 2 * HEAD_DIM * 4
    for sender in senders:  # one message per layer group (min_message_bytes=0)
        m = sender.metrics()
        assert (m.messages_sent, m.bytes_sent, m.transfers_ok) == (2, part_bytes, 1)
    m = receiver.metrics()
    assert (m.messages_received, m.bytes_received, m.transfers_ok) == (4, 2 * part_bytes, 1)
    # the blocks are free again for the next request
    receiver.expect("again", dst, LAYERS)


@pytest.mark.timeout(60)
def test_a_part_delivered_in_full_survives_its_sender_going_away(kv):
    receiver = kv("receiver", 4, seed=15, heartbeat_s=0.1, peer_timeout_s=0.5)
    early, late = kv("sender", 2, seed=16), kv("sender", 2, seed=17)
    dst = [3, 4]
    handle = receiver.expect("r", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])
    early.send("r", receiver.address, [1, 2], dst)
    early.close()  # e.g. the prefill rank restarts once its part is acknowledged
    _wait_until(lambda: receiver.metrics().pairs_broken == 1, 10, "the silent sender's pair was kept")
    assert not handle.done()  # its heads are all here: the request does not need that pair
    late.send("r", receiver.address, [5, 6], dst, dst_head_start=2)
    handle.wait(10)
    assert torch.equal(receiver.kv_cache[:, :, dst, :, 0:2], early.kv_cache[:, :, [1, 2]])
    assert torch.equal(receiver.kv_cache[:, :, dst, :, 2:4], late.kv_cache[:, :, [5, 6]])


@pytest.mark.timeout(60)
def test_one_sender_fills_two_receivers_with_head_slices(kv):
    # messages are coalesced by the slice's bytes: two layers of two heads per message
    two_layers = 2 * 2 * 2 * BLOCK_SIZE * 2 * HEAD_DIM * 4  # layers, K/V, blocks, bs, heads, D, fp32
    sender = kv("sender", 4, seed=20, min_message_bytes=two_layers, max_message_bytes=two_layers)
    receivers = [kv("receiver", 2, seed=21), kv("receiver", 2, seed=22)]
    initial = [r.kv_cache.clone() for r in receivers]
    src, dst = [9, 4], [[1, 2], [23, 0]]
    handles = [r.expect("r", d, LAYERS) for r, d in zip(receivers, dst)]  # the same request id
    sessions = [sender.begin("r", r.address, src, d, src_heads=heads)
                for r, d, heads in zip(receivers, dst, [(0, 2), (2, 4)])]
    for layer in range(LAYERS):  # as a prefill computes them
        for session in sessions:
            session.send_layers(layer, layer + 1)
    for session, handle in zip(sessions, handles):
        session.finish(10)
        handle.wait(10)
    for i, receiver in enumerate(receivers):
        expected = initial[i].clone()
        expected[:, :, dst[i]] = sender.kv_cache[:, :, src, :, 2 * i:2 * i + 2]
        assert torch.equal(receiver.kv_cache, expected)
        assert receiver.metrics().messages_received == 2  # 4 layer groups, 2 layers a message
    assert sender.metrics().messages_sent == 4 and sender.metrics().transfers_ok == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("num_kv_heads, p, d", [(1, 2, 2), (2, 4, 2), (4, 2, 4)])
def test_a_run_planned_by_plan_head_parts(kv, num_kv_heads, p, d):
    src_ranges, dst_ranges = _tp_ranges(num_kv_heads, p), _tp_ranges(num_kv_heads, d)
    parts = plan_head_parts(src_ranges, dst_ranges)
    # the model's KV for the request; a prefill rank's cache holds its heads of it (replicas alike)
    model = make_cache(30, _shape(num_kv_heads))
    senders = []
    for lo, hi in src_ranges:
        sender = kv("sender", hi - lo, seed=31)
        sender.kv_cache.copy_(model[..., lo:hi, :])
        senders.append(sender)
    receivers = [kv("receiver", hi - lo, seed=40 + r) for r, (lo, hi) in enumerate(dst_ranges)]
    initial = [r.kv_cache.clone() for r in receivers]
    src, dst = [2, 13, 5], [7, 3, 19]
    handles = [receiver.expect("req", dst, LAYERS, head_ranges=parts_for_dst(parts, rank))
               for rank, receiver in enumerate(receivers)]
    sessions = [senders[part.src_rank].begin("req", receivers[part.dst_rank].address, src, dst,
                                             src_heads=part.src_heads, dst_head_start=part.dst_heads[0])
                for part in parts]
    for start, end in [(0, 1), (1, 2), (2, 4)]:
        for session in sessions:
            session.send_layers(start, end)
    for session in sessions:
        session.finish(10)
    for handle in handles:
        handle.wait(10)
    for rank, (lo, hi) in enumerate(dst_ranges):
        expected = initial[rank].clone()
        expected[:, :, dst] = model[:, :, src, :, lo:hi]
        assert torch.equal(receivers[rank].kv_cache, expected), rank
        assert receivers[rank].metrics().messages_received == 3 * len(parts_for_dst(parts, rank))
    for rank, sender in enumerate(senders):  # exactly the planned ranks sent, once per part
        assert sender.metrics().transfers_ok == len(parts_from_src(parts, rank))
        assert sender.metrics().messages_sent == 3 * len(parts_from_src(parts, rank))


@pytest.mark.timeout(60)
def test_begin_naming_no_part_or_a_wrong_width_fails_that_session_and_writes_nothing(kv):
    receiver = kv("receiver", 4, seed=50)
    initial = receiver.kv_cache.clone()
    half = [kv("sender", 2, seed=51), kv("sender", 2, seed=52)]
    whole = kv("sender", 4, seed=53)
    dst = [4, 8]
    handle = receiver.expect("r", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])
    attempts = [  # (sender, begin's head keywords, what the refusal says)
        (half[0], {"dst_head_start": 1}, "head_start 1 names no part"),
        (half[0], {"dst_head_start": 4}, "head_start 4 names no part"),
        (whole, {}, "4 heads sent for part [0, 2)"),
        (whole, {"src_heads": (0, 3), "dst_head_start": 0}, "3 heads sent for part [0, 2)"),
        (whole, {"src_heads": (3, 4), "dst_head_start": 2}, "1 heads sent for part [2, 4)"),
    ]
    for sender, heads, says in attempts:
        session = sender.begin("r", receiver.address, [0, 1], dst, **heads)
        error = _refusal(session)
        assert "begin rejected" in str(error) and says in str(error), str(error)
    assert torch.equal(receiver.kv_cache, initial)
    assert not handle.done()

    # a part already bound to a session cannot be taken by another
    first = whole.begin("r", receiver.address, [0, 1], dst, src_heads=(2, 4), dst_head_start=0)
    first.send_layers(0, 1)
    _wait_until(lambda: receiver.kv_cache[0, :, dst, :, 0:2].ne(initial[0, :, dst, :, 0:2]).any(), 10,
                "the first layer of part [0, 2) did not land")
    rival = half[0].begin("r", receiver.address, [0, 1], dst)
    assert "already being sent" in str(_refusal(rival))
    # the request is still intact and completes from the bound session and the other part's sender
    first.send_layers(1, LAYERS)
    second = half[1].send("r", receiver.address, [6, 7], dst, dst_head_start=2)
    first.finish(10)
    handle.wait(10)
    assert second is None
    expected = initial.clone()
    expected[:, :, dst, :, 0:2] = whole.kv_cache[:, :, [0, 1], :, 2:4]
    expected[:, :, dst, :, 2:4] = half[1].kv_cache[:, :, [6, 7]]
    assert torch.equal(receiver.kv_cache, expected)


@pytest.mark.timeout(60)
def test_one_part_cancelled_fails_the_whole_request_and_tells_the_other_sender(kv):
    receiver = kv("receiver", 4, seed=60)
    a, b = kv("sender", 2, seed=61), kv("sender", 2, seed=62)
    dst = [1, 2]
    handle = receiver.expect("r", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])
    session_a = a.begin("r", receiver.address, [3, 4], dst)
    session_b = b.begin("r", receiver.address, [5, 6], dst, dst_head_start=2)
    session_a.send_layers(0, 1)
    session_b.send_layers(0, 1)
    _wait_until(lambda: handle.layers_received == 1, 10, "layer 0 did not land in both parts")
    session_a.abort("prefill rank 0 failed")
    with pytest.raises(TransferError, match="sender cancelled: prefill rank 0 failed"):
        handle.wait(10)
    _wait_until(session_b.done, 10, "the other part's sender was not told")
    assert "receiver: sender cancelled" in str(session_b.error)
    with pytest.raises(TransferError):
        session_b.send_layers(1, LAYERS)
    landed = receiver.kv_cache.clone()
    time.sleep(0.2)
    assert torch.equal(receiver.kv_cache, landed)  # nothing more written after the failure
    assert receiver.metrics().transfers_failed == 1
    # the blocks are free: a fresh request into them completes
    handle = receiver.expect("r2", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])
    b.send("r2", receiver.address, [5, 6], dst, dst_head_start=2)
    a.send("r2", receiver.address, [3, 4], dst)
    handle.wait(10)
    assert torch.equal(receiver.kv_cache[:, :, dst], torch.cat(
        [a.kv_cache[:, :, [3, 4]], b.kv_cache[:, :, [5, 6]]], dim=4))


@pytest.fixture
def procs():
    started: list[Worker] = []

    def start(role: str, seed: int, **kwargs) -> Worker:
        worker = Worker(role, seed, **{**FAST, "min_message_bytes": 0, **kwargs})
        started.append(worker)
        return worker
    yield start
    for worker in started:
        worker.stop()


@pytest.mark.timeout(90)
def test_a_killed_part_sender_fails_the_whole_request_and_the_other_sender_learns_it(kv, procs):
    receiver = kv("receiver", 4, seed=70)
    survivor = kv("sender", 2, seed=71)
    doomed = procs("sender", seed=72)  # its own process; a cache of SHAPE's 2 heads, sent to heads 0-1
    initial = receiver.kv_cache.clone()
    dst = [10, 11]
    handle = receiver.expect("r", dst, LAYERS, head_ranges=[(0, 2), (2, 4)])
    session = survivor.begin("r", receiver.address, [0, 1], dst, dst_head_start=2)
    session.send_layers(0, 1)
    # one layer, then a long "prefill" pause during which the process is killed
    doomed.call("send", "r", receiver.address, [2, 3], dst, [(0, 1), (1, 2), (2, 3), (3, 4)], 30.0)
    _wait_until(lambda: handle.layers_received == 1, 15, "layer 0 did not land in both parts")
    doomed.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as info:
        handle.wait(20)
    assert time.monotonic() - t0 < FAST["peer_timeout_s"] + 2.0, str(info.value)
    assert "silent" in str(info.value) or "failed" in str(info.value)
    _wait_until(session.done, 10, "the surviving part's sender was not told")
    assert "receiver:" in str(session.error)
    landed = receiver.kv_cache
    assert torch.equal(landed[1:], initial[1:])  # only layer 0 had landed
    assert torch.equal(landed[0, :, dst, :, 2:4], survivor.kv_cache[0, :, [0, 1]])


@pytest.mark.timeout(30)
def test_chunks_of_a_rejected_session_get_no_reply_a_retry_could_mistake(kv):
    """Replies name only the request: after a part's Begin was refused, the chunks its sender had
    already streamed are drained without replies, so none can fail that sender's next try. The
    sender here is a raw control socket with its own pair group, to see every reply."""
    receiver = kv("receiver", 4, seed=80)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"raw-peer")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(receiver.address)
    group = None

    def send(body: dict) -> None:
        sock.send(msgpack.packb(body, use_bin_type=True))

    def reply(timeout_ms: int) -> dict | None:
        return msgpack.unpackb(sock.recv(), raw=False) if sock.poll(timeout_ms) else None

    try:
        send({"type": "hello", "sender_id": "raw-peer", "version": 1})
        welcome = reply(5000)
        epoch = welcome["epoch"]
        store = TCPStore("127.0.0.1", welcome["store_port"], is_master=False, timeout=timedelta(seconds=5))
        group = make_pair_group(store, pair_prefix("raw-peer", welcome["receiver_id"], epoch), SENDER_RANK,
                                torch.device("cpu"), 5.0)
        receiver.expect("r", [1], LAYERS, head_ranges=[(0, 2), (2, 4)])
        send({"type": "begin", "request_id": "r", "epoch": epoch, "dst_block_ids": [1],
              "num_layers": LAYERS, "dtype": "float32", "block_shape": [BLOCK_SIZE, 2, HEAD_DIM],
              "head_start": 1})
        refusal = reply(5000)
        assert refusal["type"] == "error" and "names no part" in refusal["reason"]
        data = torch.ones(1, 2, 1, BLOCK_SIZE, 2, HEAD_DIM)
        chunk = {"type": "chunk", "request_id": "r", "epoch": epoch, "layer_start": 0, "layer_end": 1,
                 "nbytes": data.numel() * 4, "dtype": "float32", "shape": list(data.shape)}
        send({**chunk, "seq": 0})
        group.send([data], 1, 0).wait()
        assert reply(300) is None  # drained silently: the refusal already said it
        send({**chunk, "seq": 1, "request_id": "never-begun"})
        group.send([data], 1, 1).wait()
        assert "chunk rejected" in reply(5000)["reason"]  # a request it was not told of
        deadline = time.monotonic() + 5  # the pair thread counts a message after its recv completed
        while receiver.metrics().messages_received < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert receiver.metrics().rejected_messages == 3 and receiver.metrics().messages_received == 2
        assert not receiver.kv_cache.eq(1).all(dim=-1).any()  # the drained bytes went nowhere
    finally:
        abort_group(group)
        sock.close(0)
        ctx.term()
