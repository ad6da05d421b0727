"""The prefix index: which replica of a pool holds which cached prefix, as a radix tree.

One tree per pool, over block-hash chains (`protocol/prefix_hash.py`). Each node is a run of
block hashes with no branch inside and one set of replicas that hold every block of the run
(SGLang's radix cache, with replica sets in place of lock refs). Because a block hash names its
whole prefix, `_node_of` maps any hash straight to its node, so a `BlocksStored` event can be
placed under its `parent_hash` without replaying the path.

A replica can use a block only if it holds every block before it, so `match` walks the
request's chain once and, per replica, counts blocks until the first one it does not hold.

Two tiers (`protocol.kv_events.Tier`): each node has the replicas holding its run in device
memory (`replica_ids`) and those holding it in their host tier (`host_ids`). A replica's match is
what its engine can reuse: device blocks from the start of the chain, then host blocks continuing
it (the engine copies those back), stopping at the first block it holds in neither, or once in
its host part, at the first it does not hold in host memory (`match_tiers` gives both counts).

The index is a view fed by worker events and never claims more than the workers reported:
blocks whose parent it does not know are dropped, a replica's view is dropped on an event gap,
and above `max_blocks` the least recently matched leaves are evicted. Each of those costs hit
rate only.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from tandem.protocol.kv_events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEvent, KVEventBatch, Tier
from tandem.protocol.prefix_hash import ROOT_HASH


class _Node:
    __slots__ = ("block_hashes", "replica_ids", "host_ids", "children", "parent", "last_access")

    def __init__(self, block_hashes: list[int], replica_ids: set[str], parent: _Node | None, last_access: int,
                 host_ids: set[str] | None = None) -> None:
        self.block_hashes = block_hashes
        self.replica_ids = replica_ids  # hold the run in device memory
        self.host_ids = host_ids if host_ids is not None else set()  # hold it in their host tier
        self.children: dict[int, _Node] = {}  # first hash of the child's run -> child
        self.parent = parent
        self.last_access = last_access


class PrefixIndex:
    """Radix tree over block-hash chains with per-node replica sets, bounded to `max_blocks`."""

    def __init__(self, max_blocks: int = 1_000_000, evict_to_fraction: float = 0.9) -> None:
        self._root = _Node([], set(), None, 0)
        self._node_of: dict[int, _Node] = {}
        self._clock = 0
        self.num_evicted_blocks = 0
        self._evict_to_fraction = evict_to_fraction
        self.set_max_blocks(max_blocks)
        self._last_seq: dict[str, int] = {}
        self.num_dropped_blocks = 0  # stored blocks whose parent the index did not know
        self.num_view_drops = 0  # replica views dropped on a sequence gap or restart

    def set_max_blocks(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        # Evict down to this many at once so a full index does not scan its leaves per insert.
        self._evict_to = max(0, min(max_blocks - 1, int(max_blocks * self._evict_to_fraction)))
        if self.num_blocks > max_blocks:
            self.evict(self.num_blocks - self._evict_to)

    # ---- reading ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._node_of)

    @property
    def num_nodes(self) -> int:
        """Nodes other than the root."""
        count, stack = 0, list(self._root.children.values())
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def match(self, block_hashes: Sequence[int], candidates: Iterable[str] | None = None) -> dict[str, int]:
        """Per replica, how many leading blocks of `block_hashes` it can reuse, device and host
        tier together (only those > 0)."""
        return self.match_tiers(block_hashes, candidates)[0]

    def match_tiers(self, block_hashes: Sequence[int],
                    candidates: Iterable[str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """(`match`, and per replica how many of those blocks are in its host tier: only the
        replicas with some). The device part comes first, so the first `matched - host` blocks
        are device hits.

        One walk down the tree; a replica's count is fixed where it drops out of the path. A
        node whose run no replica holds in a host tier costs what it did before tiers existed."""
        self._clock += 1
        if candidates is None or isinstance(candidates, (set, frozenset)):
            allowed = candidates
        else:
            allowed = set(candidates)
        matched: dict[str, int] = {}
        host_from: dict[str, int] = {}  # replicas matching in their host tier -> depth where it began
        alive: set[str] | None = None  # still matching on the device
        alive_host: set[str] = set()  # still matching, in the host tier
        node, depth, total = self._root, 0, len(block_hashes)
        while depth < total:
            child = node.children.get(block_hashes[depth])
            if child is None:
                break
            run = child.block_hashes
            length = 1
            limit = min(len(run), total - depth)
            while length < limit and run[length] == block_hashes[depth + length]:
                length += 1
            device, host = child.replica_ids, child.host_ids
            if alive is None:
                alive = set(device) if allowed is None else device & allowed
                if host:
                    alive_host = host - device if allowed is None else (host - device) & allowed
                    host_from.update(dict.fromkeys(alive_host, 0))
            else:
                if alive_host:
                    for replica_id in alive_host - host:
                        matched[replica_id] = depth
                    alive_host &= host
                for replica_id in alive - device:
                    if replica_id in host:  # its device part ends here; the host tier goes on
                        alive_host.add(replica_id)
                        host_from[replica_id] = depth
                    else:
                        matched[replica_id] = depth
                alive &= device
            if not alive and not alive_host:
                break
            child.last_access = self._clock
            depth += length
            if length < len(run):
                break
            node = child
        for replica_id in alive or ():
            matched[replica_id] = depth
        for replica_id in alive_host:
            matched[replica_id] = depth
        # A replica drops out only below the first node, so every count is > 0.
        host_blocks = {r: matched[r] - d for r, d in host_from.items() if matched[r] > d}
        return matched, host_blocks

    def replicas(self) -> set[str]:
        found: set[str] = set()
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            found |= node.replica_ids | node.host_ids
            stack.extend(node.children.values())
        return found

    # ---- feeding ----------------------------------------------------------------------------

    def apply_batch(self, batch: KVEventBatch) -> None:
        """Apply a batch; on a sequence gap or restart, drop the replica's view first."""
        last = self._last_seq.get(batch.replica_id)
        if last is not None and batch.seq != last + 1:
            self.remove_replica(batch.replica_id)
            self.num_view_drops += 1
        self._last_seq[batch.replica_id] = batch.seq
        for event in batch.events:
            self.apply(batch.replica_id, event)

    def apply(self, replica_id: str, event: KVEvent) -> None:
        """One event of `replica_id`'s prefix cache."""
        match event:
            case BlocksStored(block_hashes, parent_hash, tier):
                self.insert(replica_id, block_hashes, parent_hash, tier)
            case BlocksRemoved(block_hashes, tier):
                self.remove(replica_id, block_hashes, tier)
            case AllBlocksCleared():
                self.remove_replica(replica_id)
            case _:
                raise TypeError(f"not a KV event: {type(event).__name__}")

    def insert(self, replica_id: str, block_hashes: Sequence[int], parent_hash: int | None = None,
               tier: Tier = Tier.GPU) -> None:
        """`replica_id` holds `block_hashes` in `tier`, the chain continuing after `parent_hash`."""
        host = tier is Tier.HOST
        if not block_hashes:
            return
        self._clock += 1
        touched: list[_Node] = []
        if parent_hash is None or (parent_hash == ROOT_HASH and ROOT_HASH not in self._node_of):
            node = self._root
        else:
            node = self._node_of.get(parent_hash)
            if node is None:
                self.num_dropped_blocks += len(block_hashes)
                return
            offset = node.block_hashes.index(parent_hash)
            if offset + 1 < len(node.block_hashes):
                self._split(node, offset + 1)
                touched.append(node)
        i = 0
        while i < len(block_hashes):
            child = node.children.get(block_hashes[i])
            if child is None:
                new_run = self._new_run(block_hashes[i:])
                if not new_run:
                    break
                child = _Node(new_run, set() if host else {replica_id}, node, self._clock,
                              {replica_id} if host else None)
                node.children[child.block_hashes[0]] = child
                for block_hash in child.block_hashes:
                    self._node_of[block_hash] = child
                touched.append(child)
                break
            run = child.block_hashes
            length = 1
            limit = min(len(run), len(block_hashes) - i)
            while length < limit and run[length] == block_hashes[i + length]:
                length += 1
            if length < len(run):
                self._split(child, length)
                touched.append(child)  # the split may need undoing if nothing hangs below it
            holders = child.host_ids if host else child.replica_ids
            if replica_id not in holders:
                holders.add(replica_id)
                touched.append(child)
            child.last_access = self._clock
            node = child
            i += length
        for node in touched:
            if node.parent is not None:  # not folded into a neighbour already
                self._merge_around(node)
        if self.num_blocks > self.max_blocks:
            self.evict(self.num_blocks - self._evict_to)

    def remove(self, replica_id: str, block_hashes: Sequence[int], tier: Tier = Tier.GPU) -> None:
        """`replica_id` no longer holds `block_hashes` in `tier` (unknown ones are ignored)."""
        host = tier is Tier.HOST
        i = 0
        while i < len(block_hashes):
            node = self._node_of.get(block_hashes[i])
            if node is None or replica_id not in (node.host_ids if host else node.replica_ids):
                i += 1
                continue
            start = node.block_hashes.index(block_hashes[i])
            end = start + 1
            while (
                end < len(node.block_hashes)
                and i + end - start < len(block_hashes)
                and node.block_hashes[end] == block_hashes[i + end - start]
            ):
                end += 1
            i += end - start
            if end < len(node.block_hashes):
                self._split(node, end)
            if start > 0:
                node = self._split(node, start)
            (node.host_ids if host else node.replica_ids).discard(replica_id)
            self._prune_or_merge(node)

    def remove_replica(self, replica_id: str) -> None:
        """Forget everything `replica_id` holds."""
        self._last_seq.pop(replica_id, None)
        changed: list[_Node] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if replica_id in node.replica_ids or replica_id in node.host_ids:
                node.replica_ids.discard(replica_id)
                node.host_ids.discard(replica_id)
                changed.append(node)
            stack.extend(node.children.values())
        # Deepest first, so pruning a leaf can expose its (also changed) parent.
        for node in reversed(changed):
            if node.parent is not None:  # still in the tree
                self._prune_or_merge(node)

    def evict(self, num_blocks: int) -> int:
        """Drop at least `num_blocks` blocks (or all), least recently matched leaves first."""
        leaves = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(leaves)
        evicted = 0
        while evicted < num_blocks and leaves:
            _, _, leaf = heapq.heappop(leaves)
            if leaf.parent is None or leaf.children:  # already gone, or no longer a leaf
                continue
            parent = leaf.parent
            evicted += len(leaf.block_hashes)
            self._delete_leaf(leaf)
            while parent is not self._root and not parent.children and _holds_nothing(parent):
                grandparent = parent.parent
                evicted += len(parent.block_hashes)
                self._delete_leaf(parent)
                parent = grandparent
            if parent is self._root:
                continue
            parent = self._merge_around(parent)
            if not parent.children:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self.num_evicted_blocks += evicted
        return evicted

    # ---- tree surgery -----------------------------------------------------------------------

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves

    def _split(self, node: _Node, offset: int) -> _Node:
        """Cut `node`'s run before `offset`; returns the new lower node (the run's tail)."""
        tail = _Node(node.block_hashes[offset:], set(node.replica_ids), node, node.last_access, set(node.host_ids))
        tail.children = node.children
        for child in tail.children.values():
            child.parent = tail
        for block_hash in tail.block_hashes:
            self._node_of[block_hash] = tail
        node.block_hashes = node.block_hashes[:offset]
        node.children = {tail.block_hashes[0]: tail}
        return tail

    def _delete_leaf(self, leaf: _Node) -> None:
        assert leaf.parent is not None and not leaf.children
        del leaf.parent.children[leaf.block_hashes[0]]
        for block_hash in leaf.block_hashes:
            del self._node_of[block_hash]
        leaf.parent = None

    def _prune_or_merge(self, node: _Node) -> None:
        """After `node` lost a replica: delete it if it holds nothing and leads nowhere."""
        while node is not self._root and not node.children and _holds_nothing(node):
            parent = node.parent
            assert parent is not None
            self._delete_leaf(node)
            node = parent
        if node is not self._root:
            self._merge_around(node)

    def _new_run(self, block_hashes: Sequence[int]) -> list[int]:
        """The leading hashes not yet in the tree (a well-formed chain has no repeats; a
        malformed or colliding event is cut where it would alias an existing block)."""
        run: list[int] = []
        seen: set[int] = set()
        for block_hash in block_hashes:
            if block_hash in self._node_of or block_hash in seen:
                self.num_dropped_blocks += len(block_hashes) - len(run)
                break
            seen.add(block_hash)
            run.append(block_hash)
        return run

    def _merge_around(self, node: _Node) -> _Node:
        """Keep runs maximal: fold a single child with the same replica set into its parent.
        Returns the node that now holds `node`'s run."""
        parent = node.parent
        if parent is not None and parent is not self._root and len(parent.children) == 1 and _same_holders(parent, node):
            self._absorb_child(parent)
            node = parent
        if len(node.children) == 1:
            (child,) = node.children.values()
            if _same_holders(child, node):
                self._absorb_child(node)
        return node

    def _absorb_child(self, node: _Node) -> None:
        (child,) = node.children.values()
        node.block_hashes = node.block_hashes + child.block_hashes
        for block_hash in child.block_hashes:
            self._node_of[block_hash] = node
        node.children = child.children
        for grandchild in node.children.values():
            grandchild.parent = node
        node.last_access = max(node.last_access, child.last_access)
        child.parent = None
        child.children = {}

    def check_invariants(self) -> None:
        """Assert the tree's structure (tests call this after every operation)."""
        seen = 0
        stack = [(child, self._root) for child in self._root.children.values()]
        while stack:
            node, parent = stack.pop()
            assert node.parent is parent and node.block_hashes, "broken parent link or empty run"
            assert parent.children[node.block_hashes[0]] is node
            assert not _holds_nothing(node) or node.children, "a node holding nothing must lead somewhere"
            if parent is not self._root:
                assert not (len(parent.children) == 1 and _same_holders(parent, node)), "run not maximal"
            for block_hash in node.block_hashes:
                assert self._node_of[block_hash] is node
            seen += len(node.block_hashes)
            stack.extend((child, node) for child in node.children.values())
        assert seen == len(self._node_of)
        assert self.num_blocks <= self.max_blocks


def _holds_nothing(node: _Node) -> bool:
    return not node.replica_ids and not node.host_ids


def _same_holders(a: _Node, b: _Node) -> bool:
    return a.replica_ids == b.replica_ids and a.host_ids == b.host_ids
