"""Worker metrics and the autoscaling hook, read back from a real tiny engine: the values a
`LLMWorker` exported through `ray.util.metrics` after real requests equal the engine's own
counts; `record_autoscaling_stats` before, while and after requests; queued prefill tokens
under chunked prefill; per-expert token counters of a MoE model."""
from __future__ import annotations

import asyncio
import warnings

import pytest

from tandem import SamplingParams
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.config import EngineConfig
from tandem.workers.metrics import (
    ALL_SPECS,
    ENGINE_COUNTERS,
    ENGINE_GAUGES,
    EXPERT_TOKENS,
    HOST_COPY_BYTES,
    HOST_COPY_SECONDS,
    PREFIX_HIT_RATE,
    QUEUED_PREFILL_TOKENS,
    WorkerMetrics,
    _ray_metric,
    series_key,
)
from tandem.protocol.worker import EngineStats, WorkerRequest
from tandem.workers.serve_worker import LLMWorker, autoscaling_stats

STAT_KEYS = ("queued_prefill_tokens", "num_running", "num_waiting", "kv_usage")  # tandem.workers.autoscaling's


def test_every_metric_name_is_legal_for_ray():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ':' in a name is a FutureWarning; an illegal name a UserWarning
        metrics = [_ray_metric(spec) for spec in ALL_SPECS]
    assert not any(m._discard_metric for m in metrics)
    assert len({spec.name for spec in ALL_SPECS}) == len(ALL_SPECS)
    assert all(spec.name.endswith("_total") for spec in ALL_SPECS if spec.kind == "counter")


async def _run(worker: LLMWorker, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    tokens: list[int] = []
    async for delta in worker.generate(WorkerRequest(rid, prompt, temperature=0.0, max_tokens=max_tokens,
                                                     ignore_eos=True)):
        assert delta.error is None, delta.error
        tokens += delta.outputs[0].token_ids
    return tokens


async def _settled(worker: LLMWorker, predicate, timeout_s: float = 10.0) -> dict[str, float]:
    """The exported samples once `predicate(samples)` holds (the publish loop ticks on its own)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        samples = worker.metric_samples()
        if predicate(samples):
            return samples
        assert asyncio.get_running_loop().time() < deadline, samples
        await asyncio.sleep(0.02)


def test_worker_exports_engine_metrics_and_autoscaling_stats(llama_dir):
    worker = LLMWorker(llama_dir, {"num_kv_blocks": 256, "block_size": 16, "max_num_batched_tokens": 32},
                       publish_interval_s=0.01)
    shared = list(range(10, 42))  # two full blocks every prompt shares
    prompts = [shared + [100 + i] * (5 + 7 * i) for i in range(6)]
    max_tokens = 24

    async def main():
        before = await worker.record_autoscaling_stats()
        tasks = [asyncio.create_task(_run(worker, f"r{i}", p, max_tokens)) for i, p in enumerate(prompts)]
        during = []
        while not all(t.done() for t in tasks):
            during.append(await worker.record_autoscaling_stats())
            await asyncio.sleep(0.005)
        outputs = [t.result() for t in tasks]
        after = await worker.record_autoscaling_stats()
        stats = worker.stats().engine
        samples = await _settled(worker, lambda s: s.get("vllm_generation_tokens_total") == 6 * max_tokens
                                 and s.get("vllm_num_requests_running") == 0)
        return before, during, after, outputs, stats, samples

    try:
        before, during, after, outputs, stats, samples = asyncio.run(main())
    finally:
        worker.__del__()
    assert all(len(o) == max_tokens for o in outputs)

    # autoscaling: exactly the keys the policies read, all floats; idle before and after
    for reading in [before, after, *during]:
        assert tuple(reading) == STAT_KEYS and all(type(v) is float for v in reading.values())
        assert 0.0 <= reading["kv_usage"] <= 1.0
    assert before == after == dict.fromkeys(STAT_KEYS, 0.0)
    assert any(r["num_running"] > 0 and r["kv_usage"] > 0 for r in during), during
    assert any(r["queued_prefill_tokens"] > 0 for r in during), during  # 32-token chunks
    assert max(r["num_running"] + r["num_waiting"] for r in during) <= len(prompts)

    # exported counters equal the engine's own counts
    assert samples["vllm_prompt_tokens_total"] == sum(map(len, prompts)) == stats.prompt_tokens_total
    assert samples["vllm_generation_tokens_total"] == len(prompts) * max_tokens == stats.generation_tokens_total
    assert samples["vllm_prefix_cache_queries_total"] == stats.prefix_cache_queries > 0
    assert samples["vllm_prefix_cache_hits_total"] == stats.prefix_cache_hits > 0  # the shared blocks
    assert samples[PREFIX_HIT_RATE.name] == pytest.approx(stats.prefix_cache_hits / stats.prefix_cache_queries)
    assert samples["vllm_num_requests_running"] == samples["vllm_num_requests_waiting"] == 0.0
    assert samples["vllm_kv_cache_usage_perc"] == 0.0
    assert samples["tandem_kv_total_blocks"] == 256 == samples["tandem_kv_free_blocks"]
    assert samples[QUEUED_PREFILL_TOKENS.name] == 0.0
    assert samples.get("vllm_num_preemptions_total", 0.0) == stats.num_preemptions
    # a counter appears once it moved (Ray's counters take only positive increments)
    assert {spec.name for spec in ENGINE_GAUGES.values()} <= set(samples)
    assert {spec.name for spec in ENGINE_COUNTERS.values()} - set(samples) <= {"vllm_num_preemptions_total"}
    assert worker.metrics.tags == {"model_name": "llama", "pool": "colocated", "replica": "local"}


def test_queued_prefill_tokens_follow_chunked_prefill(llama_dir):
    engine = LLMEngine(EngineConfig(model=llama_dir, num_kv_blocks=64, block_size=16, max_num_batched_tokens=16,
                                    enable_prefix_caching=False))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    def run(num_requests: int) -> list[dict[str, float]]:
        for i in range(num_requests):
            engine.add_request(f"q{num_requests}.{i}", {"prompt_token_ids": [20 + i] * 40}, params)
        seen = [autoscaling_stats(engine)]
        while engine.has_unfinished_requests():
            engine.step()
            seen.append(autoscaling_stats(engine))
        return seen

    # one 40-token prompt, 16 tokens per step, then decoding (nothing left to prefill), then idle
    one = run(1)
    # (overlap scheduling reads the last token one step later: one more idle-ish step at the end)
    queued = [s["queued_prefill_tokens"] for s in one]
    assert queued[:3] == [40.0, 24.0, 8.0] and queued[3:] == [0.0] * (len(queued) - 3) and len(queued) >= 6, one
    assert one[0]["num_waiting"] == 1.0 and one[0]["num_running"] == 0.0
    assert one[1]["num_running"] == 1.0 and one[1]["num_waiting"] == 0.0 and one[1]["kv_usage"] > 0
    assert one[-1] == dict.fromkeys(STAT_KEYS, 0.0)
    # two: the second waits, then is prefilled beside the first one's decode steps
    queued = [s["queued_prefill_tokens"] for s in run(2)]
    assert queued[0] == 80.0 and queued[-1] == 0.0
    assert all(a - 16 <= b < a for a, b in zip(queued, queued[1:]) if a), queued


def test_moe_worker_exports_tokens_per_expert(model_dirs):
    worker = LLMWorker(model_dirs["qwen3_moe"], {"num_kv_blocks": 128, "enable_prefix_caching": False},
                       publish_interval_s=0.01, expert_load_interval_s=0.0)
    model = worker._engine.engine.runner.model
    top_k = model.config.num_experts_per_tok
    prompts = [[5 + i] * (3 + 4 * i) for i in range(4)]
    max_tokens = 5
    # every prompt token and every generated token but the last goes through each MoE layer
    forwarded = sum(map(len, prompts)) + len(prompts) * (max_tokens - 1)

    def per_layer(samples: dict[str, float]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for key, value in samples.items():
            if key.startswith(EXPERT_TOKENS.name + "{"):
                layer = key.split("layer=")[1].rstrip("}")
                totals[layer] = totals.get(layer, 0.0) + value
        return totals

    async def main():
        await asyncio.gather(*(_run(worker, f"m{i}", p, max_tokens) for i, p in enumerate(prompts)))
        return await _settled(worker, lambda s: per_layer(s) and set(per_layer(s).values()) == {top_k * forwarded})

    try:
        samples = asyncio.run(main())
    finally:
        worker.__del__()
    load = model.expert_load.snapshot()
    assert sorted(per_layer(samples)) == sorted(str(layer) for layer in load.moe_layers)
    for layer, row in zip(load.moe_layers, load.cumulative):
        for expert, count in enumerate(row):
            assert worker.metrics.value(EXPERT_TOKENS, layer=str(layer), expert=str(expert)) == count
    hot_layer, hot_expert, hot_count = load.hot_experts(1)[0]
    assert worker.metrics.value(EXPERT_TOKENS, layer=str(hot_layer), expert=str(hot_expert)) == hot_count > 0


def test_prefill_worker_metrics_are_tagged_with_the_prefill_pool(llama_dir):
    from tandem.workers.prefill_worker import PrefillWorker

    worker = PrefillWorker(llama_dir, {"num_kv_blocks": 64})
    try:
        assert worker.metrics.tags["pool"] == "prefill"
    finally:
        worker.__del__()


def test_host_tier_series_follow_engine_stats_and_exist_only_where_it_is_on():
    base = dict(num_running=1, num_waiting=0, num_running_tokens=10, num_waiting_tokens=0, num_free_blocks=5,
                num_total_blocks=8, kv_usage=0.375, prefix_cache_queries=1000, prefix_cache_hits=100,
                num_preemptions=0, prompt_tokens_total=1000, generation_tokens_total=50)
    off = WorkerMetrics("colocated", "off", "m")
    off.update_engine(EngineStats(**base))
    assert not any("host" in key for key in off.samples())
    on = WorkerMetrics("colocated", "on", "m")
    host = dict(host_kv_total_blocks=64, host_kv_used_blocks=16, host_kv_usage=0.25, host_cache_hits=300,
                host_bytes_offloaded=4096, host_bytes_reloaded=2048, host_offload_seconds=0.5, host_reload_seconds=0.25,
                host_offloads_skipped=2, num_loading_from_host=1)
    on.update_engine(EngineStats(**base, **host))
    on.update_engine(EngineStats(**base, **{**host, "host_cache_hits": 400, "host_bytes_reloaded": 3072}))
    samples = on.samples()
    assert samples["tandem_host_kv_usage_perc"] == 0.25 and samples["tandem_host_kv_total_blocks"] == 64
    assert samples["tandem_num_requests_loading_from_host"] == 1
    assert samples["tandem_prefix_cache_host_hits_total"] == 400
    assert samples["tandem_prefix_cache_host_hit_rate"] == pytest.approx(0.4)
    assert samples[series_key(HOST_COPY_BYTES, direction="offload")] == 4096
    assert samples[series_key(HOST_COPY_BYTES, direction="reload")] == 3072
    assert samples[series_key(HOST_COPY_SECONDS, direction="reload")] == 0.25
    assert samples["tandem_host_kv_offloads_skipped_total"] == 2
