"""Owner of a worker's KV blocks: the free list, ref counts, and the prefix cache.

Nobody else changes a block's ref count. A block's ref count covers running sequences; a
block whose count drops to zero but holds a full, hashed block of tokens stays in the prefix
cache (and in the free list, least-recently-freed first) until a new allocation evicts it. The
free list is two queues: worthless blocks (nothing cached), handed out first, then cached ones
in LRU order.
Every change to the set of cached blocks is recorded as a KV event (`protocol.kv_events`) for
the router's prefix index.

Copy pins (the host tier, `engine/host_tier.py`): a block that a copy to or from host memory
is reading or writing is pinned (`pin` / `unpin`), apart from its ref count. A block is in the
free list only while both are zero, so a block being copied is never handed out, whoever
dropped it meanwhile. A pinned block keeps its place in the prefix cache (a block being copied
out can still be a prefix hit: both only read it).
"""
from __future__ import annotations

from collections import OrderedDict

from tandem.engine.sequence import Sequence
from tandem.protocol.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEvent, Tier
from tandem.protocol.prefix_hash import ROOT_HASH, hash_block


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.pins = [0] * num_blocks  # copies in flight that read or write the block
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_parent: list[int | None] = [None] * num_blocks  # hash of the block before (None: first)
        self.cached: dict[int, int] = {}  # hash -> block id
        # Free blocks: worthless ones (nothing cached) are handed out first; then cached ones,
        # least recently freed first, evicted from the front when reused.
        self.free_uncached: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.events: list[KVEvent] = []
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    def is_free(self, b: int) -> bool:
        return b in self.free_uncached or b in self.free_cached

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Cached block ids and their hashes for the longest cached prefix of full blocks.
        Leaves at least one token uncached: the last token must be computed to get logits."""
        if not self.enable_prefix_caching:
            return [], []
        block_ids: list[int] = []
        hashes: list[int] = []
        parent = ROOT_HASH
        max_blocks = (len(token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = hash_block(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.block_tokens[block_id] != tokens:
                break
            block_ids.append(block_id)
            hashes.append(h)
            parent = h
        return block_ids, hashes

    # ------------------------------------------------------------------ verbs
    def can_admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a waiting sequence can get its prefix hits plus blocks for `num_new_tokens`."""
        hit_ids, _ = self.match_prefix(seq.token_ids)
        hit_tokens = len(hit_ids) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - hit_tokens)
        new_blocks = self.blocks_needed(hit_tokens + num_new_tokens) - len(hit_ids)
        reclaimed = sum(1 for b in hit_ids if b in self.free_cached)  # leave the free list
        return new_blocks + reclaimed <= self.num_free_blocks

    def admit(self, seq: Sequence) -> int:
        """Attach the sequence to its cached prefix blocks; returns the number of hit tokens."""
        assert not seq.block_ids, "admit() is for a sequence that holds no blocks"
        hit_ids, hashes = self.match_prefix(seq.token_ids)
        for b in hit_ids:
            self._incref(b)
        seq.block_ids = list(hit_ids)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(hit_ids) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            # all its tokens: a continuation's earlier output is looked up (and may hit) too
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return need <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to hold `num_new_tokens` more tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_ids.append(self._take_free_block())

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish every block that became full of computed tokens."""
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        first_new = len(seq.block_hashes)
        for i in range(first_new, num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = hash_block(parent, tokens)
            seq.block_hashes.append(h)
            parent = h
            if not self.enable_prefix_caching:
                continue
            block_id = seq.block_ids[i]
            if h in self.cached or self.block_hash[block_id] is not None:
                continue  # an identical block is already cached (computed twice concurrently)
            parent_hash = seq.block_hashes[i - 1] if i > 0 else None
            self.cached[h] = block_id
            self.block_hash[block_id] = h
            self.block_tokens[block_id] = tokens
            self.block_parent[block_id] = parent_hash
            self.events.append(BlocksStored([h], parent_hash, Tier.GPU))

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go first so they are evicted first."""
        for b in reversed(seq.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} double freed"
            if self.ref_counts[b] == 0 and self.pins[b] == 0:
                self._to_free_list(b)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share the parent's full, computed blocks (its own tail is recomputed)."""
        assert not child.block_ids
        num_shared = min(len(parent.block_hashes), (child.num_tokens - 1) // self.block_size)
        for b in parent.block_ids[:num_shared]:
            self._incref(b)
        child.block_ids = list(parent.block_ids[:num_shared])
        child.block_hashes = list(parent.block_hashes[:num_shared])
        child.num_computed_tokens = num_shared * self.block_size

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds."""
        for h, b in list(self.cached.items()):
            if self.ref_counts[b] == 0:
                self._evict(b)
                if b in self.free_cached:  # free, and now worthless
                    del self.free_cached[b]
                    self.free_uncached[b] = None
        self.events.append(AllBlocksCleared())

    def drain_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def record(self, event: KVEvent) -> None:
        """Queue another tier's event (the host tier's) behind this one's, in the order they
        happened: the router's index places a stored block under a parent it already knows."""
        self.events.append(event)

    # ------------------------------------------------------------ copy pins
    def pin(self, b: int) -> None:
        """A copy will read or write block `b`: it leaves the free list until `unpin`."""
        if self.ref_counts[b] == 0 and self.pins[b] == 0:
            self._from_free_list(b)
        self.pins[b] += 1

    def unpin(self, b: int) -> None:
        """A copy of block `b` is done. Unheld, it returns to the free list where it was taken
        from: a copied-out block was among the next to be evicted, so it goes back to the front
        of the cached queue (now backed up), keeping the LRU order."""
        self.pins[b] -= 1
        assert self.pins[b] >= 0, f"block {b} unpinned twice"
        if self.pins[b] == 0 and self.ref_counts[b] == 0:
            self._to_free_list(b)
            if self.block_hash[b] is not None:
                self.free_cached.move_to_end(b, last=False)

    def eviction_candidates(self, window: int) -> list[int]:
        """Cached free blocks among the next `window` the allocator hands out: the next to be
        evicted, in order."""
        found = []
        for i, b in enumerate(self.free_cached, start=len(self.free_uncached)):
            if i >= window:
                break
            found.append(b)
        return found

    # --------------------------------------------------------------- internals
    def _incref(self, b: int) -> None:
        if self.ref_counts[b] == 0 and self.pins[b] == 0:
            self._from_free_list(b)
        self.ref_counts[b] += 1

    def _to_free_list(self, b: int) -> None:
        if self.block_hash[b] is None:
            self.free_uncached[b] = None
            self.free_uncached.move_to_end(b, last=False)  # worthless: reuse first
        else:
            self.free_cached[b] = None

    def _from_free_list(self, b: int) -> None:
        if b in self.free_cached:
            del self.free_cached[b]
        else:
            del self.free_uncached[b]

    def _take_free_block(self) -> int:
        if self.free_uncached:
            b, _ = self.free_uncached.popitem(last=False)
        else:
            b, _ = self.free_cached.popitem(last=False)
            self._evict(b)
        self.ref_counts[b] = 1
        return b

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is None:
            return
        del self.cached[h]
        self.block_hash[b] = None
        self.block_tokens[b] = None
        self.block_parent[b] = None
        self.events.append(BlocksRemoved([h], Tier.GPU))

    def check_invariants(self, live: list[Sequence], pins: list[int] | None = None) -> None:
        """Every block is either free (ref 0, no pin, in the free list) or held by exactly the
        live sequences that list it plus the copies (`pins`: one entry per pin, as the host tier
        counts them; default none); the cache map and per-block hashes agree. For tests."""
        expected = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_ids:
                expected[b] += 1
        assert expected == self.ref_counts, "ref counts disagree with the live block tables"
        expected_pins = [0] * self.num_blocks
        for b in pins or ():
            expected_pins[b] += 1
        assert expected_pins == self.pins, "copy pins disagree with the copies in flight"
        for b in range(self.num_blocks):
            free = self.ref_counts[b] == 0 and self.pins[b] == 0
            assert self.is_free(b) == free, f"block {b} free-list state"
            assert not (b in self.free_cached and b in self.free_uncached), f"block {b} free twice"
        assert all(self.block_hash[b] is not None for b in self.free_cached), "a worthless block in the cached queue"
        assert all(self.block_hash[b] is None for b in self.free_uncached), "a cached block in the worthless queue"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
        assert sum(h is not None for h in self.block_hash) == len(self.cached)
