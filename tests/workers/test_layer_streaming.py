"""Layer streaming on the product path: a prefill engine with the real `PrefillConnector` sends
its prompt's KV over kvtransfer (gloo, in one process) to a `KVReceiver`. With streaming on, the
first layer's KV has left the prefill side before the last layer runs (the last layer waits for
it: ordering, not timing); with it off (the baseline), nothing leaves before the forward ends.
Either way the blocks land bit-exact in the receiver's block ids."""
from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("zmq")

from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.llm_engine import LLMEngine  # noqa: E402
from tandem.kvtransfer import KVReceiver, KVTransferConfig  # noqa: E402
from tandem.protocol.sampling_params import SamplingParams  # noqa: E402
from tandem.workers.disagg import KVDestination, PrefillConnector  # noqa: E402

TRANSFER = dict(timeout_s=10.0, connect_timeout_s=10.0, heartbeat_s=0.2, peer_timeout_s=5.0,
                min_message_bytes=0, bind_host="127.0.0.1")


def run_prefill(llama_dir: str, stream_layers: bool, wait_s: float):
    connector = PrefillConnector(KVTransferConfig(**TRANSFER), stream_layers=stream_layers)
    engine = LLMEngine(EngineConfig(model=llama_dir, device="cpu", dtype="float32", num_kv_blocks=64),
                       kv_connector=connector)
    cache = engine.runner.kv_cache
    num_layers = cache.shape[0]
    receiver = KVReceiver(torch.zeros_like(cache), KVTransferConfig(**TRANSFER))
    seen_before_last_layer: list[bool] = []
    last = engine.runner.model.layers[num_layers - 1]
    forward = last.forward

    def last_layer_forward(*args, **kwargs):
        # Wait (bounded) for the first layer's message to have been sent by the link thread.
        deadline = threading.Event()
        for _ in range(int(wait_s / 0.01)):
            if connector.transfer_metrics().messages_sent >= 1:
                break
            deadline.wait(0.01)
        seen_before_last_layer.append(connector.transfer_metrics().messages_sent >= 1)
        return forward(*args, **kwargs)

    last.forward = last_layer_forward
    prompt = list(range(10, 110))  # 100 tokens: 7 blocks of 16, one forward
    num_blocks = -(-len(prompt) // 16)
    dst_ids = list(range(40, 40 + num_blocks))
    try:
        handle = receiver.expect("r", dst_ids, num_layers)
        connector.register("r", KVDestination(receiver.address, dst_ids, 0))
        engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=8))
        src_ids = None
        for _ in range(200):
            for out in engine.step():
                if out.finished:
                    assert out.outputs[0].token_ids and len(out.outputs[0].token_ids) == 1  # stops after one
            if src_ids is None and engine._saving:
                src_ids = list(engine._saving[0].block_ids)
            if not engine.has_unfinished_requests():
                break
        handle.wait(10.0)
        assert connector.pop_result("r") is None
        landed = receiver.kv_cache[:, :, dst_ids]
        assert torch.equal(landed, cache[:, :, src_ids])
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return seen_before_last_layer, connector.transfer_metrics().messages_sent, num_layers
    finally:
        receiver.close()
        connector.close()


def test_first_layers_leave_before_the_last_layer_runs(llama_dir):
    seen, messages, num_layers = run_prefill(llama_dir, stream_layers=True, wait_s=10.0)
    assert seen == [True]
    assert messages == num_layers  # one message per layer (min_message_bytes=0)


def test_all_at_end_sends_nothing_during_the_forward(llama_dir):
    seen, messages, _ = run_prefill(llama_dir, stream_layers=False, wait_s=0.3)
    assert seen == [False]
    assert messages >= 1  # all layers in as few messages as max_message_bytes allows
