"""The host tier of the prefix cache: full KV blocks about to be evicted from the device pool are
copied to a host-memory pool, indexed by the same block-hash chain, and copied back on a hit
instead of being recomputed (SGLang's HiCache write-back and vLLM's CPU offloading do the same).

Owns the host pool (its blocks' hashes, an LRU of loadable blocks, per-block pins), the copies in
flight each way, and the tier's counters. The block manager keeps owning device blocks: a device
block is pinned (`BlockManager.pin`) for as long as a copy reads or writes it, so it is never
handed out mid-copy.

Out (device -> host, "offload"). At the end of each `Scheduler.schedule`, `offload` looks at the
front of the device free list, where the next evictions come from (`eviction_candidates`), and
copies the cached blocks there that the host tier does not hold yet, in one batch, on a side
stream, before the step is launched: the copy runs beside the step's forward pass and never
blocks it. The blocks stay cached on the device meanwhile (still hits), pinned; once copied they
return to the front of the free list, backed up. When the tier is busy (copies still in flight,
or no host block free of pins) nothing waits: blocks evicted before they were copied are lost, as
without the tier. It pins no more device blocks than the next step can spare (`reserve`).

In (host -> device, "reload"). The scheduler asks `match` how far a waiting sequence's prefix
continues in the host tier after its device hits; if it does, the sequence gets device blocks for
the whole match, `start_reload` copies the host blocks into them (batched, side stream), and the
sequence waits off the batch while others run, like a sequence waiting for KV from another
worker. `poll` hands back the sequences whose reload landed; the scheduler moves them into the
running batch with those blocks computed. A cancelled reload (`cancel_reload`) keeps its device
blocks pinned until the copy is done, so nothing lands in a block after someone else got it.

Host blocks: each is free, being written (`_storing`, not loadable yet) or loadable (`_ready`, in
LRU order; `touch` on every hit). A host block read by a reload is pinned and not evicted. The
tier is inclusive: a reloaded block stays in host memory too, so its next eviction from the
device costs no copy.

Events: host blocks entering and leaving are `BlocksStored` / `BlocksRemoved` with
`Tier.HOST`, queued in the block manager's event list (`BlockManager.record`) so the router sees
both tiers in the order things happened.

Copies go through a `BlockCopier`: `TorchBlockCopier` (CUDA: pinned host memory, one side stream
per direction, CUDA events; CPU device: a second pool of CPU tensors, copied at once).
"""
from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import Sequence
from tandem.protocol.kv_events import BlocksRemoved, BlocksStored, Tier
from tandem.protocol.prefix_hash import ROOT_HASH, hash_block

logger = logging.getLogger(__name__)

MAX_OFFLOADS_IN_FLIGHT = 2  # offload batches; beyond this the tier is busy and evictions are dropped
STAGING_BYTES = 32 * 1024**2  # device staging per copy chunk (bounds a copy's extra device memory)


# --------------------------------------------------------------------------------------- copies
class CopyHandle(Protocol):
    def done(self) -> bool:
        """Whether the copy has landed (never blocks)."""

    def wait(self) -> None:
        """Block until it has."""

    def seconds(self) -> float:
        """How long the copy itself took; valid once done."""


class BlockCopier(Protocol):
    bytes_per_block: int
    synchronous: bool  # every copy has landed when copy_out / copy_in returns (the CPU device)

    def copy_out(self, device_ids: list[int], host_ids: list[int]) -> CopyHandle:
        """Device blocks -> host blocks (same order), after everything queued on the device so far."""

    def copy_in(self, host_ids: list[int], device_ids: list[int]) -> CopyHandle:
        """Host blocks -> device blocks (same order), after everything queued on the device so far."""


class _Done:
    """A copy that ran synchronously."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass

    def seconds(self) -> float:
        return self._seconds


class _CudaCopy:
    """A copy queued on a side stream; `end` marks it landed. Keeps its buffers alive until then."""

    def __init__(self, start, end, keep: list[torch.Tensor]) -> None:
        self.start, self.end, self._keep = start, end, keep
        self._done = False

    def done(self) -> bool:
        if not self._done and self.end.query():
            self._done, self._keep = True, []
        return self._done

    def wait(self) -> None:
        self.end.synchronize()
        self._done, self._keep = True, []

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1000.0


class TorchBlockCopier:
    """Copies whole blocks between the device KV cache [layers, 2, blocks, block_size, heads,
    head_dim] and a host pool laid out block-major [host_blocks, layers, 2, block_size, heads,
    head_dim], so a host block is one contiguous run of bytes (one DMA per run of host blocks).

    On CUDA the host pool is pinned and each direction has its own stream (PCIe copies both ways
    at once); a copy first waits for the work already queued on the compute stream (the blocks'
    KV is written there), then moves chunks of at most `STAGING_BYTES` through a device staging
    buffer (gather / scatter on the device, one DMA per contiguous run of host blocks)."""

    def __init__(self, kv_cache: torch.Tensor, num_host_blocks: int) -> None:
        layers, two, _, block_size, heads, head_dim = kv_cache.shape
        # Blocks move as bytes: torch has no index_copy_ for FP8 tensors, and a byte is a byte.
        self.kv_cache = kv_cache.view(torch.uint8) if kv_cache.element_size() == 1 else kv_cache
        self.block_shape = (layers, two, block_size, heads, head_dim)
        self.cuda = kv_cache.is_cuda
        # Never read before written, so not zeroed (pinning tens of GB is slow enough already).
        self.host_cache = torch.empty((num_host_blocks, *self.block_shape), dtype=self.kv_cache.dtype)
        self._registered = self.cuda and _pin_exactly(self.host_cache)
        if self.cuda and not self._registered:
            self.host_cache = self.host_cache.pin_memory()
        self.bytes_per_block = self.host_cache[0].numel() * self.host_cache.element_size()
        self.synchronous = not self.cuda
        self.chunk_blocks = max(1, STAGING_BYTES // self.bytes_per_block)
        if self.cuda:
            self._out_stream = torch.cuda.Stream(kv_cache.device)
            self._in_stream = torch.cuda.Stream(kv_cache.device)

    def __del__(self) -> None:
        if getattr(self, "_registered", False):
            try:
                torch.cuda.cudart().cudaHostUnregister(self.host_cache.data_ptr())
            except Exception:  # interpreter shutdown: the process's memory goes with it
                pass

    def copy_out(self, device_ids: list[int], host_ids: list[int]) -> CopyHandle:
        if not self.cuda:
            t0 = time.perf_counter()
            dev = torch.tensor(device_ids, dtype=torch.int64)
            self.host_cache.index_copy_(0, torch.tensor(host_ids, dtype=torch.int64),
                                        self.kv_cache.index_select(2, dev).movedim(2, 0))
            return _Done(time.perf_counter() - t0)
        return self._cuda_copy(self._out_stream, device_ids, host_ids, to_host=True)

    def copy_in(self, host_ids: list[int], device_ids: list[int]) -> CopyHandle:
        if not self.cuda:
            t0 = time.perf_counter()
            host = torch.tensor(host_ids, dtype=torch.int64)
            self.kv_cache.index_copy_(2, torch.tensor(device_ids, dtype=torch.int64),
                                      self.host_cache.index_select(0, host).movedim(0, 2))
            return _Done(time.perf_counter() - t0)
        return self._cuda_copy(self._in_stream, device_ids, host_ids, to_host=False)

    def _cuda_copy(self, stream, device_ids: list[int], host_ids: list[int], to_host: bool) -> CopyHandle:
        device = self.kv_cache.device
        stream.wait_stream(torch.cuda.current_stream(device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        keep: list[torch.Tensor] = []
        with torch.cuda.stream(stream):
            start.record()
            # Indices through pinned memory: a pageable host-to-device copy would wait for the
            # compute stream (this stream depends on it), stalling the engine thread.
            index = torch.tensor(device_ids, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
            rows = min(self.chunk_blocks, len(device_ids))
            staging = torch.empty((rows, *self.block_shape), dtype=self.kv_cache.dtype, device=device)
            keep += [index, staging]
            for lo in range(0, len(device_ids), rows):
                hi = min(lo + rows, len(device_ids))
                part = staging[: hi - lo]
                if to_host:
                    part.copy_(self.kv_cache.index_select(2, index[lo:hi]).movedim(2, 0))
                    for i, j, h in _runs(host_ids, lo, hi):
                        self.host_cache[h : h + j - i].copy_(part[i - lo : j - lo], non_blocking=True)
                else:
                    for i, j, h in _runs(host_ids, lo, hi):
                        part[i - lo : j - lo].copy_(self.host_cache[h : h + j - i], non_blocking=True)
                    self.kv_cache.index_copy_(2, index[lo:hi], part.movedim(0, 2))
            end.record()
        return _CudaCopy(start, end, keep)


def _pin_exactly(tensor: torch.Tensor) -> bool:
    """Page-lock a host tensor where it is (cudaHostRegister). `pin_memory()` goes through
    torch's caching host allocator, which rounds a request up to a power of two: a 40 GiB host
    tier would lock 64 GiB."""
    try:
        error = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    except Exception as exc:  # no such binding in this build
        logger.warning("cudaHostRegister unavailable (%r): the host tier uses torch's pinned allocator", exc)
        return False
    if int(error) != 0:
        clear = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
        if clear is not None:
            clear()  # else a later kernel launch check reports this error as its own
        logger.warning("cudaHostRegister failed (%s): the host tier uses torch's pinned allocator", error)
        return False
    return True


def _runs(host_ids: list[int], lo: int, hi: int):
    """(i, j, first host id) for each run i..j of consecutive host ids within host_ids[lo:hi]."""
    i = lo
    while i < hi:
        j = i + 1
        while j < hi and host_ids[j] == host_ids[j - 1] + 1:
            j += 1
        yield i, j, host_ids[i]
        i = j


# ------------------------------------------------------------------------------- bookkeeping
@dataclass
class _Offload:
    handle: CopyHandle
    device_ids: list[int]
    host_ids: list[int]


@dataclass
class _Reload:
    seq: Sequence | None  # None once cancelled: the copy still lands, nobody resumes
    handle: CopyHandle
    device_ids: list[int]
    host_ids: list[int]
    device_pinned: bool = False  # cancelled mid-copy: its device blocks are pinned until it lands


@dataclass
class HostTierStats:
    """Cumulative counters (bytes, seconds, blocks, tokens) and the pool's size and use."""

    num_blocks: int = 0
    num_used_blocks: int = 0  # loadable or being written
    hit_tokens: int = 0  # prompt tokens reloaded instead of recomputed
    blocks_offloaded: int = 0
    blocks_reloaded: int = 0
    bytes_offloaded: int = 0  # device -> host
    bytes_reloaded: int = 0  # host -> device
    offload_seconds: float = 0.0  # sum of the copies' own durations
    reload_seconds: float = 0.0
    offloads_skipped_busy: int = 0  # steps whose eviction candidates were not copied (tier busy)
    blocks_evicted: int = 0  # host blocks dropped (LRU) to make room


class HostTier:
    def __init__(self, block_manager: BlockManager, copier: BlockCopier, num_blocks: int,
                 lookahead_blocks: int) -> None:
        """`num_blocks` host blocks; `lookahead_blocks`: how far into the device free list to
        look for blocks to copy out (about what the next steps may allocate)."""
        if num_blocks < 1 or lookahead_blocks < 1:
            raise ValueError("the host tier needs at least one block and a lookahead of at least one")
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.copier = copier
        self.num_blocks = num_blocks
        self.lookahead_blocks = lookahead_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_parent: list[int | None] = [None] * num_blocks
        self.pins = [0] * num_blocks  # reloads reading the block
        self._free: list[int] = list(range(num_blocks))  # a heap: low ids first, so runs stay contiguous
        self._ready: OrderedDict[int, int] = OrderedDict()  # hash -> host block, least recently used first
        self._storing: dict[int, int] = {}  # hash -> host block being written
        self._discard: set[int] = set()  # host blocks being written whose contents a reset dropped
        self._offloads: list[_Offload] = []
        self._reloads: list[_Reload] = []
        self.stats = HostTierStats(num_blocks=num_blocks)

    # ------------------------------------------------------------------------ queries
    @property
    def busy(self) -> bool:
        """Copies are in flight (their blocks are pinned until `poll` sees them land)."""
        return bool(self._offloads or self._reloads)

    @property
    def num_ready_blocks(self) -> int:
        return len(self._ready)

    @property
    def usage(self) -> float:
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def match(self, token_ids: list[int], device_hashes: list[int]) -> list[int]:
        """Host blocks continuing the chain after the device's prefix hits (`device_hashes`):
        the longest run of loadable blocks, leaving the last token to be computed."""
        if not self._ready:
            return []
        bs = self.block_size
        start = len(device_hashes)
        parent = device_hashes[-1] if device_hashes else ROOT_HASH
        found: list[int] = []
        for i in range(start, (len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            b = self._ready.get(h)
            if b is None or self.block_tokens[b] != tokens:
                break
            found.append(b)
            parent = h
        return found

    # ------------------------------------------------------------------------ out
    def offload(self, reserve: int) -> int:
        """Start copying the device blocks next in line for eviction that the host tier lacks;
        leaves at least `reserve` device blocks free while the copy is in flight (a synchronous
        copier's copies have landed before the next step allocates, so it pins none across a
        step and the reserve does not apply). Returns how many blocks it started."""
        bm = self.bm
        if self.copier.synchronous:
            reserve = 0
        candidates = bm.eviction_candidates(self.lookahead_blocks)
        todo = [b for b in candidates if bm.block_hash[b] not in self._ready and bm.block_hash[b] not in self._storing]
        if not todo:
            return 0
        if len(self._offloads) >= MAX_OFFLOADS_IN_FLIGHT:
            self.stats.offloads_skipped_busy += 1
            return 0
        todo = todo[: max(0, bm.num_free_blocks - reserve)]
        host_ids = self._allocate(len(todo))
        if len(host_ids) < len(todo):
            self.stats.offloads_skipped_busy += 1
        todo = todo[: len(host_ids)]
        if not todo:
            return 0
        for b, hb in zip(todo, host_ids):
            bm.pin(b)
            h = bm.block_hash[b]
            self.block_hash[hb] = h
            self.block_tokens[hb] = bm.block_tokens[b]
            self.block_parent[hb] = bm.block_parent[b]
            self._storing[h] = hb
        self._offloads.append(_Offload(self.copier.copy_out(todo, host_ids), todo, host_ids))
        return len(todo)

    def _allocate(self, n: int) -> list[int]:
        """Up to `n` free host blocks, evicting least recently used loadable ones (not pinned)."""
        got: list[int] = []
        while len(got) < n and self._free:
            got.append(heapq.heappop(self._free))
        if len(got) < n:
            for h, hb in list(self._ready.items()):
                if len(got) >= n:
                    break
                if self.pins[hb]:
                    continue
                del self._ready[h]
                self._forget(hb)
                self.stats.blocks_evicted += 1
                self.bm.record(BlocksRemoved([h], Tier.HOST))
                got.append(hb)
        got.sort()
        return got

    def _forget(self, hb: int) -> None:
        self.block_hash[hb] = None
        self.block_tokens[hb] = None
        self.block_parent[hb] = None

    # ------------------------------------------------------------------------ in
    def start_reload(self, seq: Sequence, host_ids: list[int], device_ids: list[int]) -> None:
        """Copy `host_ids` (from `match`) into the sequence's freshly allocated `device_ids`."""
        assert len(host_ids) == len(device_ids) and host_ids
        for hb in host_ids:
            self.pins[hb] += 1
            self._ready.move_to_end(self.block_hash[hb])  # touched: most recently used
        handle = self.copier.copy_in(list(host_ids), list(device_ids))
        self._reloads.append(_Reload(seq, handle, list(device_ids), list(host_ids)))
        self.stats.hit_tokens += len(host_ids) * self.block_size

    def cancel_reload(self, seq: Sequence) -> None:
        """The sequence is going away: its device blocks stay pinned until the copy has landed
        (call before the block manager frees them)."""
        for reload in self._reloads:
            if reload.seq is seq:
                reload.seq = None
                if not reload.handle.done():
                    for b in reload.device_ids:
                        self.bm.pin(b)
                    reload.device_pinned = True
                return

    # ------------------------------------------------------------------------ completion
    def poll(self) -> list[Sequence]:
        """Retire the copies that have landed; returns the sequences whose reload is done."""
        resumed: list[Sequence] = []
        if self._offloads:
            still = []
            for off in self._offloads:
                if off.handle.done():
                    self._offload_done(off)
                else:
                    still.append(off)
            self._offloads = still
        if self._reloads:
            still = []
            for reload in self._reloads:
                if reload.handle.done():
                    if self._reload_done(reload):
                        resumed.append(reload.seq)
                else:
                    still.append(reload)
            self._reloads = still
        return resumed

    def wait(self) -> None:
        """Block until the oldest copy in flight has landed (the engine has nothing else to do)."""
        pending = [c.handle for c in (*self._reloads, *self._offloads)]
        if pending:
            pending[0].wait()

    def _offload_done(self, off: _Offload) -> None:
        bm, stats = self.bm, self.stats
        for b, hb in zip(off.device_ids, off.host_ids):
            bm.unpin(b)
            h = self.block_hash[hb]
            del self._storing[h]
            if hb in self._discard:
                self._discard.discard(hb)
                self._forget(hb)
                heapq.heappush(self._free, hb)
                continue
            self._ready[h] = hb
            bm.record(BlocksStored([h], self.block_parent[hb], Tier.HOST))
        stats.blocks_offloaded += len(off.device_ids)
        stats.bytes_offloaded += len(off.device_ids) * self.copier.bytes_per_block
        stats.offload_seconds += off.handle.seconds()

    def _reload_done(self, reload: _Reload) -> bool:
        for hb in reload.host_ids:
            self.pins[hb] -= 1
        if reload.device_pinned:
            for b in reload.device_ids:
                self.bm.unpin(b)
        stats = self.stats
        stats.blocks_reloaded += len(reload.host_ids)
        stats.bytes_reloaded += len(reload.host_ids) * self.copier.bytes_per_block
        stats.reload_seconds += reload.handle.seconds()
        return reload.seq is not None

    # ------------------------------------------------------------------------ reset
    def reset(self) -> None:
        """Forget every loadable block no reload is reading; blocks being written are dropped
        when their copy lands."""
        for h, hb in list(self._ready.items()):
            if self.pins[hb] == 0:
                del self._ready[h]
                self._forget(hb)
                heapq.heappush(self._free, hb)
                self.bm.record(BlocksRemoved([h], Tier.HOST))
        self._discard.update(self._storing.values())

    # ------------------------------------------------------------------------ telemetry
    def snapshot(self) -> HostTierStats:
        stats = HostTierStats(**vars(self.stats))
        stats.num_used_blocks = self.num_blocks - len(self._free)
        return stats

    def device_pins(self) -> list[int]:
        """Device blocks pinned by copies in flight, one entry per pin (for invariant checks)."""
        pins = [b for off in self._offloads for b in off.device_ids]
        pins += [b for r in self._reloads if r.device_pinned for b in r.device_ids]
        return pins

    def check_invariants(self) -> None:
        """Each host block is in exactly one state; pins match the reloads in flight. For tests."""
        free = set(self._free)
        ready = set(self._ready.values())
        storing = set(self._storing.values())
        assert len(free) == len(self._free), "a host block is free twice"
        assert not (free & ready or free & storing or ready & storing), "a host block in two states"
        assert len(free) + len(ready) + len(storing) == self.num_blocks, "a host block leaked"
        assert self._discard <= storing
        for h, hb in (*self._ready.items(), *self._storing.items()):
            assert self.block_hash[hb] == h
        for hb in free:
            assert self.block_hash[hb] is None and self.pins[hb] == 0
        expected = [0] * self.num_blocks
        for r in self._reloads:
            for hb in r.host_ids:
                expected[hb] += 1
        assert expected == self.pins, "host pins disagree with the reloads in flight"
        assert {hb for off in self._offloads for hb in off.host_ids} == storing


def make_host_tier(block_manager: BlockManager, kv_cache: torch.Tensor, host_kv_cache_gb: float,
                   max_num_batched_tokens: int) -> HostTier | None:
    """The engine's host tier, sized from `EngineConfig.host_kv_cache_gb` (0: none)."""
    if host_kv_cache_gb <= 0 or not block_manager.enable_prefix_caching:
        return None
    per_block = kv_cache[:, :, 0].numel() * kv_cache.element_size()
    num_blocks = int(host_kv_cache_gb * 1024**3 // per_block)
    if num_blocks < 1:
        raise ValueError(f"host_kv_cache_gb={host_kv_cache_gb} holds no KV block of {per_block} bytes")
    # The most blocks one step's prompt chunks can allocate, twice: what the next steps may evict.
    lookahead = 2 * block_manager.blocks_needed(max_num_batched_tokens)
    return HostTier(block_manager, TorchBlockCopier(kv_cache, num_blocks), num_blocks, lookahead)
