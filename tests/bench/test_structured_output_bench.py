"""The structured-output benchmark runs end to end on the CPU (tiny random model, synthetic
vocabulary) and writes its results contract: every configuration's step time and overhead, the
mask's host and kernel time, compile times, the microbenchmarks, device, versions and command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_structured_output_bench_writes_the_contract_on_cpu(tmp_path):
    cmd = [sys.executable, "bench/structured_output_bench.py", "--device", "cpu", "--out", str(tmp_path),
           "--batch", "4", "--constrained", "0,1,4", "--steps", "3", "--warmup", "1", "--compile-reps", "1",
           "--vocab-size", "2048"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "structured_output_cpu.json").read_text())
    for key in ("device", "torch", "triton", "xgrammar", "command", "vocab_size", "compile", "runs", "fill", "kernel"):
        assert key in res, key
    assert res["vocab_size"] == 2048
    runs = {(r["schema"], r["constrained"]): r for r in res["runs"]}
    assert set(runs) == {(s, k) for s in ("simple", "complex") for k in (0, 1, 4)}
    for (schema, k), run in runs.items():
        assert run["running_at_end"] == 4  # the endless grammar kept every request in the batch
        assert run["step_ms"] > 0
        assert (run["mask_host_ms_per_step"] > 0) == (k > 0)
        assert run["overhead"] == 0.0 if k == 0 else isinstance(run["overhead"], float)
    for name in ("simple", "complex", "simple_endless", "complex_endless"):
        assert res["compile"][name]["first_compile_ms_median"] > 0
    assert [r["matchers"] for r in res["fill"]["complex"]] == [1, 4]
    assert "| complex | 4/4 | on |" in (tmp_path / "structured_output_cpu.md").read_text()
