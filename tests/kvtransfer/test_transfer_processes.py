"""KV transfer between real separate processes over gloo: bit-exact delivery, streaming,
concurrency, a killed sender, late joiners, malformed control messages."""
from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq

from kv_procs import SHAPE, Worker

FAST = dict(timeout_s=6.0, connect_timeout_s=6.0, heartbeat_s=0.2, peer_timeout_s=1.5)


def _expect_copy(expected: torch.Tensor, sender_cache: torch.Tensor, src, dst, num_layers=None):
    layers = slice(0, num_layers)
    expected[layers, :, dst] = sender_cache[layers, :, src]


@pytest.fixture
def workers():
    started: list[Worker] = []

    def start(role: str, seed: int, **kwargs) -> Worker:
        worker = Worker(role, seed, **{**FAST, **kwargs})
        started.append(worker)
        return worker
    yield start
    for worker in started:
        worker.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_streamed_blocks_land_bit_exact_in_other_block_ids(workers, dtype):
    receiver = workers("receiver", seed=1, dtype=dtype, min_message_bytes=0)
    sender = workers("sender", seed=2, dtype=dtype, min_message_bytes=0)
    expected = receiver.initial_cache()
    src_cache = sender.initial_cache()

    # layer by layer, one message per layer
    src, dst = [3, 0, 17, 9], [11, 20, 2, 5]
    assert receiver.call("expect", "stream", dst, 4) == "ok"
    sender.call("send", "stream", receiver.address, src, dst, [(0, 1), (1, 2), (2, 3), (3, 4)], 0.05)
    result = sender.call("join", "stream", 20)
    assert result[0] == "ok", result
    assert receiver.call("wait", "stream", 10)[0] == "ok"
    _expect_copy(expected, src_cache, src, dst)

    # uneven layer groups, one block
    assert receiver.call("expect", "uneven", [23], 4) == "ok"
    sender.call("send", "uneven", receiver.address, [21], [23], [(0, 3), (3, 4)], 0.0)
    assert sender.call("join", "uneven", 20)[0] == "ok"
    assert receiver.call("wait", "uneven", 10)[0] == "ok"
    _expect_copy(expected, src_cache, [21], [23])

    got = receiver.call("cache")
    assert got.dtype == dtype
    assert torch.equal(got, expected)  # copied blocks bit-exact, every other block untouched
    metrics = receiver.call("metrics")
    layer_bytes = 2 * 4 * 2 * 8 * got.element_size()  # K+V of one block of one layer
    assert metrics["bytes_received"] == layer_bytes * 4 * (4 + 1)
    assert metrics["transfers_ok"] == 2 and metrics["transfers_failed"] == 0
    assert metrics["messages_received"] == 4 + 2
    sent = sender.call("metrics")
    assert sent["bytes_sent"] == metrics["bytes_received"] and sent["transfers_ok"] == 2


@pytest.mark.timeout(60)
def test_fp8_blocks_need_the_same_dtype_and_scales_on_both_sides(workers):
    fp8 = torch.float8_e4m3fn
    scales = [0.5, 2.0] * SHAPE[0]
    receiver = workers("receiver", seed=1, dtype=fp8, kv_scales=scales, min_message_bytes=0)
    expected = receiver.initial_cache()
    cases = [  # (sender's dtype, sender's scales, what the refusal says)
        (fp8, [], "KV cache scales differ"),             # all 1.0
        (fp8, [0.5, 2.0] * (SHAPE[0] - 1) + [0.5, 4.0], "KV cache scales differ"),
        (torch.bfloat16, [], "layout bfloat16"),
    ]
    for i, (dtype, sender_scales, says) in enumerate(cases):
        sender = workers("sender", seed=2, dtype=dtype, kv_scales=sender_scales, min_message_bytes=0)
        assert receiver.call("expect", f"bad{i}", [1, 2], 4) == "ok"
        sender.call("send", f"bad{i}", receiver.address, [3, 4], [1, 2], [(0, 4)], 0.0)
        result = sender.call("join", f"bad{i}", 20)
        assert result[0] == "error" and says in result[1], result
        receiver.call("abort", f"bad{i}")
    # The same dtype and scales: delivered byte for byte.
    sender = workers("sender", seed=2, dtype=fp8, kv_scales=scales, min_message_bytes=0)
    assert receiver.call("expect", "good", [5, 6], 4) == "ok"
    sender.call("send", "good", receiver.address, [3, 4], [5, 6], [(0, 2), (2, 4)], 0.0)
    assert sender.call("join", "good", 20)[0] == "ok"
    assert receiver.call("wait", "good", 10)[0] == "ok"
    _expect_copy(expected, sender.initial_cache(), [3, 4], [5, 6])
    got = receiver.call("cache")
    assert got.dtype == fp8 and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_kv_scales_are_checked_at_construction():
    from tandem.kvtransfer import KVReceiver, KVSender

    cache = torch.zeros(SHAPE, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="finite positive"):
        KVSender(cache, kv_scales=[1.0])
    with pytest.raises(ValueError, match="finite positive"):
        KVSender(cache, kv_scales=[1.0, -1.0] * SHAPE[0])
    with pytest.raises(ValueError, match="only for an FP8 cache"):
        KVReceiver(torch.zeros(SHAPE), kv_scales=[1.0, 1.0] * SHAPE[0])


@pytest.mark.timeout(90)
def test_many_concurrent_requests_between_two_senders_and_two_receivers(workers):
    receivers = [workers("receiver", seed=10 + i) for i in range(2)]
    senders = [workers("sender", seed=20 + i, min_message_bytes=0) for i in range(2)]
    expected = [r.initial_cache() for r in receivers]
    per_pair = 5
    jobs = []
    # every receiver hands out disjoint dst blocks; all requests are in flight at once
    for r_index, receiver in enumerate(receivers):
        free = list(range(24))[::-1]
        for s_index, sender in enumerate(senders):
            for k in range(per_pair):
                rid = f"r{r_index}-s{s_index}-{k}"
                dst = [free.pop(), free.pop()]
                src = [(7 * k + s_index) % 24, (5 * k + 3 + r_index) % 24]
                assert receiver.call("expect", rid, dst, 4) == "ok"
                jobs.append((rid, receiver, r_index, sender, src, dst))
    for rid, receiver, _, sender, src, dst in jobs:
        assert sender.call("send", rid, receiver.address, src, dst, [(0, 2), (2, 4)], 0.0) == "started"
    for rid, receiver, r_index, sender, src, dst in jobs:
        assert sender.call("join", rid, 30)[0] == "ok", rid
        assert receiver.call("wait", rid, 10)[0] == "ok", rid
        _expect_copy(expected[r_index], sender.initial_cache(), src, dst)
    for r_index, receiver in enumerate(receivers):
        assert torch.equal(receiver.call("cache"), expected[r_index])
        assert receiver.call("metrics")["transfers_ok"] == 2 * per_pair
    assert sum(s.call("metrics")["transfers_ok"] for s in senders) == len(jobs)


@pytest.mark.timeout(90)
def test_killed_sender_fails_request_in_bounded_time_and_receiver_keeps_serving(workers):
    receiver = workers("receiver", seed=30, min_message_bytes=0)
    doomed = workers("sender", seed=31, min_message_bytes=0)
    survivor = workers("sender", seed=32, min_message_bytes=0)
    src, dst = [1, 2, 3], [4, 5, 6]

    # the survivor pairs first, so the receiver has a healthy pair when the other one dies
    assert receiver.call("expect", "warmup", [7], 4) == "ok"
    survivor.call("send", "warmup", receiver.address, [0], [7], [(0, 4)], 0.0)
    assert survivor.call("join", "warmup", 20)[0] == "ok"
    assert receiver.call("wait", "warmup", 10)[0] == "ok"

    assert receiver.call("expect", "doomed", dst, 4) == "ok"
    # two layers, then a long "prefill" pause during which the sender is killed
    doomed.call("send", "doomed", receiver.address, src, dst, [(0, 1), (1, 2), (2, 3), (3, 4)], 30.0)
    deadline = time.monotonic() + 15
    while receiver.call("layers_received", "doomed") < 1:
        assert time.monotonic() < deadline, "no layer arrived before the kill"
        time.sleep(0.05)
    doomed.kill()
    status, reason, elapsed = receiver.call("wait", "doomed", 20.0, timeout=30)
    assert status == "error"
    assert elapsed < FAST["peer_timeout_s"] + 2.0, (elapsed, reason)  # heartbeat, not the 20 s wait
    assert "silent" in reason or "failed" in reason, reason

    # the receiver re-uses the same blocks for a transfer from the surviving sender
    assert receiver.call("expect", "retry", dst, 4) == "ok"
    survivor.call("send", "retry", receiver.address, src, dst, [(0, 4)], 0.0)
    assert survivor.call("join", "retry", 20)[0] == "ok"
    assert receiver.call("wait", "retry", 10)[0] == "ok"

    # a sender that did not exist until now pairs on demand; nobody restarts
    newcomer = workers("sender", seed=33, min_message_bytes=0)
    assert receiver.call("expect", "late", [8, 9], 4) == "ok"
    newcomer.call("send", "late", receiver.address, [10, 11], [8, 9], [(0, 4)], 0.0)
    assert newcomer.call("join", "late", 20)[0] == "ok"
    assert receiver.call("wait", "late", 10)[0] == "ok"

    expected = receiver.initial_cache()
    _expect_copy(expected, survivor.initial_cache(), [0], [7])
    _expect_copy(expected, survivor.initial_cache(), src, dst)
    _expect_copy(expected, newcomer.initial_cache(), [10, 11], [8, 9])
    assert torch.equal(receiver.call("cache"), expected)
    metrics = receiver.call("metrics")
    assert metrics["transfers_failed"] == 1 and metrics["transfers_ok"] == 3
    assert metrics["pairs_broken"] >= 1 and metrics["pairs_created"] == 3


@pytest.mark.timeout(60)
def test_abort_and_wait_timeout_fail_the_request_and_late_data_is_never_written(workers):
    receiver = workers("receiver", seed=40, min_message_bytes=0)
    sender = workers("sender", seed=41, min_message_bytes=0)
    initial = receiver.initial_cache()

    # the receiver gives up (wait timeout) while the sender is still streaming
    assert receiver.call("expect", "slow", [1, 2], 4) == "ok"
    sender.call("send", "slow", receiver.address, [3, 4], [1, 2], [(0, 1), (1, 2), (2, 3), (3, 4)], 0.4)
    status, reason, elapsed = receiver.call("wait", "slow", 0.6)
    assert status == "error" and "timed out" in reason and elapsed < 1.5
    landed_before_abort = receiver.call("cache")
    result = sender.call("join", "slow", 20)
    assert result[0] == "error" and "timed out" in result[1]  # the sender learns it
    time.sleep(0.3)
    after = receiver.call("cache")
    assert torch.equal(after, landed_before_abort)  # nothing written after the abort
    assert torch.equal(after[2:], initial[2:])      # the last layers never landed

    # explicit abort before anything is sent
    assert receiver.call("expect", "gone", [5], 4) == "ok"
    assert receiver.call("abort", "gone") == "ok"
    assert receiver.call("wait", "gone", 1)[0] == "error"
    sender.call("send", "gone", receiver.address, [6], [5], [(0, 4)], 0.0)
    status, reason, _ = sender.call("join", "gone", 20)
    assert status == "error" and "not expected" in reason
    assert torch.equal(receiver.call("cache")[:, :, 5], initial[:, :, 5])

    # and the pair still works afterwards
    assert receiver.call("expect", "fine", [5], 4) == "ok"
    sender.call("send", "fine", receiver.address, [6], [5], [(0, 4)], 0.0)
    assert sender.call("join", "fine", 20)[0] == "ok"
    assert receiver.call("wait", "fine", 10)[0] == "ok"
    assert torch.equal(receiver.call("cache")[:, :, 5], sender.initial_cache()[:, :, 6])


def _ask(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(5000), "receiver did not answer"
    return msgpack.unpackb(sock.recv(), raw=False)


@pytest.mark.timeout(60)
def test_malformed_control_messages_are_rejected_and_receiver_keeps_serving(workers):
    receiver = workers("receiver", seed=50, min_message_bytes=0)
    assert receiver.call("expect", "real", [0, 1], 4) == "ok"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"mallory")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(receiver.address)
    pack = lambda body: msgpack.packb(body, use_bin_type=True)  # noqa: E731
    begin = {"type": "begin", "request_id": "real", "epoch": 0, "dst_block_ids": [0, 1],
             "num_layers": 4, "dtype": "float32", "block_shape": [4, 2, 8]}
    bad_frames = [
        (b"\xc1\xff not msgpack",),
        (pack([1, 2, 3]),),
        (pack({"type": "launch_missiles"}),),
        (pack({"no": "type"}),),
        (pack({"type": "ping"}), b"extra frame"),
        (pack({"type": "ping"}),),                       # unknown peer: no hello yet
        (pack(begin),),                                  # unknown peer
        (pack({"type": "hello", "sender_id": "someone-else", "version": 1}),),
        (pack({"type": "hello", "sender_id": 7, "version": 1}),),
        (pack({"type": "hello", "sender_id": "mallory", "version": 1, "pickle": b"x"}),),
        (pack({"type": "hello", "sender_id": "mallory", "version": True}),),
    ]
    for frames in bad_frames:
        reply = _ask(sock, *frames)
        assert reply["type"] == "error", (frames, reply)
        assert reply["reason"]
    welcome = _ask(sock, pack({"type": "hello", "sender_id": "mallory", "version": 1}))
    assert welcome["type"] == "welcome"
    epoch = welcome["epoch"]
    paired_bad = [
        {**begin, "epoch": epoch, "request_id": "nobody-expects-this"},
        {**begin, "epoch": epoch, "dst_block_ids": [0, 2]},          # not the registered blocks
        {**begin, "epoch": epoch, "dst_block_ids": [-1, 1]},
        {**begin, "epoch": epoch, "num_layers": 9},
        {**begin, "epoch": epoch, "dtype": "complex128"},
        {**begin, "epoch": epoch, "block_shape": [4, 2]},
        {**begin, "epoch": epoch, "dst_block_ids": "0,1"},
        {**begin, "epoch": epoch + 5},
        {"type": "welcome", "receiver_id": "x", "store_port": 1, "epoch": 0},
        {"type": "chunk", "request_id": "real", "epoch": epoch + 1, "seq": 0, "layer_start": 0,
         "layer_end": 1, "nbytes": 512, "dtype": "float32", "shape": [1, 2, 2, 4, 2, 8]},
    ]
    for body in paired_bad:
        reply = _ask(sock, pack(body))
        assert reply["type"] == "error", (body, reply)
    # a chunk whose size cannot be trusted breaks (only) mallory's pair
    reply = _ask(sock, pack({"type": "chunk", "request_id": "real", "epoch": epoch, "seq": 0,
                             "layer_start": 0, "layer_end": 1, "nbytes": 1 << 40,
                             "dtype": "float32", "shape": [1, 2, 2, 4, 2, 8]}))
    assert reply["type"] == "error" and "match" in reply["reason"]
    assert _ask(sock, pack({"type": "ping"}))["type"] == "error"  # pair is gone now
    sock.close(0)
    ctx.term()

    # the registered request was never touched by any of that; a real sender still gets through
    sender = workers("sender", seed=51, min_message_bytes=0)
    sender.call("send", "real", receiver.address, [5, 6], [0, 1], [(0, 4)], 0.0)
    assert sender.call("join", "real", 20)[0] == "ok"
    assert receiver.call("wait", "real", 10)[0] == "ok"
    expected = receiver.initial_cache()
    _expect_copy(expected, sender.initial_cache(), [5, 6], [0, 1])
    assert torch.equal(receiver.call("cache"), expected)
    assert receiver.call("metrics")["rejected_messages"] >= len(bad_frames) + len(paired_bad) + 2
