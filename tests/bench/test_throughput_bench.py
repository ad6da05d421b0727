"""The throughput benchmark (bench/throughput_bench.py) on the CPU with tiny shapes: a bf16-role
run and an FP8-KV run of the same requests, combined into the results contract."""
from __future__ import annotations

import json

from tandem.bench.throughput_bench import TRTLLM_FP8_H100, main

TINY = ["--device", "cpu", "--workloads", "8x4x3,sharegpt:3", "--b1-tokens", "5", "--max-num-seqs", "4",
        "--max-batched-tokens", "64"]
CONTRACT_ROW = {"isl", "osl", "num_prompts", "bf16_out_tok_s", "fp8_out_tok_s", "bound_out_tok_s",
                "trtllm_fp8_out_tok_s", "fp8_fraction_of_trtllm", "bf16_fraction_of_bound"}


def test_two_runs_combine_into_the_contract(tmp_path):
    assert main([*TINY, "--out", str(tmp_path / "runs")]) == 0
    assert main([*TINY, "--out", str(tmp_path / "runs"), "--kv-cache-dtype", "fp8"]) == 0
    bf16 = json.loads((tmp_path / "runs" / "throughput_auto_none_cpu.json").read_text())
    fp8 = json.loads((tmp_path / "runs" / "throughput_fp8_none_cpu.json").read_text())
    assert fp8["kv_cache_dtype"] == "fp8" and fp8["kv_bytes_per_token"] * 4 == bf16["kv_bytes_per_token"]
    for run in (bf16, fp8):
        assert [w["name"] for w in run["workloads"]] == ["8/4", "sharegpt"]
        for w in run["workloads"]:
            assert w["out_tok_s"] > 0 and 0 < w["fraction_of_bound"] < 1
            assert w["bound"]["counts"]["max_num_seqs"] == 4
    assert main(["--combine", str(tmp_path / "runs" / "throughput_auto_none_cpu.json"),
                 str(tmp_path / "runs" / "throughput_fp8_none_cpu.json"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "fp8_cpu.json").read_text())
    assert {"device", "decode_b1_ms", "decode_b1_fp8_roofline_fraction", "workloads"} <= set(result)
    assert len(result["workloads"]) == 1 and set(result["workloads"][0]) == CONTRACT_ROW
    row = result["workloads"][0]
    assert (row["isl"], row["osl"], row["num_prompts"]) == (8, 4, 3)
    assert row["trtllm_fp8_out_tok_s"] is None  # a published figure only for an H100 and its lengths
    assert row["bf16_fraction_of_bound"] == bf16["workloads"][0]["fraction_of_bound"]
    assert (tmp_path / "fp8_cpu.md").read_text().startswith("# FP8 throughput on")


def test_the_published_figures_are_nvidias_table():
    assert TRTLLM_FP8_H100 == {(128, 128): 28312, (1000, 1000): 15220, (2048, 128): 3450, (500, 2000): 17660,
                               (2048, 2048): 9305}
