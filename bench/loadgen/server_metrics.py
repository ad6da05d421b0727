"""The server's Prometheus `/metrics`, scraped before and after a stage: prefix-cache hit rate
and KV-transfer volume over the stage, where the server exposes them.

Counter names are matched after stripping known prefixes (`vllm:`, `tandem_`, `tandem:`,
`sglang:`, `ray_`), so `vllm:prefix_cache_hits_total`, `tandem_prefix_cache_hits_total` and Ray's
re-exported `ray_tandem_prefix_cache_hits_total` all count; samples of one name are summed
over labels and over every scraped URL. Missing metrics or an unreachable endpoint leave the
numbers None and say why."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

_PREFIXES = ("ray_", "vllm:", "tandem_", "tandem:", "sglang:", "sglang_")
_HITS = {"prefix_cache_hits_total", "prefix_cache_hits", "gpu_prefix_cache_hits_total", "gpu_prefix_cache_hits"}
_QUERIES = {"prefix_cache_queries_total", "prefix_cache_queries", "gpu_prefix_cache_queries_total",
            "gpu_prefix_cache_queries"}
_KV_BYTES = {"kv_transfer_bytes_total", "kv_transfer_bytes"}

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


def counters_from_samples(samples: Sequence[MetricSample]) -> ServerCounters:
    totals: dict[str, float] = {}
    for sample in samples:
        base = _base_name(sample.name)
        for key, names in (("hits", _HITS), ("queries", _QUERIES), ("kv", _KV_BYTES)):
            if base in names and math.isfinite(sample.value):
                totals[key] = totals.get(key, 0.0) + sample.value
    return ServerCounters(totals.get("hits"), totals.get("queries"), totals.get("kv"))


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
    note = f"found: {', '.join(found)}" if found else "server exposes no prefix-cache or KV-transfer counters"
    if any(_difference(b, a) is None and b is not None and a is not None for b, a in (
            (before.prefix_cache_hits, after.prefix_cache_hits),
            (before.prefix_cache_queries, after.prefix_cache_queries),
            (before.kv_transfer_bytes, after.kv_transfer_bytes))):
        note += "; a counter went down (server restarted?), its delta is left out"
    return ServerMetricsDelta(hits, queries, hit_rate, kv_bytes, note)
