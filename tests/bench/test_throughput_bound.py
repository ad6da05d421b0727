"""The throughput bound (bench/throughput_bound.py): its counts by hand on a tiny workload, its
weight bytes against a real model's parameters, and its counts against what the committed H100
run's step trace recorded."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.bench.throughput_bound import ModelShape, WorkloadCounts, run_figures, throughput_bound

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "bench" / "results" / "engine_nvidia_h100_80gb_hbm3.json"


def test_counts_by_hand():
    # Request A: prompt 3, 2 output tokens: its second token is one decode step seeing 3 + 1 positions.
    # Request B: prompt 1, 3 output tokens: decode steps seeing 2 and 3 positions.
    c = WorkloadCounts.of([3, 1], [2, 3])
    assert c.min_steps == 3
    assert c.computed_tokens == (3 + 1) + (1 + 2)
    assert c.decode_tokens == 1 + 2
    assert c.decode_context == 4 + (2 + 3)
    assert c.prompt_attention_pairs == 6 + 1
    assert c.sampled_rows == 5


@pytest.mark.parametrize("prompts,outs", [([], []), ([3], [2, 1]), ([3], [0]), ([0], [4])])
def test_counts_reject_bad_workloads(prompts, outs):
    with pytest.raises(ValueError):
        WorkloadCounts.of(prompts, outs)


def test_weight_bytes_are_the_real_models_parameters_but_the_embedding(tmp_path):
    import transformers

    from tandem.bench.engine_bench import weight_bytes
    from tandem.engine.make_model import make_model

    folder = make_model(tmp_path / "m", "llama", seed=0, size="small")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()), 4)
    assert shape.step_weight_bytes == weight_bytes(model)
    assert shape.kv_bytes_per_token == (model.config.num_hidden_layers * 2 * model.config.num_key_value_heads
                                        * model.config.head_dim * 4)


def test_the_larger_bound_wins_and_the_figures_follow_from_it():
    shape = ModelShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, dtype_bytes=2)
    work = WorkloadCounts.of([4, 8], [3, 5])
    slow_memory = throughput_bound(shape, work, copy_gb_s=1e-9, matmul_tflops=1.0)
    assert slow_memory["bound_by"] == "bytes" and slow_memory["bound_s"] == slow_memory["bytes_s"]
    assert slow_memory["bytes_read"] == 5 * shape.step_weight_bytes + work.decode_context * shape.kv_bytes_per_token
    slow_math = throughput_bound(shape, work, copy_gb_s=1e9, matmul_tflops=1e-15)
    assert slow_math["bound_by"] == "flops" and slow_math["bound_s"] == slow_math["flops_s"]
    fig = run_figures(slow_math, tandem_tok_s=slow_math["output_tok_s"] / 2, hf_static_tok_s=slow_math["output_tok_s"] / 100)
    assert fig["fraction"] == pytest.approx(0.5)
    assert fig["vs_hf_static_at_bound"] == pytest.approx(100)
    assert fig["fraction_needed_for_50x_hf_static"] == pytest.approx(0.5)


def test_the_committed_h100_run_bound_reads_the_tokens_its_trace_recorded():
    proc = subprocess.run([sys.executable, "-m", "tandem.bench.throughput_bound", str(H100)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fig = json.loads(proc.stdout)
    res = json.loads(H100.read_text())
    groups = res["tandem"]["step_trace"]["groups"].values()
    assert fig["counts"]["decode_context"] == sum(g["decode_context"] for g in groups)
    assert fig["counts"]["decode_tokens"] == sum(g["decode_tokens"] for g in groups)
    assert fig["counts"]["computed_tokens"] == sum(g["decode_tokens"] + g["prefill_tokens"] for g in groups)
    assert fig["counts"]["min_steps"] <= res["tandem"]["step_trace"]["steps"]
    assert fig["output_tok_s"] >= res["throughput_tok_s"]["tandem"]  # a bound the run itself respects


def test_engine_limits_raise_the_steps():
    """Two requests of prompt 3 and 4 outputs: 3 decode tokens each, contexts 4, 5, 6."""
    free = WorkloadCounts.of([3, 3], [4, 4])
    assert (free.min_steps, free.min_steps_by) == (4, "longest request")
    # One sequence per step: the 6 decode tokens take 6 steps.
    one_seq = WorkloadCounts.of([3, 3], [4, 4], max_num_seqs=1)
    assert (one_seq.min_steps, one_seq.min_steps_by) == (6, "max_num_seqs")
    # A 5-token pool: the decode tokens hold 2 x (4 + 5 + 6) = 30 token-steps of KV, 6 steps at least.
    small_pool = WorkloadCounts.of([3, 3], [4, 4], kv_pool_tokens=5)
    assert (small_pool.min_steps, small_pool.min_steps_by) == (6, "kv capacity")
    # Blocks of 4 tokens: contexts 4, 5, 6 hold 4, 8, 8 tokens' blocks -> 2 x 20 = 40 over 8 tokens: 5.
    blocks = WorkloadCounts.of([3, 3], [4, 4], kv_pool_tokens=8, block_size=4)
    assert (blocks.min_steps, blocks.min_steps_by) == (5, "kv capacity")
    # Everything else is the same work.
    assert dataclasses.replace(blocks, min_steps=free.min_steps, min_steps_by=free.min_steps_by,
                               kv_pool_tokens=None) == free


def test_a_larger_pool_lifts_a_capacity_bound_workload():
    """1000/1000 x 1000 at max_num_seqs 512: a 300k-token pool bounds the steps by KV capacity
    (each request holds ~1.5M token-steps of blocks), a 1M-token one (FP8 halves the bytes per
    token) leaves max_num_seqs as the limit."""
    shape16 = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                         vocab=128256, dtype_bytes=2)
    shape8 = dataclasses.replace(shape16, kv_dtype_bytes=1)
    assert shape8.kv_bytes_per_token * 2 == shape16.kv_bytes_per_token
    lens, outs = [1000] * 1000, [1000] * 1000
    bf16 = WorkloadCounts.of(lens, outs, max_num_seqs=512, kv_pool_tokens=300_000, block_size=16)
    fp8 = WorkloadCounts.of(lens, outs, max_num_seqs=512, kv_pool_tokens=1_000_000, block_size=16)
    assert bf16.min_steps_by == "kv capacity" and fp8.min_steps_by == "max_num_seqs"
    assert fp8.min_steps < bf16.min_steps
    b16 = throughput_bound(shape16, bf16, copy_gb_s=3000, matmul_tflops=700)
    b8 = throughput_bound(shape8, fp8, copy_gb_s=3000, matmul_tflops=700)
    assert b8["output_tok_s"] > b16["output_tok_s"]


def test_engine_limits_must_be_positive():
    with pytest.raises(ValueError):
        WorkloadCounts.of([3], [2], max_num_seqs=0)
    with pytest.raises(ValueError):
        WorkloadCounts.of([3], [2], kv_pool_tokens=0)
