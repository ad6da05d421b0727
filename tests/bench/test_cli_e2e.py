"""`tandem bench` end to end, in process: `run(args)` against the fake server writes
report.json, report.md and PNG plots; a sweep adds the throughput-vs-load plot; `compare`
prints B/A ratios; bad arguments are refused with exit code 2."""
from __future__ import annotations

import argparse
import json

from tandem.bench.loadgen import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tandem_parser() -> argparse.ArgumentParser:
    """Built the way `cluster/cli.py` wires every subcommand."""
    parser = argparse.ArgumentParser(prog="tandem")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench")
    cli.add_arguments(bench)
    bench.set_defaults(_module=cli)
    return parser


def bench(*argv: str) -> int:
    args = tandem_parser().parse_args(["bench", *argv])
    return args._module.run(args)


def test_run_sweep_writes_json_markdown_and_plots_then_compare(fake_server, tmp_path, capsys):
    fast = fake_server(ttft_s=0.02, token_delay_s=0.004)
    common = ["--workload", "rag", "--documents", "2", "--document-tokens", "200", "--question-tokens", "8",
              "--output-tokens", "4", "--arrival", "fixed", "--rate", "20,40", "--num-requests", "10",
              "--warmup", "2", "--slo", "ttft_ms=500", "--slo", "tpot_ms=100", "--no-progress"]
    assert bench("run", "--url", fast.url + "/v1", "--label", "fast", "--out", str(tmp_path / "a"), *common) == 0
    out_a = tmp_path / "a"
    for name in ("report.json", "report.md"):
        assert (out_a / name).stat().st_size > 0
    for name in ("latency_cdf.png", "sweep.png"):
        assert (out_a / name).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out_a / "report.json").read_text())
    assert report["run"]["model"] == "fake-model"  # discovered from /v1/models
    assert report["run"]["token_counting"].startswith("words")
    assert [s["summary"]["offered_load"] for s in report["stages"]] == [20.0, 40.0]
    for stage in report["stages"]:
        summary = stage["summary"]
        assert summary["measured_requests"] == 10 and summary["warmup_requests"] == 2 and summary["failed"] == 0
        assert summary["latency"]["ttft_ms"]["p50"] >= 20
        assert summary["slo_attainment"] == 1.0
        assert len(stage["requests"]) == 12
        # Two documents behind all questions: the server's prefix cache hits most prompt tokens.
        assert stage["server"]["prefix_cache_hit_rate"] > 0.7
        assert stage["server"]["kv_transfer_bytes"] == 12 * 4096
    markdown = (out_a / "report.md").read_text()
    assert "## Summary" in markdown and "![sweep.png](sweep.png)" in markdown and "hit rate" in markdown
    assert "| 20 |" in capsys.readouterr().out  # the summary table goes to stdout

    slow = fake_server(ttft_s=0.08, token_delay_s=0.004)
    assert bench("run", "--url", slow.url, "--label", "slow", "--out", str(tmp_path / "b"), *common) == 0

    capsys.readouterr()
    assert bench("compare", str(out_a / "report.json"), str(tmp_path / "b" / "report.json"),
                 "--out", str(tmp_path / "cmp.md")) == 0
    table = capsys.readouterr().out
    assert "A: fast" in table and "B: slow" in table
    ttft_rows = [line for line in table.splitlines() if "| TTFT p50 ms |" in line]
    assert len(ttft_rows) == 2  # one per load, paired by offered load
    for row in ttft_rows:
        ratio = float(row.split("|")[5].strip().rstrip("x"))
        assert ratio > 2.0  # 80 ms vs 20 ms injected
    assert (tmp_path / "cmp.md").read_text().endswith(table)


def test_closed_loop_chat_on_completions_without_metrics(fake_server, tmp_path):
    server = fake_server(ttft_s=0.01, token_delay_s=0.002, failures={2: "500"})
    code = bench("run", "--url", server.url, "--model", "fake-model", "--endpoint", "completions", "--workload", "chat",
                 "--turns", "2-3", "--think-time", "0.01", "--input-tokens", "10", "--output-tokens", "3",
                 "--arrival", "closed", "--concurrency", "2", "--num-requests", "8", "--no-metrics", "--no-plots",
                 "--no-progress", "--out", str(tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["server"] is None and not (tmp_path / "latency_cdf.png").exists()
    assert stage["summary"]["errors"] == {"http_500": 1}
    assert all(r["conversation_id"].startswith("conv-") for r in stage["requests"])
    assert all(received.path == "/v1/completions" for received in server.received)


def test_long_mix_duration_bound_and_bad_arguments(fake_server, refused_url, tmp_path, capsys):
    server = fake_server(ttft_s=0.005, token_delay_s=0.001)
    code = bench("run", "--url", server.url, "--workload", "long-mix", "--long-every", "3", "--long-tokens", "300",
                 "--input-tokens", "20", "--output-tokens", "2", "--arrival", "poisson", "--rate", "30",
                 "--duration", "1.0", "--out", str(tmp_path))
    assert code == 0
    assert "in-flight" in capsys.readouterr().err  # the progress line (stderr is not a terminal here)
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["stages"][0]["summary"]
    assert summary["measured_requests"] >= 5, summary  # ~30 expected
    assert set(summary["by_kind"]) == {"short", "long"}
    assert "### requests of kind `long`" in (tmp_path / "report.md").read_text()

    capsys.readouterr()
    assert bench("run", "--url", server.url, "--arrival", "closed") == 2
    assert "needs --concurrency" in capsys.readouterr().err
    assert bench("run", "--url", server.url, "--workload", "jsonl") == 2
    assert bench("run", "--url", server.url, "--rate", "1,-2") == 2
    assert bench("run", "--url", refused_url, "--num-requests", "1") == 2  # no server to list models
    assert "pass --model" in capsys.readouterr().err
