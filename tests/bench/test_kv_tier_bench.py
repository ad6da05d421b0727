"""The host-tier benchmark end to end on the CPU with tiny shapes: both modes run, the JSON has
the figures of record, the tier serves follow-ups from host memory, and the answers are the same
with and without it (float32)."""
from __future__ import annotations

import json

from tandem.bench.kv_tier_bench import main

KEYS = ("followup_ttft_mean_ms", "followup_ttft_p99_ms", "hit_rate_gpu", "hit_rate_host", "throughput_out_tok_s")


def test_kv_tier_bench_smoke(tmp_path):
    assert main(["--device", "cpu", "--out", str(tmp_path), "--conversations", "4", "--turns", "2",
                 "--no-reuse-requests", "2"]) == 0
    doc = json.loads((tmp_path / "kv_tier_cpu.json").read_text())
    for mode in ("tier_on", "tier_off"):
        assert all(doc[mode][key] is not None for key in KEYS), doc[mode]
        assert doc[mode]["followup_requests"] == 4
    assert doc["tier_off"]["hit_rate_host"] == 0.0 and doc["tier_on"]["hit_rate_host"] > 0.1
    assert doc["tier_on"]["host_gb_reloaded"] > 0
    assert doc["followup_ttft_off_over_on"] > 0 and doc["no_reuse"]["throughput_on_over_off"] > 0
    assert doc["working_set_over_pool"] > 1.5  # the smoke shape: the pool also fits 2 requests at once
    assert doc["answers_identical_fraction"] == 1.0
