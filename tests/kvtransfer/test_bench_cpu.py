"""The GPU benchmark script runs end to end on CPU (gloo) with tiny sizes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_kv_transfer_bench_runs_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "kv_transfer_bench.py"), "--device", "cpu",
           "--tokens", "32,64", "--layers", "4", "--kv-heads", "2", "--head-dim", "16",
           "--iters", "2", "--warmup", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "kvtransfer_cpu.json").read_text())
    assert result["device"] == "cpu" and result["backend"] == "gloo"
    for tokens in ("32", "64"):
        size = result["sizes"][tokens]
        assert size["bytes"] == 4 * 2 * int(tokens) * 2 * 16 * 2  # layers, K/V, tokens, H, D, bf16
        assert size["gbps"] > 0 and size["ms"] > 0 and size["nccl_raw_gbps"] > 0
        assert size["fraction_of_nccl"] == pytest.approx(size["gbps"] / size["nccl_raw_gbps"])
        assert size["bit_exact_checksum"] is True
    assert result["receiver_metrics"]["transfers_ok"] == 2 * 2 * 3  # sizes × variants × runs
    assert "| 64 |" in (tmp_path / "kvtransfer_cpu.md").read_text()
