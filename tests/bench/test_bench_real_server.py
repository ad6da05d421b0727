"""`tandem bench` with its defaults against the app `tandem serve` runs by default (the tiny
default model, default flags, a real local Serve): no request fails, because the workload is
sized to the context length the server's /v1/models card states, counted with the served
model's own tokenizer; and the prefix-cache counters in the report are the engine's own (a
report once summed the server's `tandem_*` and `vllm:*` copies of each counter)."""
from __future__ import annotations

import json

import pytest
from ray import serve

from tandem.cluster.cli import build_parser
from tandem.cluster.serve_cli import app_args
from tandem.engine import make_model
from tandem.workers.app import build_app
from tests.router.serve_harness import local_serve

APP = "bench-default"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """What `tandem serve` with no flags deploys; the default model made as on first use."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(make_model, "DEFAULT_MODEL_DIR", tmp_path_factory.mktemp("cache") / "tiny-llama")
        patch.delenv("TANDEM_API_KEY", raising=False)
        args = app_args(build_parser().parse_args(["serve"]))
        with local_serve() as url:
            serve.run(build_app(args), name=APP, route_prefix="/")
            yield url


def engine_prefix_counters() -> tuple[int, int]:
    stats = serve.get_deployment_handle("LLMWorker", app_name=APP).stats.remote().result(timeout_s=30).engine
    return stats.prefix_cache_queries, stats.prefix_cache_hits


def test_the_default_chat_workload_fits_the_default_model_and_counts_the_servers_counters_once(default_server,
                                                                                                  tmp_path):
    queries_before, hits_before = engine_prefix_counters()
    out = tmp_path / "bench"
    # The README's command (a chat workload at 2 sessions/s), 30 requests as in the report of the bug.
    args = build_parser().parse_args(["bench", "run", "--url", default_server, "--workload", "chat", "--rate", "2",
                                      "--num-requests", "30", "--out", str(out), "--no-plots", "--no-progress"])
    assert args._module.run(args) == 0
    queries_after, hits_after = engine_prefix_counters()
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    summary = stage["summary"]
    assert summary["failed"] == 0 and summary["succeeded"] == 30, (summary["errors"],
                                                                    [r["error_detail"] for r in stage["requests"]])
    assert report["run"]["max_model_len"] == 2048
    assert report["run"]["token_counting"].startswith("tokenizer:") and "served model's own" in \
        report["run"]["token_counting"]
    assert max(r["prompt_tokens"] + r["output_tokens"] for r in stage["requests"]) <= 2048
    # Conversations grew until the next turn would not fit, and ended there instead of failing.
    assert max(r["turn_index"] for r in stage["requests"]) >= 1
    server = stage["server"]
    assert (server["prefix_cache_queries"], server["prefix_cache_hits"]) == \
        (queries_after - queries_before, hits_after - hits_before), server
    assert server["prefix_cache_hits"] > 0  # later turns hit their conversation's earlier blocks
