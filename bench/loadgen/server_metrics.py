"""The server's Prometheus `/metrics`, scraped before and after a stage: prefix-cache hit rate
and KV-transfer volume over the stage, where the server exposes them.

One quantity is often exported under several names at once, with the same value: Tandem
exports `tandem_prefix_cache_queries_total` and vLLM's `vllm:prefix_cache_queries_total`; vLLM
has exported `vllm:gpu_prefix_cache_queries` beside `vllm:prefix_cache_queries`; Ray re-exports
a worker's `tandem_*` as `ray_tandem_*`. Summing them would count the quantity once per name,
so for each quantity ONE name is counted: the first, in a fixed order of preference (`_rank`),
that any scraped endpoint exposes; its samples are summed over labels (replicas) and over the
scraped URLs. Missing metrics or an unreachable endpoint leave the numbers None and say why."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

_PREFIXES = ("ray_", "vllm:", "tandem_", "tandem:", "sglang:", "sglang_")
# Base names per quantity, preferred first; and the prefixes (as written before the base name),
# preferred first: the server's own name before a re-export through Ray.
_HITS = ("prefix_cache_hits_total", "prefix_cache_hits", "gpu_prefix_cache_hits_total", "gpu_prefix_cache_hits")
_QUERIES = ("prefix_cache_queries_total", "prefix_cache_queries", "gpu_prefix_cache_queries_total",
            "gpu_prefix_cache_queries")
_KV_BYTES = ("kv_transfer_bytes_total", "kv_transfer_bytes")
_PREFIX_ORDER = ("tandem_", "tandem:", "vllm:", "sglang:", "sglang_", "", "ray_tandem_", "ray_tandem:", "ray_vllm:",
                 "ray_")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: str  # the raw `{...}` text; only summed over here
    value: float


def parse_prometheus_text(text: str) -> list[MetricSample]:
    """Samples of the Prometheus text exposition format (comments and bad lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        samples.append(MetricSample(match.group(1), match.group(2) or "", value))
    return samples


def _base_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


@dataclass(frozen=True)
class ServerCounters:
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    kv_transfer_bytes: float | None = None
    error: str | None = None  # why nothing could be scraped
    names: tuple[str, ...] = ()  # the metric names counted


def _rank(name: str, bases: Sequence[str]) -> tuple[int, int] | None:
    """Where `name` stands among the names of one quantity (lower: preferred); None: not one."""
    base = _base_name(name)
    if base not in bases:
        return None
    prefix = name[: len(name) - len(base)]
    prefix_rank = _PREFIX_ORDER.index(prefix) if prefix in _PREFIX_ORDER else len(_PREFIX_ORDER)
    return prefix_rank, bases.index(base)


def _one_series(samples: Sequence[MetricSample], bases: Sequence[str]) -> tuple[float | None, str | None]:
    """The sum of the samples of the preferred name of one quantity, and that name."""
    ranked = {sample.name: rank for sample in samples if (rank := _rank(sample.name, bases)) is not None}
    if not ranked:
        return None, None
    chosen = min(ranked, key=lambda name: (ranked[name], name))
    total = sum(s.value for s in samples if s.name == chosen and math.isfinite(s.value))
    return total, chosen


def counters_from_samples(samples: Sequence[MetricSample]) -> ServerCounters:
    hits, hits_name = _one_series(samples, _HITS)
    queries, queries_name = _one_series(samples, _QUERIES)
    kv_bytes, kv_name = _one_series(samples, _KV_BYTES)
    return ServerCounters(hits, queries, kv_bytes,
                          names=tuple(name for name in (queries_name, hits_name, kv_name) if name))


async def scrape(urls: Sequence[str], timeout_s: float = 5.0) -> ServerCounters:
    """Sum of the counters over every URL; an unreachable URL makes the whole scrape an error
    (a partial sum would make a wrong delta)."""
    samples: list[MetricSample] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            for url in urls:
                async with session.get(url) as response:
                    if response.status != 200:
                        return ServerCounters(error=f"{url}: HTTP {response.status}")
                    samples.extend(parse_prometheus_text(await response.text()))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ServerCounters(error=f"{type(exc).__name__}: {exc}")
    return counters_from_samples(samples)


@dataclass(frozen=True)
class ServerMetricsDelta:
    prefix_cache_hits: float | None
    prefix_cache_queries: float | None
    prefix_cache_hit_rate: float | None
    kv_transfer_bytes: float | None
    note: str  # what was found, or why not


def _difference(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or after < before:  # absent, or a counter reset
        return None
    return after - before


def counters_delta(before: ServerCounters, after: ServerCounters) -> ServerMetricsDelta:
    if before.error or after.error:
        return ServerMetricsDelta(None, None, None, None, f"metrics not scraped: {before.error or after.error}")
    hits = _difference(before.prefix_cache_hits, after.prefix_cache_hits)
    queries = _difference(before.prefix_cache_queries, after.prefix_cache_queries)
    kv_bytes = _difference(before.kv_transfer_bytes, after.kv_transfer_bytes)
    hit_rate = hits / queries if hits is not None and queries else None
    found = [name for name, value in (("prefix cache", queries), ("KV transfer", kv_bytes)) if value is not None]
    note = (f"found: {', '.join(found)} (counted: {', '.join(after.names)})" if found
            else "server exposes no prefix-cache or KV-transfer counters")
    if any(_difference(b, a) is None and b is not None and a is not None for b, a in (
            (before.prefix_cache_hits, after.prefix_cache_hits),
            (before.prefix_cache_queries, after.prefix_cache_queries),
            (before.kv_transfer_bytes, after.kv_transfer_bytes))):
        note += "; a counter went down (server restarted?), its delta is left out"
    return ServerMetricsDelta(hits, queries, hit_rate, kv_bytes, note)
