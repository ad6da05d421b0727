"""A stalled or dead KV-transfer peer becomes a `TransferError` within the configured timeout,
on either side, and the worker keeps transferring afterwards. In one process (sender and
receiver threads, real zmq sockets and a real gloo pair); the peers that misbehave are raw zmq
sockets speaking the control channel's msgpack. A sender process killed mid-transfer is
`tests/kvtransfer/test_transfer_processes.py::test_killed_sender_fails_request_in_bounded_time_and_receiver_keeps_serving`."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import msgpack
import pytest
import torch
import zmq
from torch.distributed import TCPStore

from tandem.kvtransfer import KVReceiver, KVSender, KVTransferConfig, TransferError

SHAPE = (2, 2, 8, 4, 2, 8)  # layers, K/V, blocks, block_size, kv heads, head_dim
FAST = KVTransferConfig(timeout_s=2.0, connect_timeout_s=1.5, heartbeat_s=0.1, peer_timeout_s=1.0,
                        min_message_bytes=0)
SLACK_S = 1.5  # scheduling noise on a busy 2-core machine
pytestmark = pytest.mark.timeout(60)


def _cache(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _pack(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


@pytest.fixture
def zmq_context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _assert_transfers(sender: KVSender, receiver: KVReceiver, rid: str) -> None:
    handle = receiver.expect(rid, [6, 7], SHAPE[0])
    sender.send(rid, receiver.address, [0, 1], [6, 7])
    handle.wait(5)
    assert torch.equal(receiver.kv_cache[:, :, [6, 7]], sender.kv_cache[:, :, [0, 1]])


def test_sender_to_a_receiver_that_never_answers_fails_within_connect_timeout(zmq_context):
    silent = zmq_context.socket(zmq.ROUTER)  # accepts the connection, reads, never replies
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    with KVSender(_cache(1), FAST) as sender, KVReceiver(_cache(2), FAST) as receiver:
        started = time.monotonic()
        with pytest.raises(TransferError, match="no answer to hello"):
            sender.send("stalled", f"tcp://127.0.0.1:{port}", [0], [0])
        assert time.monotonic() - started < FAST.connect_timeout_s + SLACK_S
        _assert_transfers(sender, receiver, "after-stalled")  # the sender keeps working


def test_sender_to_a_receiver_that_stalls_at_rendezvous_fails_within_timeout(zmq_context):
    """The peer answers hello with a store nobody joins the pair through (hung mid-pairing)."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    fake = zmq_context.socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    with KVSender(_cache(3), FAST) as sender, KVReceiver(_cache(4), FAST) as receiver:
        session = sender.begin("rendezvous", f"tcp://127.0.0.1:{port}", [0], [0])
        assert fake.poll(5000)
        identity, _ = fake.recv_multipart()
        fake.send_multipart([identity, _pack({"type": "welcome", "receiver_id": "hung", "store_port": store.port,
                                              "epoch": 0})])
        started = time.monotonic()
        session.send_layers(0, SHAPE[0])
        with pytest.raises(TransferError, match="cannot pair"):
            session.finish(30)
        assert time.monotonic() - started < max(FAST.timeout_s, FAST.connect_timeout_s) + SLACK_S
        _assert_transfers(sender, receiver, "after-rendezvous")


def test_receiver_fails_a_transfer_whose_sender_went_silent_within_peer_timeout(zmq_context):
    """A paired sender that opens a transfer and then stops (no data, no heartbeat)."""
    with KVReceiver(_cache(5), FAST) as receiver, KVSender(_cache(6), FAST) as sender:
        handle = receiver.expect("silent", [2, 3], SHAPE[0])
        ended = threading.Event()  # add_done_callback: how the decode worker's event loop hears of it
        handle.add_done_callback(ended.set)
        peer = zmq_context.socket(zmq.DEALER)
        peer.setsockopt(zmq.IDENTITY, b"silent-sender")
        peer.connect(receiver.address)
        peer.send(_pack({"type": "hello", "sender_id": "silent-sender", "version": 1}))
        assert peer.poll(5000)
        welcome = msgpack.unpackb(peer.recv(), raw=False)
        assert welcome["type"] == "welcome", welcome
        peer.send(_pack({"type": "begin", "request_id": "silent", "epoch": welcome["epoch"], "dst_block_ids": [2, 3],
                         "num_layers": SHAPE[0], "dtype": "float32", "block_shape": list(SHAPE[3:])}))
        started = time.monotonic()
        with pytest.raises(TransferError):
            handle.wait(30)  # the heartbeat check, not this 30 s wait, ends it
        assert time.monotonic() - started < max(FAST.peer_timeout_s, FAST.connect_timeout_s) + SLACK_S
        assert ended.is_set()
        late = []
        handle.add_done_callback(lambda: late.append(True))  # already ended: called at once
        assert late == [True]
        before = receiver.kv_cache.clone()
        assert receiver.metrics().transfers_failed == 1
        _assert_transfers(sender, receiver, "after-silent")  # the same blocks, from a live sender
        assert torch.equal(receiver.kv_cache[:, :, :6], before[:, :, :6])  # nothing else was written
