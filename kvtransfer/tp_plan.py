"""Which head slices go from which prefill rank to which decode rank, under tensor parallelism.

With tensor parallelism each rank's KV cache holds a range of the model's KV heads: tp <= K
ranks hold K/tp heads each; tp > K ranks hold one head each, tp/K ranks holding the same head
(replicas). When the prefill and decode groups use different degrees, a decode rank's heads come
from several prefill ranks, or from one replica among several. `plan_head_parts` says which:
each `HeadPart` is one transfer (one `KVSender.begin(..., src_heads, dst_head_start)` on the
src rank, one of the `head_ranges` of the dst rank's `KVReceiver.expect`). Pure: no torch, no
I/O, so both groups compute the same plan from the same inputs without talking.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadPart:
    src_rank: int
    dst_rank: int
    src_heads: tuple[int, int]  # local to the src rank's cache
    dst_heads: tuple[int, int]  # local to the dst rank's cache


def plan_head_parts(src_kv_heads: Sequence[tuple[int, int]],
                    dst_kv_heads: Sequence[tuple[int, int]]) -> list[HeadPart]:
    """The transfers that fill every dst rank's heads exactly once, sorted by (dst_rank, dst_heads).

    `src_kv_heads[r]` / `dst_kv_heads[r]`: the global KV heads [lo, hi) rank r of the sending /
    receiving group holds. A head several src ranks hold comes from replica `dst_rank % replicas`
    (replicas in rank order), so the dst ranks that need one head spread over its replicas.
    Adjacent heads from the same src rank form one part: with contiguous ranges, at most one part
    per (src rank, dst rank). A dst head that no src rank holds raises ValueError (the two groups
    shard different models)."""
    src = _check_ranges(src_kv_heads, "src_kv_heads")
    dst = _check_ranges(dst_kv_heads, "dst_kv_heads")
    parts: list[HeadPart] = []
    for dst_rank, (lo, hi) in enumerate(dst):
        runs: list[list[int]] = []  # [src_rank, first global head, end], in head order
        for head in range(lo, hi):
            holders = [rank for rank, (a, b) in enumerate(src) if a <= head < b]
            if not holders:
                raise ValueError(f"KV head {head} of dst rank {dst_rank} (holding [{lo}, {hi})) is held by "
                                 f"no src rank (src ranges {src}): the two groups shard different models")
            chosen = holders[dst_rank % len(holders)]
            if runs and runs[-1][0] == chosen and runs[-1][2] == head:
                runs[-1][2] = head + 1
            else:
                runs.append([chosen, head, head + 1])
        for src_rank, start, end in runs:
            base = src[src_rank][0]
            parts.append(HeadPart(src_rank, dst_rank, (start - base, end - base), (start - lo, end - lo)))
    return parts


def parts_for_dst(parts: Sequence[HeadPart], dst_rank: int) -> list[tuple[int, int]]:
    """The `head_ranges` dst rank `dst_rank`'s receiver expects (sorted)."""
    return sorted(part.dst_heads for part in parts if part.dst_rank == dst_rank)


def parts_from_src(parts: Sequence[HeadPart], src_rank: int) -> list[HeadPart]:
    """The transfers src rank `src_rank` makes, sorted by (dst_rank, dst_heads)."""
    return sorted((part for part in parts if part.src_rank == src_rank),
                  key=lambda part: (part.dst_rank, part.dst_heads))


def _check_ranges(ranges: Sequence[tuple[int, int]], what: str) -> list[tuple[int, int]]:
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence) or not ranges:
        raise ValueError(f"{what} must be a non-empty sequence of (lo, hi) head ranges, got {ranges!r}")
    out = []
    for rank, r in enumerate(ranges):
        pair = tuple(r) if isinstance(r, (tuple, list)) else ()
        if len(pair) != 2 or any(type(h) is not int for h in pair) or not 0 <= pair[0] < pair[1]:
            raise ValueError(f"{what}[{rank}] must be (lo, hi) ints with 0 <= lo < hi, got {r!r}")
        out.append(pair)
    return out
