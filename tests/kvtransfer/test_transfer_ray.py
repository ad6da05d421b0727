"""KV transfer between Ray actors (separate worker processes) over gloo, several checks on one
local Ray instance because it is slow to start."""
from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")

from kv_procs import make_cache  # noqa: E402

from tests.ray_start import init_local  # noqa: E402

FAST = dict(timeout_s=6.0, connect_timeout_s=6.0, heartbeat_s=0.2, peer_timeout_s=1.5,
            min_message_bytes=0)


@ray.remote(num_cpus=0, max_concurrency=8)
class ReceiverActor:
    def __init__(self, seed: int):
        from tandem.kvtransfer import KVReceiver, KVTransferConfig

        self.receiver = KVReceiver(make_cache(seed), KVTransferConfig(**FAST))
        self.handles = {}

    def address(self) -> str:
        return self.receiver.address

    def expect(self, rid: str, dst: list[int]) -> None:
        self.handles[rid] = self.receiver.expect(rid, dst, 4)

    def wait(self, rid: str, timeout: float) -> tuple[str, str, float]:
        from tandem.kvtransfer import TransferError

        t0 = time.monotonic()
        try:
            self.handles.pop(rid).wait(timeout)
            return ("ok", "", time.monotonic() - t0)
        except TransferError as exc:
            return ("error", str(exc), time.monotonic() - t0)

    def layers_received(self, rid: str) -> int:
        return self.handles[rid].layers_received

    def cache(self) -> torch.Tensor:
        return self.receiver.kv_cache.clone()

    def metrics(self):
        return self.receiver.metrics()


@ray.remote(num_cpus=0, max_concurrency=8)
class SenderActor:
    def __init__(self, seed: int):
        from tandem.kvtransfer import KVSender, KVTransferConfig

        self.sender = KVSender(make_cache(seed), KVTransferConfig(**FAST))

    def send(self, rid: str, peer: str, src: list[int], dst: list[int], pause_s: float = 0.0) -> str:
        from tandem.kvtransfer import TransferError

        try:
            session = self.sender.begin(rid, peer, src, dst)
            for layer in range(4):
                session.send_layers(layer, layer + 1)
                time.sleep(pause_s)
            session.finish()
            return "ok"
        except TransferError as exc:
            return f"error: {exc}"


@pytest.fixture(scope="module")
def local_ray():
    init_local(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": __import__("os").path.dirname(__file__)}})
    yield
    ray.shutdown()


@pytest.mark.timeout(120)
def test_transfers_between_ray_actors(local_ray):
    receivers = [ReceiverActor.remote(100 + i) for i in range(2)]
    senders = [SenderActor.remote(200 + i) for i in range(2)]
    addresses = ray.get([r.address.remote() for r in receivers])
    expected = [make_cache(100 + i) for i in range(2)]

    # 1. concurrent requests from both senders to both receivers, different block ids, bit-exact
    pending = []
    for r_index, receiver in enumerate(receivers):
        for s_index, sender in enumerate(senders):
            for k in range(3):
                rid = f"{r_index}-{s_index}-{k}"
                dst = [2 * (3 * s_index + k), 2 * (3 * s_index + k) + 1]
                src = [(5 * k + s_index) % 24, (5 * k + 7) % 24]
                ray.get(receiver.expect.remote(rid, dst))
                pending.append((receiver, rid, sender.send.remote(rid, addresses[r_index], src, dst)))
                expected[r_index][:, :, dst] = make_cache(200 + s_index)[:, :, src]
    for receiver, rid, sent in pending:
        assert ray.get(sent) == "ok"
        assert ray.get(receiver.wait.remote(rid, 10))[0] == "ok"
    for r_index, receiver in enumerate(receivers):
        assert torch.equal(ray.get(receiver.cache.remote()), expected[r_index])

    # 2. a sender actor killed mid-transfer: the receiver's wait fails fast, not at its timeout
    receiver, address = receivers[0], addresses[0]
    ray.get(receiver.expect.remote("doomed", [20, 21]))
    doomed = senders[0]
    doomed.send.remote("doomed", address, [1, 2], [20, 21], 30.0)
    deadline = time.monotonic() + 15
    while ray.get(receiver.layers_received.remote("doomed")) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ray.kill(doomed)
    status, reason, elapsed = ray.get(receiver.wait.remote("doomed", 20.0))
    assert status == "error" and elapsed < FAST["peer_timeout_s"] + 2.0, (reason, elapsed)

    # 3. the other sender still works with the same receiver, into the freed blocks
    ray.get(receiver.expect.remote("after", [20, 21]))
    assert ray.get(senders[1].send.remote("after", address, [3, 4], [20, 21])) == "ok"
    assert ray.get(receiver.wait.remote("after", 10))[0] == "ok"
    expected[0][:, :, [20, 21]] = make_cache(201)[:, :, [3, 4]]

    # 4. a brand-new sender actor pairs with a running receiver; nobody restarts
    newcomer = SenderActor.remote(300)
    ray.get(receiver.expect.remote("late", [22, 23]))
    assert ray.get(newcomer.send.remote("late", address, [9, 10], [22, 23])) == "ok"
    assert ray.get(receiver.wait.remote("late", 10))[0] == "ok"
    expected[0][:, :, [22, 23]] = make_cache(300)[:, :, [9, 10]]

    assert torch.equal(ray.get(receiver.cache.remote()), expected[0])
    metrics = ray.get(receiver.metrics.remote())
    assert metrics.transfers_ok == 6 + 2 and metrics.transfers_failed == 1
    assert metrics.pairs_created == 3 and metrics.pairs_broken >= 1
