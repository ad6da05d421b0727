"""A tensor-parallel prefill engine saves its KV to decode receivers of any degree: every rank
sends the KV heads it holds straight to the decode rank(s) holding them (`workers.tp_disagg`),
one session per rank pair, one message per layer group. Real parts throughout: the engine's
`PrefillConnector` at TP=2 (rank 1 a spawned process, gloo, fp32), `KVReceiver`s in this process
standing for decode ranks (degree 1: all heads; degree 2: one head each). The KV that lands
equals a TP=1 prefill's of the same prompt, and so does the first token."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

pytest.importorskip("zmq")

from tandem.engine.config import EngineConfig  # noqa: E402
from tandem.engine.llm_engine import LLMEngine  # noqa: E402
from tandem.engine.tp_ranks import TensorParallelRanks  # noqa: E402
from tandem.kvtransfer import KVReceiver, KVTransferConfig, plan_head_parts  # noqa: E402
from tandem.kvtransfer.tp_plan import parts_for_dst  # noqa: E402
from tandem.protocol.sampling_params import SamplingParams  # noqa: E402
from tandem.workers.disagg import KVDestination, PrefillConnector  # noqa: E402
from tandem.workers.tp_disagg import prefill_follower, rank_kv_heads  # noqa: E402

TRANSFER = dict(timeout_s=10.0, connect_timeout_s=10.0, heartbeat_s=0.2, peer_timeout_s=5.0,
                min_message_bytes=0, bind_host="127.0.0.1")
PROMPT = list(range(10, 110))  # 100 tokens: 7 blocks of 16, one forward
DST_IDS = list(range(40, 47))


def prefill(engine: LLMEngine, connector: PrefillConnector, destination: KVDestination):
    """Runs PROMPT as a saved prefill; returns (first token, the prompt's block ids here)."""
    connector.register("r", destination)
    engine.add_request("r", {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=8))
    first, src_ids = None, None
    for _ in range(300):
        for out in engine.step():
            if out.finished:
                first = out.outputs[0].token_ids
        if src_ids is None and engine._saving:
            src_ids = list(engine._saving[0].block_ids)
        if not engine.has_unfinished_requests():
            break
    assert connector.pop_result("r") is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # freed after every ack
    assert first is not None and len(first) == 1  # stops after its first token
    return first[0], src_ids


@contextlib.contextmanager
def prefill_to_decode_ranks(engine: LLMEngine, connector: PrefillConnector, full: torch.Tensor,
                            dst_heads: list[tuple[int, int]], parts):
    """PROMPT saved to one receiver per decode rank (its heads of `full`'s shape), each expecting
    its parts in DST_IDS; yields (first token, the receivers) once every part landed; closes them."""
    receivers = [KVReceiver(torch.zeros((full.shape[0], 2, 64, 16, hi - lo, full.shape[-1])),
                            KVTransferConfig(**TRANSFER)) for lo, hi in dst_heads]
    try:
        handles = [r.expect("r", DST_IDS, full.shape[0], head_ranges=parts_for_dst(parts, rank))
                   for rank, r in enumerate(receivers)]
        token, _ = prefill(engine, connector,
                           KVDestination(receivers[0].address, DST_IDS, 0, [r.address for r in receivers], dst_heads))
        for handle in handles:
            handle.wait(10.0)
        yield token, receivers
    finally:
        for r in receivers:
            r.close()


def config(model: str) -> EngineConfig:
    return EngineConfig(model=model, device="cpu", dtype="float32", num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(llama_dir):
    """TP=1: the prompt's KV (all heads) as it lands in one receiver, and the first token."""
    connector = PrefillConnector(KVTransferConfig(**TRANSFER))
    engine = LLMEngine(config(llama_dir), kv_connector=connector)
    receiver = KVReceiver(torch.zeros_like(engine.runner.kv_cache), KVTransferConfig(**TRANSFER))
    try:
        handle = receiver.expect("r", DST_IDS, engine.runner.kv_cache.shape[0])
        token, src_ids = prefill(engine, connector, KVDestination(receiver.address, DST_IDS, 0))
        handle.wait(10.0)
        assert torch.equal(receiver.kv_cache[:, :, DST_IDS], engine.runner.kv_cache[:, :, src_ids])
        return token, receiver.kv_cache[:, :, DST_IDS].clone()
    finally:
        receiver.close()
        connector.close()


@pytest.fixture(scope="module")
def tp2_prefill(llama_dir):
    ranks = TensorParallelRanks(config(llama_dir), 2,
                                follower_hook=functools.partial(prefill_follower, KVTransferConfig(**TRANSFER)))
    connector = PrefillConnector(KVTransferConfig(**TRANSFER))
    try:
        engine = LLMEngine(ranks.config, runner_factory=ranks.runner_factory, kv_connector=connector)
        yield engine, connector
    finally:
        ranks.shutdown()
        connector.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("decode_tp", [1, 2])
def test_each_prefill_rank_sends_its_heads_to_the_decode_ranks_holding_them(tp2_prefill, reference, decode_tp):
    engine, connector = tp2_prefill
    hf = engine.hf_config
    num_layers = hf.num_hidden_layers
    dst_heads = rank_kv_heads(hf.num_key_value_heads, decode_tp)
    parts = plan_head_parts(rank_kv_heads(hf.num_key_value_heads, 2), dst_heads)
    assert len({(p.src_rank, p.dst_rank) for p in parts}) == len(parts)  # one part per rank pair
    full = reference[1]
    with prefill_to_decode_ranks(engine, connector, full, dst_heads, parts) as (token, receivers):
        assert token == reference[0]
        landed = torch.cat([r.kv_cache[:, :, DST_IDS] for r in receivers], dim=4)
        torch.testing.assert_close(landed, full, rtol=1e-5, atol=1e-5)  # TP=2 sums in another order
        others = [b for b in range(64) if b not in DST_IDS]
        assert all(not r.kv_cache[:, :, others].any() for r in receivers)  # nothing else written
        # min_message_bytes=0: each layer is its own message, per rank pair: pairs x layers.
        assert sum(r.metrics().messages_received for r in receivers) == len(parts) * num_layers
        assert sum(r.metrics().transfers_ok for r in receivers) == decode_tp


@pytest.mark.timeout(120)
def test_a_tp1_prefill_splits_its_heads_over_two_decode_ranks(llama_dir, reference):
    """Prefill degree 1 -> decode degree 2: rank 0 alone sends each decode rank its heads."""
    connector = PrefillConnector(KVTransferConfig(**TRANSFER))
    engine = LLMEngine(config(llama_dir), kv_connector=connector)
    full = reference[1]
    num_kv_heads = full.shape[4]
    dst_heads = rank_kv_heads(num_kv_heads, 2)
    parts = plan_head_parts([(0, num_kv_heads)], dst_heads)
    try:
        with prefill_to_decode_ranks(engine, connector, full, dst_heads, parts) as (token, receivers):
            assert token == reference[0]
            assert torch.equal(torch.cat([r.kv_cache[:, :, DST_IDS] for r in receivers], dim=4), full)
            assert sum(r.metrics().messages_received for r in receivers) == len(parts) * full.shape[0]
    finally:
        connector.close()
