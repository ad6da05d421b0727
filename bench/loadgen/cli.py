"""`tandem bench`: `run` a load test against an OpenAI-compatible endpoint (one stage, or a
sweep over rates / concurrencies), or `compare` two report.json files.

Wired into the `tandem` command line through `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import shlex
import sys
from pathlib import Path

import aiohttp

from tandem.bench.loadgen.arrivals import ARRIVALS, ArrivalProcess, make_arrival
from tandem.bench.loadgen.client import ClientConfig, OpenAIClient, ServedModel, discover_model, root_url
from tandem.bench.loadgen.compare import compare_reports, render_comparison
from tandem.bench.loadgen.progress import Progress
from tandem.bench.loadgen.report import BenchReport, RequestRecord, RunInfo, StageReport, render_markdown, write_json
from tandem.bench.loadgen.runner import CONTEXT_MARGIN_TOKENS, StageConfig, StageRun, run_stage
from tandem.bench.loadgen.server_metrics import ServerCounters, counters_delta, scrape
from tandem.bench.loadgen.stats import Slo, summarize
from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import (
    LENGTH_DISTRIBUTIONS, JsonlDataset, LengthDist, LongPromptMix, MultiTurnChat, RandomWorkload,
    SharedDocumentRAG, Workload,
)

WORKLOADS = ("random", "chat", "rag", "long-mix", "jsonl")
# Mean lengths when not given, in tokens; when the served model's context is known (its
# /v1/models card), each is shrunk to fit it (`resolve_lengths`).
DEFAULT_LENGTHS = {"input_tokens": 512, "output_tokens": 128, "document_tokens": 2000, "long_tokens": 8000}
RAG_SCAFFOLD_TOKENS = 16  # "Document:", "Question:", "Answer:" around a RAG prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="bench_mode", required=True, metavar="{run,compare}")
    run_parser = modes.add_parser("run", help="load-test an OpenAI-compatible endpoint",
                                  description="Load-test an OpenAI-compatible endpoint and write report.json, "
                                              "report.md and PNG plots.")
    _add_run_arguments(run_parser)
    compare_parser = modes.add_parser("compare", help="compare two report.json files side by side",
                                      description="Print two reports side by side with B/A ratios.")
    compare_parser.add_argument("report_a", type=Path, help="baseline report.json (A)")
    compare_parser.add_argument("report_b", type=Path, help="report.json to compare (B)")
    compare_parser.add_argument("--out", type=Path, help="also write the table to this markdown file (default: none)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8000")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                        help="/v1/chat/completions or /v1/completions")
    target.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    target.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY if set, else none)")
    target.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    target.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    target.add_argument("--ignore-eos", action="store_true",
                        help="ask for exactly max_tokens (vLLM/SGLang/Tandem extension `ignore_eos`)")
    target.add_argument("--metrics-url", action="append", default=None,
                        help="Prometheus endpoint(s) to scrape before/after each stage (repeatable; default: URL/metrics)")
    target.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")

    workload = parser.add_argument_group("workload")
    workload.add_argument("--workload", choices=WORKLOADS, default="random", help="what the sessions send")
    workload.add_argument("--tokenizer", help="local Hugging Face tokenizer folder for exact token counts (default: "
                                              "the served model's folder when /v1/models names one that is on this "
                                              "machine, else words approximate tokens)")
    workload.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals")
    workload.add_argument("--input-tokens", type=int,
                          help="mean prompt / user-turn length (random, chat, long-mix) (default: 512, or a quarter "
                               "of the model's context if that is less)")
    workload.add_argument("--output-tokens", type=int,
                          help="mean max_tokens (default: 128, or an eighth of the model's context if that is less)")
    workload.add_argument("--length-dist", choices=LENGTH_DISTRIBUTIONS, default="fixed",
                          help="distribution of prompt and output lengths around their means")
    workload.add_argument("--length-spread", type=float, default=0.0,
                          help="uniform half-width or normal/lognormal CV, as a fraction of the mean")
    workload.add_argument("--turns", default="3-6", help="chat: turns per conversation, N or MIN-MAX")
    workload.add_argument("--think-time", type=float, default=1.0, help="chat/jsonl: mean think time between turns, s")
    workload.add_argument("--system-prompt-tokens", type=int, default=0, help="chat: shared system prompt length")
    workload.add_argument("--documents", type=int, default=4, help="rag: number of documents")
    workload.add_argument("--document-tokens", type=int,
                          help="rag: tokens per document (default: 2000, or what fits the model's context)")
    workload.add_argument("--question-tokens", type=int, default=32, help="rag: mean question length")
    workload.add_argument("--popularity-skew", type=float, default=0.0, help="rag: Zipf exponent of document choice")
    workload.add_argument("--long-every", type=int, default=20, help="long-mix: every Nth request is long")
    workload.add_argument("--long-tokens", type=int,
                          help="long-mix: long prompt length (default: 8000, or what fits the model's context)")
    workload.add_argument("--long-output-tokens", type=int, default=16, help="long-mix: max_tokens of long prompts")
    workload.add_argument("--dataset", type=Path,
                          help="jsonl: ShareGPT-style or {\"prompt\": ...} JSONL file (default: none; jsonl needs it)")
    workload.add_argument("--max-turns", type=int, default=1, help="jsonl: user turns replayed per conversation")

    load = parser.add_argument_group("load")
    load.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                      help="how sessions start: open loop (poisson, fixed, gamma) or closed loop")
    load.add_argument("--rate", default="inf", help="sessions/s (open loop); comma list sweeps, e.g. 1,2,4,8")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    load.add_argument("--concurrency", default=None,
                      help="closed loop: concurrent sessions (comma list sweeps); open loop: cap on sessions in flight "
                           "(default: none; closed loop needs it)")
    load.add_argument("--num-requests", type=int, help="measured requests per stage (default: 100 unless --duration)")
    load.add_argument("--duration", type=float, help="seconds per stage, warm-up included (default: none)")
    load.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of statistics")

    output = parser.add_argument_group("output")
    output.add_argument("--slo", action="append", default=[], type=Slo.parse, metavar="METRIC=MS",
                        help="goodput SLO, repeatable: ttft_ms=500, tpot_ms=50, itl_ms=200, e2e_ms=10000 (default: none)")
    output.add_argument("--out", type=Path, help="output folder (default: tandem-bench/<time>-<workload>)")
    output.add_argument("--label", help="name of this run in reports and comparisons (default: WORKLOAD@URL)")
    output.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")


def _numbers(text: str, name: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--{name} {text!r}: expected a number or a comma list") from exc
    if not values or any(v <= 0 or math.isnan(v) for v in values):
        raise ValueError(f"--{name} {text!r}: values must be > 0")
    return values


def _request_count(args: argparse.Namespace) -> int | None:
    """Measured requests per stage: as given, else 100 unless only a duration bounds the stage."""
    if args.num_requests is not None or args.duration is not None:
        return args.num_requests
    return 100


def stage_arrivals(args: argparse.Namespace) -> list[ArrivalProcess]:
    if args.arrival == "closed":
        if args.concurrency is None:
            raise ValueError("--arrival closed needs --concurrency N (or a comma list)")
        return [make_arrival("closed", 0.0, concurrency=int(c)) for c in _numbers(args.concurrency, "concurrency")]
    return [make_arrival(args.arrival, rate, burstiness=args.burstiness) for rate in _numbers(args.rate, "rate")]


def _open_loop_cap(args: argparse.Namespace) -> int | None:
    if args.arrival == "closed" or args.concurrency is None:
        return None
    caps = _numbers(args.concurrency, "concurrency")
    if len(caps) != 1:
        raise ValueError("an open-loop run takes one --concurrency cap (sweep --rate instead)")
    return int(caps[0])


def resolve_lengths(args: argparse.Namespace, max_model_len: int | None) -> dict[str, int]:
    """The workload's mean lengths: as given, else the defaults, each shrunk to fit the model's
    context when it is known. ValueError when lengths that were given cannot fit it."""
    lengths = {name: getattr(args, name) for name in DEFAULT_LENGTHS}
    given = {name for name, value in lengths.items() if value is not None}
    for name, value in lengths.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    ctx = max_model_len
    if ctx is None:
        return {name: DEFAULT_LENGTHS[name] if value is None else value for name, value in lengths.items()}
    margin = CONTEXT_MARGIN_TOKENS
    if lengths["output_tokens"] is None:
        lengths["output_tokens"] = max(1, min(DEFAULT_LENGTHS["output_tokens"], ctx // 8))
    if lengths["input_tokens"] is None:
        lengths["input_tokens"] = max(1, min(DEFAULT_LENGTHS["input_tokens"], ctx // 4))
    if lengths["document_tokens"] is None:
        room = ctx - args.question_tokens - lengths["output_tokens"] - margin - RAG_SCAFFOLD_TOKENS
        lengths["document_tokens"] = max(1, min(DEFAULT_LENGTHS["document_tokens"], room))
    if lengths["long_tokens"] is None:
        lengths["long_tokens"] = max(1, min(DEFAULT_LENGTHS["long_tokens"], ctx - args.long_output_tokens - margin))

    def must_fit(total: int, what: str, names: set[str]) -> None:
        if total + margin > ctx and names & given:
            raise ValueError(f"{what} ({total} tokens, plus {margin} for the template) does not fit the served "
                             f"model's context of {ctx} tokens")

    out = lengths["output_tokens"]
    if args.workload == "random":
        must_fit(lengths["input_tokens"] + out, "--input-tokens + --output-tokens", {"input_tokens", "output_tokens"})
    elif args.workload == "chat":
        must_fit(args.system_prompt_tokens + lengths["input_tokens"] + out,
                 "a first turn (--system-prompt-tokens + --input-tokens + --output-tokens)",
                 {"input_tokens", "output_tokens"} | ({"input_tokens"} if args.system_prompt_tokens else set()))
    elif args.workload == "rag":
        must_fit(lengths["document_tokens"] + args.question_tokens + out + RAG_SCAFFOLD_TOKENS,
                 "a RAG prompt (--document-tokens + --question-tokens + --output-tokens)",
                 {"document_tokens", "output_tokens"})
    elif args.workload == "long-mix":
        must_fit(lengths["long_tokens"] + args.long_output_tokens, "--long-tokens + --long-output-tokens",
                 {"long_tokens"})
        must_fit(lengths["input_tokens"] + out, "--input-tokens + --output-tokens", {"input_tokens", "output_tokens"})
    return lengths


def build_workload(args: argparse.Namespace, counter: TokenCounter, max_model_len: int | None = None) -> Workload:
    lengths = resolve_lengths(args, max_model_len)
    output_len = LengthDist(lengths["output_tokens"], args.length_dist, args.length_spread)
    input_len = LengthDist(lengths["input_tokens"], args.length_dist, args.length_spread)
    if args.workload == "random":
        return RandomWorkload(counter, input_len, output_len, seed=args.seed)
    if args.workload == "chat":
        low, _, high = str(args.turns).partition("-")
        return MultiTurnChat(counter, input_len, output_len, min_turns=int(low), max_turns=int(high or low),
                             think_time_s=args.think_time, system_prompt_tokens=args.system_prompt_tokens, seed=args.seed)
    if args.workload == "rag":
        question_len = LengthDist(args.question_tokens, args.length_dist, args.length_spread)
        return SharedDocumentRAG(counter, args.documents, lengths["document_tokens"], question_len, output_len,
                                 popularity_skew=args.popularity_skew, seed=args.seed)
    if args.workload == "long-mix":
        return LongPromptMix(counter, input_len, output_len, lengths["long_tokens"], long_every=args.long_every,
                             long_output_tokens=args.long_output_tokens, seed=args.seed)
    if args.dataset is None:
        raise ValueError("--workload jsonl needs --dataset FILE")
    return JsonlDataset(counter, args.dataset, max_turns=args.max_turns, default_max_tokens=lengths["output_tokens"],
                        think_time_s=args.think_time if args.max_turns > 1 else 0.0, seed=args.seed)


def served_model_tokenizer(served: ServedModel) -> str | None:
    """The served model's own folder, when its card names one on this machine with a tokenizer."""
    root = served.root
    if root and os.path.isdir(root) and any(os.path.isfile(os.path.join(root, name))
                                             for name in ("tokenizer.json", "tokenizer_config.json")):
        return root
    return None


async def _run_benchmark(args: argparse.Namespace, model: str, counter: TokenCounter, workload: Workload,
                         arrivals: list[ArrivalProcess], max_model_len: int | None = None,
                         ) -> list[tuple[StageRun, StageReport]]:
    client_config = ClientConfig(args.url, model, args.endpoint, args.api_key, args.request_timeout,
                                 args.temperature, args.ignore_eos)
    metrics_urls = [] if args.no_metrics else (args.metrics_url or [root_url(args.url) + "/metrics"])
    num_requests = _request_count(args)
    cap = _open_loop_cap(args)
    stages: list[tuple[StageRun, StageReport]] = []
    async with OpenAIClient(client_config, counter) as client:
        for number, arrival in enumerate(arrivals, 1):
            label = f"stage {number}/{len(arrivals)}"
            before = await scrape(metrics_urls) if metrics_urls else ServerCounters()
            total = None if num_requests is None else num_requests + args.warmup
            progress = Progress(f"{label} {arrival.describe()}", total, args.duration, enabled=not args.no_progress)
            progress_task = asyncio.create_task(progress.run())
            try:
                stage_run = await run_stage(client, workload.sessions(), counter, StageConfig(
                    arrival, num_requests, args.duration, args.warmup, cap, args.seed, max_model_len), progress)
            finally:
                progress_task.cancel()
                await asyncio.gather(progress_task, return_exceptions=True)
            server = counters_delta(before, await scrape(metrics_urls)) if metrics_urls else None
            summary = summarize(label, arrival.describe(), arrival.offered_load, stage_run.results, args.slo)
            stages.append((stage_run, StageReport(summary, server, tuple(RequestRecord.of(r) for r in stage_run.results),
                                                  stage_run.over_context)))
    return stages


def _run_compare(args: argparse.Namespace) -> int:
    label_a, label_b, rows = compare_reports(args.report_a, args.report_b)
    table = render_comparison(label_a, label_b, rows)
    print(table, end="")
    if args.out:
        args.out.write_text(f"# {label_a} (A) vs {label_b} (B)\n\n" + table)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench_mode == "compare":
        return _run_compare(args)
    args.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    try:
        arrivals = stage_arrivals(args)
        _open_loop_cap(args)
    except ValueError as exc:
        print(f"tandem bench: {exc}", file=sys.stderr)
        return 2
    try:  # the card says the model's context length (and where its tokenizer is)
        served = asyncio.run(discover_model(args.url, args.api_key, model=args.model))
    except (aiohttp.ClientError, TimeoutError, RuntimeError, KeyError, ValueError) as exc:
        if args.model is None:
            print(f"tandem bench: cannot list models at {root_url(args.url)}/v1/models ({exc}); pass --model",
                  file=sys.stderr)
            return 2
        served = ServedModel(args.model)  # named: run without its card, so without its context length
    own_tokenizer = None if args.tokenizer else served_model_tokenizer(served)
    try:
        counter = TokenCounter(args.tokenizer or own_tokenizer)
        workload = build_workload(args, counter, served.max_model_len)
    except (ValueError, OSError) as exc:
        print(f"tandem bench: {exc}", file=sys.stderr)
        return 2
    model = served.id
    started = dt.datetime.now(dt.timezone.utc)
    stages = asyncio.run(_run_benchmark(args, model, counter, workload, arrivals, served.max_model_len))

    out_dir: Path = args.out or Path("tandem-bench") / f"{started:%Y%m%d-%H%M%S}-{args.workload}"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_kind = "concurrency" if args.arrival == "closed" else "rate (sessions/s)"
    run_info = RunInfo(
        label=args.label or f"{args.workload}@{root_url(args.url)}", url=args.url, endpoint=args.endpoint, model=model,
        workload=workload.describe(),
        token_counting=counter.method + (" (the served model's own, from /v1/models)" if own_tokenizer else ""),
        arrival=f"{args.arrival}, sweep over {load_kind}" if len(arrivals) > 1 else arrivals[0].describe(),
        seed=args.seed, num_requests=_request_count(args),
        duration_s=args.duration, warmup_requests=args.warmup, started_at=started.isoformat(timespec="seconds"),
        command=shlex.join(["tandem", "bench", "run", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "run"] else "(API call)",
        max_model_len=served.max_model_len,
    )
    report = BenchReport(run_info, tuple(stage_report for _, stage_report in stages))
    write_json(report, out_dir / "report.json")
    plot_files: list[str] = []
    if not args.no_plots:
        from tandem.bench.loadgen.plots import plot_latency_cdfs, plot_sweep  # matplotlib: only when plotting

        plot_latency_cdfs([(report_.summary, stage_run.results) for stage_run, report_ in stages], out_dir / "latency_cdf.png")
        plot_files.append("latency_cdf.png")
        if len(stages) > 1:
            plot_sweep([report_.summary for _, report_ in stages], out_dir / "sweep.png", load_kind)
            plot_files.append("sweep.png")
    markdown = render_markdown(report, plot_files)
    (out_dir / "report.md").write_text(markdown)
    summary_table = markdown.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0]
    print(summary_table)
    print(f"\nreport: {out_dir / 'report.md'}  (json: {out_dir / 'report.json'})")
    return 0 if any(stage_report.summary.succeeded for _, stage_report in stages) else 1
