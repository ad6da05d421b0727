"""The offline engine benchmark runs end to end on the CPU (small random model) and writes the
results contract: Tandem and both HF baselines on the same workload, each request's own output
length for HF continuous batching, and the static-batching subset's tokens per step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tandem.bench.engine_bench import static_tokens_per_step

ROOT = Path(__file__).resolve().parents[2]


def test_static_tokens_per_step_follows_each_batchs_longest():
    # Two batches of 2: steps = 5 + 9, tokens = 1 + 5 + 9 + 2.
    assert static_tokens_per_step([1, 5, 9, 2], 2) == 17 / 14
    assert static_tokens_per_step([4, 4, 4], 8) == 3.0


def test_engine_bench_writes_the_contract_on_cpu(tmp_path):
    cmd = [sys.executable, "bench/engine_bench.py", "--device", "cpu", "--out", str(tmp_path),
           "--num-requests", "6", "--hf-static-requests", "4", "--sweep", "lof:1024", "--trace-steps"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "engine_cpu.json").read_text())
    for key in ("device", "torch", "triton", "decode_b1_ms", "decode_b1_roofline_fraction",
                "throughput_tok_s", "throughput_vs_hf_static", "throughput_vs_hf_cb"):
        assert key in res, key
    tok = res["throughput_tok_s"]
    assert tok["tandem"] > 0 and tok["hf_static"] > 0 and tok["hf_continuous"] > 0
    assert res["hf_continuous"]["requests"] == 6  # the whole workload, not a prefix
    assert "own max_new_tokens" in res["hf_continuous"]["mode"]
    assert res["hf_static"]["requests"] == 4 and res["hf_static"]["tokens_per_step_subset"] > 0
    (row,) = res["tandem_sweep"]
    assert (row["scheduling_policy"], row["max_num_batched_tokens"]) == ("lof", 1024)
    assert row["sequences_identical"] == 6  # fp32 on the CPU: the order does not change the tokens
    assert not (tmp_path / "engine_partial.json").exists()
    assert "vs HF continuous" in (tmp_path / "engine_cpu.md").read_text()
    steps = json.loads((tmp_path / "engine_cpu_steps.json").read_text())
    assert res["step_lists_file"] == "engine_cpu_steps.json"
    assert [len(v) for v in steps["runs"].values()] == [res["tandem"]["step_trace"]["steps"],
                                                         row["step_trace"]["steps"]]
    # The step trace accounts for every computed token: each prompt token once (the prefix cache
    # is reset before a run), and every output token but each request's first (sampled at the end
    # of its prompt) in a one-token decode step.
    w = res["workload"]
    for trace in (res["tandem"]["step_trace"], row["step_trace"]):
        groups = trace["groups"].values()
        assert sum(g["prefill_tokens"] for g in groups) == w["prompt_tokens"]
        assert sum(g["decode_tokens"] for g in groups) == w["output_tokens"] - w["num_requests"]
        assert sum(g["steps"] for g in groups) == trace["steps"]
        assert 0 < trace["host_s"] <= trace["wall_s"]
    # The throughput bound counts the tokens the run computed (bench/throughput_bound.py).
    bound, groups = res["throughput_bound"], res["tandem"]["step_trace"]["groups"].values()
    assert bound["counts"]["decode_context"] == sum(g["decode_context"] for g in groups)
    assert bound["counts"]["computed_tokens"] == w["prompt_tokens"] + w["output_tokens"] - w["num_requests"]
    assert 0 < bound["fraction"] and bound["vs_hf_static_at_bound"] > 0
    assert "throughput bound" in (tmp_path / "engine_cpu.md").read_text()


def test_engine_bench_fp8_weights_on_cpu(tmp_path):
    """`--quantization fp8`: its own report, the roofline from the FP8 weights' bytes."""
    cmd = [sys.executable, "bench/engine_bench.py", "--device", "cpu", "--out", str(tmp_path),
           "--num-requests", "3", "--skip-hf", "--quantization", "fp8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "engine_cpu_fp8.json").read_text())
    assert res["quantization"] == "fp8" and not (tmp_path / "engine_cpu.json").exists()
    assert res["decode_b1_ms"] > 0 and res["throughput_tok_s"]["tandem"] > 0
    assert "weights fp8" in (tmp_path / "engine_cpu_fp8.md").read_text()


def test_fp8_weight_bytes_count_one_byte_per_weight(tmp_path):
    from tandem import LLM
    from tandem.bench.engine_bench import matmul_params, weight_bytes
    from tandem.engine.make_model import make_model

    folder = make_model(tmp_path / "m", "llama")
    full = LLM(str(folder), num_kv_blocks=8).engine.runner.model
    fp8 = LLM(str(folder), num_kv_blocks=8, quantization="fp8").engine.runner.model
    assert matmul_params(full) == matmul_params(fp8)
    linear = sum(p.numel() for n, p in fp8.named_parameters() if n.endswith("_proj.weight"))
    scales = sum(p.numel() for n, p in fp8.named_parameters() if n.endswith("weight_scale"))
    assert weight_bytes(full) - weight_bytes(fp8) == 3 * linear - 4 * scales  # float32 -> e4m3 + scales
