"""`tandem status`'s per-pool engine view, from stats-board reports keyed as the workers key
them (Serve's full replica id); the live path is exercised in test_multinode.py."""
from __future__ import annotations

import dataclasses

from tandem.cluster.apps import pool_engine_stats
from tandem.cluster.status_cli import format_report
from tandem.protocol.worker import EngineStats


def engine_stats(**overrides) -> dict:
    base = EngineStats(num_running=0, num_waiting=0, num_running_tokens=0, num_waiting_tokens=0,
                       num_free_blocks=100, num_total_blocks=100, kv_usage=0.0, prefix_cache_queries=0,
                       prefix_cache_hits=0, num_preemptions=0, prompt_tokens_total=0, generation_tokens_total=0)
    return dataclasses.asdict(dataclasses.replace(base, **overrides))


def test_pool_engine_stats_groups_replicas_by_deployment():
    board = {
        "SERVE_REPLICA::tandem#DecodeWorker#a1": engine_stats(kv_usage=0.5, num_running=3, num_waiting=1,
                                                              num_waiting_tokens=40, prefix_cache_queries=100,
                                                              prefix_cache_hits=60),
        "SERVE_REPLICA::tandem#DecodeWorker#b2": engine_stats(kv_usage=0.1, num_running=1, prefix_cache_queries=100,
                                                              prefix_cache_hits=20),
        "SERVE_REPLICA::tandem#PrefillWorker#c3": engine_stats(num_waiting=2, num_waiting_tokens=900),
        "SERVE_REPLICA::other#DecodeWorker#d4": engine_stats(kv_usage=1.0),  # another app
    }
    pools = pool_engine_stats("tandem", board)
    assert set(pools) == {"DecodeWorker", "PrefillWorker"}
    decode = pools["DecodeWorker"]
    assert decode.replicas == 2 and abs(decode.kv_usage - 0.3) < 1e-9
    assert decode.prefix_hit_rate == 0.4 and (decode.num_running, decode.num_waiting) == (4, 1)
    prefill = pools["PrefillWorker"]
    assert prefill.prefix_hit_rate is None and prefill.num_waiting_tokens == 900


def test_format_report_shows_each_pool_and_the_autoscaled_bounds():
    pools = pool_engine_stats("tandem", {"SERVE_REPLICA::tandem#DecodeWorker#a1": engine_stats(
        kv_usage=0.25, num_running=2, prefix_cache_queries=10, prefix_cache_hits=5)})
    report = {"app": "tandem", "status": "RUNNING", "args": {"autoscaling": {"decode": {"max_replicas": 6}}},
              "deployments": {
                  "DecodeWorker": {"status": "HEALTHY", "replicas": {"RUNNING": 1},
                                   "engine": dataclasses.asdict(pools["DecodeWorker"])},
                  "OpenAIIngress": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}}}
    text = format_report(report)
    decode_line = next(line for line in text.splitlines() if "DecodeWorker" in line)
    assert "running=1" in decode_line and "kv 25.0%" in decode_line and "prefix hits 50.0%" in decode_line
    assert "running 2" in decode_line
    assert "autoscaled: decode pool, 1..6 replicas" in text
    assert "kv" not in next(line for line in text.splitlines() if "OpenAIIngress" in line)


def test_host_tier_shows_where_a_pool_has_one():
    board = {"SERVE_REPLICA::tandem#DecodeWorker#a1": engine_stats(
        prefix_cache_queries=200, prefix_cache_hits=50, host_kv_total_blocks=100, host_kv_usage=0.5, host_cache_hits=80),
        "SERVE_REPLICA::tandem#PrefillWorker#b1": engine_stats()}
    pools = pool_engine_stats("tandem", board)
    assert pools["DecodeWorker"].host_hit_rate == 0.4 and pools["DecodeWorker"].host_kv_usage == 0.5
    assert pools["PrefillWorker"].host_hit_rate is None and pools["PrefillWorker"].host_kv_usage is None
    report = {"app": "tandem", "status": "RUNNING", "args": {}, "deployments": {
        name: {"status": "HEALTHY", "replicas": {"RUNNING": 1}, "engine": dataclasses.asdict(pool)}
        for name, pool in pools.items()}}
    lines = format_report(report).splitlines()
    assert "host tier 50.0% used, hits 40.0%" in next(line for line in lines if "DecodeWorker" in line)
    assert "host tier" not in next(line for line in lines if "PrefillWorker" in line)
