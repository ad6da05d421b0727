"""Routing simulator: drives the real `router.pool.PoolRouter` over simulated replicas.

Pure Python, no GPUs, no Ray. A discrete-event loop replays seeded multi-turn chat and
shared-document (RAG) workloads over N replicas. Each replica has a real LRU prefix cache of
block hashes (`workers.prefix_hash` chains), publishes `BlocksStored` / `BlocksRemoved` to the
router as `KVEventBatch`es (per-replica `seq`), reports `ReplicaLoad` whenever its queue
changes, and serves requests with a simple cost model:

    service time = prefill_s_per_token * uncached prompt tokens + decode_s_per_token * output tokens

with at most `max_running` requests running per replica (the rest wait, FIFO).

Host tier (`--host-tier-blocks N`, per replica; 0: off): as `engine/host_tier.py`, a block the
device cache evicts moves to an LRU host tier of N blocks (published as `Tier.HOST` events) and a
prompt's prefix that continues there after its device hits is copied back instead of recomputed,
at `reload_s_per_token` per token; the block stays in the host tier too. Each run is then
replayed with the tier off and on, and the hit rate is reported per tier.

Policies: the router's `prefix_aware`, `round_robin`, `least_loaded`, and `oracle`: for each
request, among the replicas whose *true* outstanding tokens are at most `oracle_load_bound`
(the imbalance target, 1.3) times the pool's mean, the one whose *true* cache holds the longest
prefix of the prompt; ties go to the less loaded. The oracle sees the replicas' caches and loads
directly (no events, no delay) and does not use the router's settings.

    python -m tandem.bench.routing_sim    # --runs 1000:4,8,16,32,64 10000:32,64 (CONVERSATIONS:REPLICAS)

writes bench/results/routing_sim.json and bench/results/routing_sim.md.

    python -m tandem.bench.routing_sim --runs 5000:64 --workloads chat --capacity-blocks 1024 \
        --host-tier-blocks 8192 --out bench/results/routing_sim_host_tier

replays each policy with the host tier off and on (a device cache smaller than the working set).
"""
from __future__ import annotations

import argparse
from array import array
import heapq
import itertools
import json
import os
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tandem.protocol.kv_events import BlocksRemoved, BlocksStored, KVEventBatch, Tier
from tandem.protocol.load import ReplicaLoad
from tandem.router.policy import RoutingConfig, RoutingRequest
from tandem.router.pool import PoolRouter
from tandem.protocol.prefix_hash import ROOT_HASH, hash_block

POLICIES = ("prefix_aware", "round_robin", "least_loaded", "oracle")
WORKLOADS = ("chat", "rag")
VOCAB = 65536


# ---------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class SimRequest:
    prompt_tokens: int
    output_tokens: int
    seq_hashes: tuple[int, ...]  # full blocks of prompt + output; the prompt's are a prefix
    think_s: float  # the user waits this long after the previous request finished
    session_id: str | None


@dataclass(frozen=True)
class WorkloadConfig:
    block_size: int = 16
    # chat
    num_system_prompts: int = 4
    system_tokens: int = 512
    turns: tuple[int, int] = (2, 10)
    user_tokens: tuple[int, int] = (30, 200)
    answer_tokens: tuple[int, int] = (50, 400)
    think_mean_s: float = 3.0
    # rag
    num_documents: int = 8
    document_tokens: tuple[int, int] = (2000, 8000)
    zipf_s: float = 1.1
    questions: tuple[int, int] = (1, 3)
    question_tokens: tuple[int, int] = (20, 100)
    rag_answer_tokens: tuple[int, int] = (50, 200)


def _extend_hashes(hashes: list[int], tokens: list[int], block_size: int) -> None:
    """Append the hashes of `tokens`' full blocks not hashed yet (the chain continues)."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size])
        hashes.append(parent)


class Workload:
    """Seeded conversations; conversation `i` is a pure function of (kind, seed, i)."""

    def __init__(self, kind: str, seed: int, config: WorkloadConfig, cache: bool = True) -> None:
        if kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}")
        self.kind, self.seed, self.config = kind, seed, config
        self._cache: dict[int, list[SimRequest]] | None = {} if cache else None
        rng = random.Random(f"{kind}:{seed}:shared")
        self.system_prompts = [
            _tokens(rng, config.system_tokens) for _ in range(config.num_system_prompts)
        ]
        self._system_hashes = []
        for tokens in self.system_prompts:
            hashes: list[int] = []
            _extend_hashes(hashes, tokens, config.block_size)
            self._system_hashes.append(hashes)
        if kind == "rag":
            self.documents = [
                self.system_prompts[0] + _tokens(rng, rng.randint(*config.document_tokens))
                for _ in range(config.num_documents)
            ]
            self._document_hashes = []
            for tokens in self.documents:
                hashes = []
                _extend_hashes(hashes, tokens, config.block_size)
                self._document_hashes.append(hashes)
            weights = [1.0 / (rank + 1) ** config.zipf_s for rank in range(config.num_documents)]
            total = sum(weights)
            self._doc_cdf = list(_accumulate(w / total for w in weights))

    def conversation(self, i: int) -> list[SimRequest]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        requests = self._chat(i) if self.kind == "chat" else self._rag(i)
        if self._cache is not None:
            self._cache[i] = requests
        return requests

    def _chat(self, i: int) -> list[SimRequest]:
        c, rng = self.config, random.Random(f"chat:{self.seed}:{i}")
        which = rng.randrange(c.num_system_prompts)
        tokens = list(self.system_prompts[which])
        hashes = list(self._system_hashes[which])
        requests = []
        for turn in range(rng.randint(*c.turns)):
            tokens += _tokens(rng, rng.randint(*c.user_tokens))
            prompt_tokens = len(tokens)
            answer = rng.randint(*c.answer_tokens)
            tokens += _tokens(rng, answer)
            _extend_hashes(hashes, tokens, c.block_size)
            think = 0.0 if turn == 0 else rng.expovariate(1.0 / c.think_mean_s)
            requests.append(SimRequest(prompt_tokens, answer, tuple(hashes), think, f"chat-{i}"))
        return requests

    def _rag(self, i: int) -> list[SimRequest]:
        c, rng = self.config, random.Random(f"rag:{self.seed}:{i}")
        u = rng.random()
        doc = next((d for d, edge in enumerate(self._doc_cdf) if u <= edge), len(self._doc_cdf) - 1)
        requests = []
        for q in range(rng.randint(*c.questions)):
            tokens = self.documents[doc] + _tokens(rng, rng.randint(*c.question_tokens))
            prompt_tokens = len(tokens)
            answer = rng.randint(*c.rag_answer_tokens)
            tokens += _tokens(rng, answer)
            hashes = list(self._document_hashes[doc])
            _extend_hashes(hashes, tokens, c.block_size)
            think = 0.0 if q == 0 else rng.expovariate(1.0 / c.think_mean_s)
            requests.append(SimRequest(prompt_tokens, answer, tuple(hashes), think, None))
        return requests


def _tokens(rng: random.Random, n: int) -> list[int]:
    return list(array("H", rng.randbytes(2 * n)))  # ids below VOCAB, far faster than randrange


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


# ---------------------------------------------------------------------------- replicas


class LRUPrefixCache:
    """Block hashes a replica holds, least recently used first, bounded to `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: tuple[int, ...], limit: int) -> int:
        """Leading blocks of `hashes[:limit]` held, stopping at the first one missing."""
        blocks, n = self.blocks, 0
        while n < limit and hashes[n] in blocks:
            n += 1
        return n

    def store(self, hashes: tuple[int, ...]) -> list:
        """Hold the whole chain `hashes`; returns the KV events (evictions first).

        Touches the chain deepest block first, so its first blocks are the most recently used
        and eviction eats chains from their tails (no holes in a prefix from eviction)."""
        blocks = self.blocks
        new = [h for h in hashes if h not in blocks]
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
        excess = len(blocks) + len(new) - self.capacity
        evicted = []
        if excess > 0:
            chain = set(hashes)
            for h in list(itertools.islice(blocks.keys(), excess + len(hashes))):
                if len(evicted) >= excess:
                    break
                if h not in chain:
                    evicted.append(h)
            for h in evicted:
                del blocks[h]
        events: list = []
        if evicted:
            events.append(BlocksRemoved(evicted))
        run: list[int] = []
        parent: int | None = None
        for index, h in enumerate(hashes):
            if h in blocks:
                if run:
                    events.append(BlocksStored(run, parent))
                    run = []
                continue
            if not run:
                parent = hashes[index - 1] if index > 0 else None
            run.append(h)
        if run:
            events.append(BlocksStored(run, parent))
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        return events


class LRUHostTier:
    """A replica's host tier: the blocks its device cache evicted, least recently used first,
    bounded to `capacity`; it keeps a block that is copied back (inclusive, as the engine's)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match_from(self, hashes: tuple[int, ...], start: int, limit: int) -> int:
        """Blocks of `hashes[start:limit]` held, from `start`, stopping at the first one missing."""
        blocks, n = self.blocks, start
        while n < limit and hashes[n] in blocks:
            n += 1
        return n - start

    def touch(self, hashes: tuple[int, ...]) -> None:
        for h in hashes:
            self.blocks.move_to_end(h)

    def absorb(self, evicted: list[int], parent_of: dict[int, int | None]) -> list:
        """The device cache evicted `evicted`; returns the host tier's events (stores first)."""
        blocks = self.blocks
        stored = [h for h in evicted if h not in blocks]
        events: list = [BlocksStored([h], parent_of.get(h), Tier.HOST) for h in stored]
        for h in stored:
            blocks[h] = None
        dropped = []
        while len(blocks) > self.capacity:
            dropped.append(blocks.popitem(last=False)[0])
        if dropped:
            events.append(BlocksRemoved(dropped, Tier.HOST))
        return events


@dataclass
class _Running:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    decode_start: float
    blocks: int


class Replica:
    def __init__(self, replica_id: str, capacity_blocks: int, max_running: int, block_size: int,
                 host_tier_blocks: int = 0) -> None:
        self.replica_id = replica_id
        self.cache = LRUPrefixCache(capacity_blocks)
        self.host = LRUHostTier(host_tier_blocks) if host_tier_blocks else None
        self.parent_of: dict[int, int | None] = {}  # block -> the block before it (host-tier events name it)
        self.max_running = max_running
        self.block_size = block_size
        self.running: dict[str, _Running] = {}
        self.waiting: deque[str] = deque()  # request ids, FIFO
        self.waiting_tokens = 0
        self.seq = 0
        self.decode_s = 0.0

    def outstanding_tokens(self, now: float) -> int:
        running = 0
        for r in self.running.values():
            generated = 0 if now <= r.decode_start else min(r.output_tokens, int((now - r.decode_start) / self.decode_s))
            running += r.prompt_tokens + generated
        return running + self.waiting_tokens

    def load(self, now: float) -> ReplicaLoad:
        running_tokens = self.outstanding_tokens(now) - self.waiting_tokens
        used = min(self.cache.capacity, sum(r.blocks for r in self.running.values()))
        return ReplicaLoad(
            self.replica_id, len(self.running), len(self.waiting), running_tokens, self.waiting_tokens,
            self.cache.capacity - used, self.cache.capacity, now,
        )

    def batch(self, events: list, now: float) -> KVEventBatch:
        self.seq += 1
        return KVEventBatch(self.replica_id, self.seq, events, now)

    def store(self, hashes: tuple[int, ...]) -> list:
        """Hold the chain on the device; what it evicts moves to the host tier (if any). Events:
        the host tier's first, so a block copied out is never without a holder the index knows."""
        events = self.cache.store(hashes)
        if self.host is None:
            return events
        parent_of = self.parent_of
        for i, h in enumerate(hashes):
            if h not in parent_of:
                parent_of[h] = hashes[i - 1] if i else None
        evicted = [h for e in events if isinstance(e, BlocksRemoved) for h in e.block_hashes]
        if not evicted:
            return events
        host_events = self.host.absorb(evicted, parent_of)
        for e in host_events:
            if isinstance(e, BlocksRemoved):
                for h in e.block_hashes:
                    if h not in self.cache.blocks:
                        parent_of.pop(h, None)
        return host_events + events


# ---------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    conversations: int = 1000
    users_per_replica: int = 16  # concurrent conversations grow with the pool
    min_conversations_per_user: int = 4  # caps the users so the steady window is not just the ramp
    ramp_s: float = 10.0
    warmup_s: float = 30.0  # imbalance is sampled from here (caches and queues filled)
    capacity_blocks: int = 8192  # per replica prefix cache (131k tokens at block_size 16)
    max_running: int = 32
    prefill_s_per_token: float = 25e-6
    decode_s_per_token: float = 0.02
    event_delay_s: float = 0.01  # KV events and load reports reach the router this late
    host_tier_blocks: int = 0  # per replica host tier (0: none)
    # Copying a host-tier block back, per token: a quarter of a prefill token (an 8B model's
    # 128 KiB of KV per token over PCIe against its prefill FLOPs; docs/ROUTER.md, "Two tiers").
    reload_s_per_token: float = 6.25e-6
    sample_every_s: float = 0.5
    oracle_load_bound: float = 1.3  # the oracle only picks replicas at most this × the mean load
    seed: int = 0


@dataclass
class RunResult:
    policy: str
    workload: str
    replicas: int
    requests: int
    prompt_tokens: int
    cached_tokens: int  # device and host tier
    hit_rate: float  # device and host tier
    imbalance: float
    mean_outstanding_tokens: float  # per replica, time-averaged over the window
    decision_us_median: float | None
    decision_us_p99: float | None
    decision_us_mean: float | None
    ttft_mean_ms: float
    makespan_s: float
    window_s: tuple[float, float]  # the imbalance sampling window, simulated seconds
    users: int
    routed_per_replica: list[int] = field(default_factory=list)
    host_tier_blocks: int = 0
    host_cached_tokens: int = 0  # of cached_tokens, copied back from a host tier
    hit_rate_gpu: float = 0.0
    hit_rate_host: float = 0.0


# event kinds, ordered so simultaneous events are processed deterministically
_DELIVER, _FINISH, _ARRIVE, _SAMPLE = 0, 1, 2, 3


class _TrueHolders:
    """Which replicas really hold each block, updated the moment a cache changes (the oracle's view)."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}

    def apply(self, replica_id: str, events: list) -> None:
        holders = self.holders
        for event in events:
            if event.tier is Tier.HOST:
                continue  # the oracle reads host tiers directly
            if isinstance(event, BlocksStored):
                for h in event.block_hashes:
                    holders.setdefault(h, set()).add(replica_id)
            else:
                for h in event.block_hashes:
                    held = holders.get(h)
                    if held is not None:
                        held.discard(replica_id)
                        if not held:
                            del holders[h]

    def match(self, hashes: tuple[int, ...], limit: int) -> dict[str, int]:
        """Per replica, leading blocks of `hashes[:limit]` it holds (only those > 0)."""
        holders, matched = self.holders, {}
        alive: set[str] | None = None
        depth = 0
        while depth < limit:
            held = holders.get(hashes[depth])
            if held is None:
                break
            if alive is None:
                alive = set(held)
            else:
                for replica_id in alive - held:
                    matched[replica_id] = depth
                alive &= held
                if not alive:
                    break
            depth += 1
        for replica_id in alive or ():
            matched[replica_id] = depth
        return matched


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def simulate(policy: str, workload: Workload, config: SimConfig, routing: RoutingConfig | None = None) -> RunResult:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    block_size = workload.config.block_size
    routing = routing or RoutingConfig(block_size=block_size, seed=config.seed)
    if routing.block_size != block_size:
        raise ValueError("routing block_size must equal the workload's")
    router = PoolRouter(RoutingConfig(**{**asdict(routing), "policy": policy})) if policy != "oracle" else None
    truth = _TrueHolders() if policy == "oracle" else None
    replicas = [Replica(f"r{i:03d}", config.capacity_blocks, config.max_running, block_size, config.host_tier_blocks)
                for i in range(config.replicas)]
    for replica in replicas:
        replica.decode_s = config.decode_s_per_token
    by_id = {r.replica_id: r for r in replicas}
    candidates = [r.replica_id for r in replicas]
    routed = {r.replica_id: 0 for r in replicas}

    heap: list = []
    counter = 0

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(heap, (t, kind, counter, payload))

    def send_to_router(t: float, item: object) -> None:
        if router is not None:
            push(t + config.event_delay_s, _DELIVER, item)

    def cache_changed(replica: Replica, events: list, t: float) -> None:
        if not events:
            return
        if truth is not None:
            truth.apply(replica.replica_id, events)
        send_to_router(t, replica.batch(events, t))

    # Users pull conversations from one queue; each runs its conversation's turns in order.
    users = max(1, min(config.users_per_replica * config.replicas, config.conversations // max(1, config.min_conversations_per_user)))
    rng = random.Random(f"users:{config.seed}")
    next_conversation = 0
    steady_end: float | None = None
    for user in range(min(users, config.conversations)):
        push(rng.uniform(0.0, config.ramp_s), _ARRIVE, (user, next_conversation, workload.conversation(next_conversation), 0))
        next_conversation += 1
    if next_conversation >= config.conversations:
        steady_end = config.ramp_s
    push(0.0, _SAMPLE, None)

    prompt_total = cached_total = host_total = num_requests = 0
    decision_us: list[float] = []
    ttft_total = 0.0
    sample_max = sample_sum = 0.0
    num_samples = 0
    window = [None, None]
    now = 0.0
    payloads: dict[str, tuple] = {}
    perf_counter = time.perf_counter

    def start(replica: Replica, request_id: str, t: float) -> None:
        nonlocal prompt_total, cached_total, host_total, ttft_total
        user, conv, turns, turn, arrived = payloads[request_id]
        req = turns[turn]
        full_prompt_blocks = req.prompt_tokens // block_size
        limit = (req.prompt_tokens - 1) // block_size  # the last token is always computed
        hit_blocks = replica.cache.match(req.seq_hashes, limit)
        host_blocks = replica.host.match_from(req.seq_hashes, hit_blocks, limit) if replica.host else 0
        if host_blocks:
            replica.host.touch(req.seq_hashes[hit_blocks : hit_blocks + host_blocks])
        cached = hit_blocks * block_size
        reloaded = host_blocks * block_size
        prompt_total += req.prompt_tokens
        cached_total += cached + reloaded
        host_total += reloaded
        events = replica.store(req.seq_hashes[:full_prompt_blocks])
        prefill = (config.prefill_s_per_token * (req.prompt_tokens - cached - reloaded)
                   + config.reload_s_per_token * reloaded)
        ttft_total += t + prefill - arrived
        blocks = -(-(req.prompt_tokens + req.output_tokens) // block_size)
        replica.running[request_id] = _Running(request_id, req.prompt_tokens, req.output_tokens, t + prefill, blocks)
        cache_changed(replica, events, t)
        push(t + prefill + config.decode_s_per_token * req.output_tokens, _FINISH, (replica.replica_id, request_id))

    while heap:
        t, kind, _, payload = heapq.heappop(heap)
        now = t
        if kind == _DELIVER:
            if isinstance(payload, KVEventBatch):
                router.publish(payload)
            else:
                router.report_load(payload, t)
        elif kind == _SAMPLE:
            if t >= config.warmup_s and (steady_end is None or t <= steady_end):
                loads = [r.outstanding_tokens(t) for r in replicas]
                sample_max += max(loads)
                sample_sum += sum(loads) / len(loads)
                num_samples += 1
                window[0] = t if window[0] is None else window[0]
                window[1] = t
            if heap:
                push(t + config.sample_every_s, _SAMPLE, None)
        elif kind == _ARRIVE:
            user, conv, turns, turn = payload
            req = turns[turn]
            num_requests += 1
            request_id = f"c{conv}-t{turn}"
            if truth is not None:
                target = _oracle(replicas, truth, req, block_size, config.oracle_load_bound, t,
                                 routing.host_hit_weight)
            else:
                rr = RoutingRequest(request_id, list(req.seq_hashes[: req.prompt_tokens // block_size]), req.prompt_tokens, req.session_id)
                t0 = perf_counter()
                ranked = router.route(rr, candidates, t)
                decision_us.append((perf_counter() - t0) * 1e6)
                target = by_id[ranked[0]]
            routed[target.replica_id] += 1
            payloads[request_id] = (user, conv, turns, turn, t)
            if len(target.running) < target.max_running:
                start(target, request_id, t)
            else:
                target.waiting.append(request_id)
                target.waiting_tokens += req.prompt_tokens
            send_to_router(t, target.load(t))
        elif kind == _FINISH:
            replica_id, request_id = payload
            replica = by_id[replica_id]
            del replica.running[request_id]
            user, conv, turns, turn, _ = payloads.pop(request_id)
            cache_changed(replica, replica.store(turns[turn].seq_hashes), t)
            if router is not None:
                router.request_finished(request_id)  # Serve's on_request_completed, same moment
            while replica.waiting and len(replica.running) < replica.max_running:
                waiting_id = replica.waiting.popleft()
                w_turns, w_turn = payloads[waiting_id][2], payloads[waiting_id][3]
                replica.waiting_tokens -= w_turns[w_turn].prompt_tokens
                start(replica, waiting_id, t)
            send_to_router(t, replica.load(t))
            if turn + 1 < len(turns):
                push(t + turns[turn + 1].think_s, _ARRIVE, (user, conv, turns, turn + 1))
            elif next_conversation < config.conversations:
                push(t, _ARRIVE, (user, next_conversation, workload.conversation(next_conversation), 0))
                next_conversation += 1
                if next_conversation >= config.conversations:
                    steady_end = t

    imbalance = sample_max / sample_sum if sample_sum > 0 else float("nan")
    decision_sorted = sorted(decision_us)
    return RunResult(
        policy=policy, workload=workload.kind, replicas=config.replicas, requests=num_requests,
        prompt_tokens=prompt_total, cached_tokens=cached_total,
        hit_rate=cached_total / prompt_total if prompt_total else 0.0,
        imbalance=imbalance, mean_outstanding_tokens=sample_sum / max(1, num_samples),
        decision_us_median=_percentile(decision_sorted, 0.5) if decision_us else None,
        decision_us_p99=_percentile(decision_sorted, 0.99) if decision_us else None,
        decision_us_mean=sum(decision_us) / len(decision_us) if decision_us else None,
        ttft_mean_ms=1000.0 * ttft_total / max(1, num_requests),
        makespan_s=now, window_s=(window[0] or 0.0, window[1] or 0.0),
        users=users, routed_per_replica=[routed[r.replica_id] for r in replicas],
        host_tier_blocks=config.host_tier_blocks, host_cached_tokens=host_total,
        hit_rate_gpu=(cached_total - host_total) / prompt_total if prompt_total else 0.0,
        hit_rate_host=host_total / prompt_total if prompt_total else 0.0,
    )


def _oracle(replicas: list[Replica], truth: _TrueHolders, req: SimRequest, block_size: int, load_bound: float,
            now: float, host_hit_weight: float = 0.75) -> Replica:
    """Longest true cached prefix among replicas within `load_bound` × the mean true load (a
    host-tier block counts `host_hit_weight` of a device block); ties: less loaded, then lower
    id. The least loaded replica is always within the bound."""
    loads = [r.outstanding_tokens(now) for r in replicas]
    ceiling = load_bound * sum(loads) / len(loads)
    limit = (req.prompt_tokens - 1) // block_size
    matched = truth.match(req.seq_hashes, limit)
    best, best_key = replicas[0], None
    for replica, load in zip(replicas, loads):
        if load > ceiling:
            continue  # never the least loaded one, so some replica always qualifies
        device = matched.get(replica.replica_id, 0)
        score = device
        if replica.host is not None:
            score += host_hit_weight * replica.host.match_from(req.seq_hashes, device, limit)
        key = (score, -load)
        if best_key is None or key > best_key:
            best, best_key = replica, key
    return best


# ---------------------------------------------------------------------------- driver


def run_grid(runs: list[tuple[int, list[int]]], workloads: list[str], policies: list[str], sim: SimConfig,
             wl_config: WorkloadConfig, log=print) -> list[dict]:
    """One entry per (conversations, replicas, workload): every policy on the same replay."""
    entries: list[dict] = []
    for kind in workloads:
        for conversations, replica_counts in runs:
            workload = Workload(kind, sim.seed, wl_config, cache=conversations <= 20000)
            # With a host tier, every run is replayed without it first: the same conversations.
            for n, host_blocks in itertools.product(replica_counts, sorted({0, sim.host_tier_blocks})):
                cfg = SimConfig(**{**asdict(sim), "replicas": n, "conversations": conversations,
                                   "host_tier_blocks": host_blocks})
                entry: dict = {"replicas": n, "workload": kind, "conversations": conversations,
                               "host_tier_blocks": host_blocks,
                               "hit_rate": {}, "hit_rate_gpu": {}, "hit_rate_host": {}, "imbalance": {},
                               "decision_us": {}, "decision_us_p99": {},
                               "decision_us_mean": {}, "ttft_mean_ms": {}, "mean_outstanding_tokens": {},
                               "requests": None, "users": None, "window_s": None}
                for policy in policies:
                    t0 = time.perf_counter()
                    r = simulate(policy, workload, cfg)
                    entry["hit_rate"][policy] = round(r.hit_rate, 4)
                    entry["hit_rate_gpu"][policy] = round(r.hit_rate_gpu, 4)
                    entry["hit_rate_host"][policy] = round(r.hit_rate_host, 4)
                    entry["imbalance"][policy] = round(r.imbalance, 3)
                    for key, value in (("decision_us", r.decision_us_median), ("decision_us_p99", r.decision_us_p99),
                                       ("decision_us_mean", r.decision_us_mean)):
                        entry[key][policy] = None if value is None else round(value, 1)
                    entry["ttft_mean_ms"][policy] = round(r.ttft_mean_ms, 1)
                    entry["mean_outstanding_tokens"][policy] = round(r.mean_outstanding_tokens)
                    entry["requests"], entry["users"], entry["window_s"] = r.requests, r.users, r.window_s
                    tier = f" host={host_blocks} hit_gpu={r.hit_rate_gpu:.3f} hit_host={r.hit_rate_host:.3f}" if sim.host_tier_blocks else ""
                    log(f"{kind:5s} conv={conversations} n={n:3d}{tier} {policy:13s} hit={r.hit_rate:.3f} imb={r.imbalance:.3f} "
                        f"dec_med={r.decision_us_median or 0:.1f}us p99={r.decision_us_p99 or 0:.1f}us "
                        f"req={r.requests} wall={time.perf_counter() - t0:.1f}s")
                entries.append(entry)
    return entries


TARGETS = {"hit_rate_vs_oracle_min": 0.9, "imbalance_max": 1.3, "decision_us_max": 200.0}


def check_targets(entries: list[dict]) -> list[dict]:
    """One row per run for prefix_aware against the three targets."""
    rows = []
    for e in entries:
        if "prefix_aware" not in e["hit_rate"] or "oracle" not in e["hit_rate"]:
            continue
        oracle, pa = e["hit_rate"]["oracle"], e["hit_rate"]["prefix_aware"]
        ratio = pa / oracle if oracle > 0 else 1.0
        rows.append({
            "replicas": e["replicas"], "workload": e["workload"], "conversations": e["conversations"],
            "host_tier_blocks": e.get("host_tier_blocks", 0),
            "users_per_replica": round(e["users"] / e["replicas"], 1),
            "hit_ratio_to_oracle": round(ratio, 3), "hit_ok": ratio >= TARGETS["hit_rate_vs_oracle_min"],
            "imbalance": e["imbalance"]["prefix_aware"],
            "imbalance_ok": e["imbalance"]["prefix_aware"] <= TARGETS["imbalance_max"],
            "decision_us": e["decision_us"]["prefix_aware"],
            "decision_ok": e["decision_us"]["prefix_aware"] < TARGETS["decision_us_max"],
        })
    return rows


def by_replicas(entries: list[dict]) -> dict:
    """The contract view: replicas -> workload -> the run with the most conversations."""
    results: dict = {}
    for e in sorted(entries, key=lambda e: e["conversations"]):
        workload = e["workload"] + ("+host_tier" if e.get("host_tier_blocks") else "")
        results.setdefault(str(e["replicas"]), {})[workload] = e
    return dict(sorted(results.items(), key=lambda item: int(item[0])))


def write_markdown(path: Path, doc: dict) -> None:
    sim, wl, rows = doc["sim"], doc["workload"], doc["targets_check"]
    g = lambda m, p: "–" if m.get(p) is None else f"{m[p]}"
    lines = [
        "# Routing simulator", "",
        f"Command: `{doc['command']}` ({doc['host']}; wall time {doc['wall_s']:.0f} s, one process per workload).", "",
        "Drives the real `router.pool.PoolRouter` (the code the Serve request router runs inside the index actor) "
        f"over simulated replicas. Each replica has an LRU prefix cache of block hashes ({sim['capacity_blocks']} blocks "
        f"of {wl['block_size']} tokens), sends its `BlocksStored`/`BlocksRemoved` as `KVEventBatch`es and a `ReplicaLoad` "
        f"on every queue change (delivered {sim['event_delay_s'] * 1000:.0f} ms later), and serves requests in "
        f"{sim['prefill_s_per_token'] * 1e6:.0f} µs per uncached prompt token + {sim['decode_s_per_token'] * 1000:.0f} ms "
        f"per output token, at most {sim['max_running']} running per replica. Users: {sim['users_per_replica']} per replica "
        f"(so concurrency grows with the pool), capped at conversations/{sim['min_conversations_per_user']}; each runs "
        "conversations from one shared queue, back to back. Every policy replays the same seeded conversations.", "",
        "Workloads:",
        f"- **chat**: {wl['num_system_prompts']} system prompts of {wl['system_tokens']} tokens; {wl['turns'][0]}–{wl['turns'][1]} "
        f"turns; each turn's prompt = previous prompt + answer ({wl['answer_tokens'][0]}–{wl['answer_tokens'][1]} tokens) + new "
        f"user message ({wl['user_tokens'][0]}–{wl['user_tokens'][1]}); think time exponential, mean {wl['think_mean_s']} s; "
        "session id = conversation.",
        f"- **rag**: {wl['num_documents']} documents of {wl['document_tokens'][0]}–{wl['document_tokens'][1]} tokens (after a "
        f"shared system prompt), Zipf(s={wl['zipf_s']}) popularity; {wl['questions'][0]}–{wl['questions'][1]} independent "
        "questions per conversation about one document; no session id.", "",
        "What each figure means:",
        "- **hit**: prompt tokens found in the chosen replica's cache when the request starts / all prompt tokens, over "
        "every request of the run (whole blocks; the last prompt token is always computed).",
        "- **imbalance**: max over replicas of outstanding tokens (running context + waiting prompt tokens), averaged over "
        f"time, / the mean over replicas, averaged over time. Sampled every {sim['sample_every_s']} s of simulated time from "
        f"{sim['warmup_s']:.0f} s (warm-up: users start over the first {sim['ramp_s']:.0f} s) until the conversation queue "
        "empties (the drain afterwards is left out). Computed the same way for every policy. `mean tokens` is that mean.",
        "- **decision µs**: median (and p99) over every `PoolRouter.route(...)` call of the run, timed alone with "
        "`time.perf_counter` on this machine (block hashes are computed beforehand, once per request, as the Serve "
        "request router does). Wall time on a shared 2-core machine: p99 includes other processes' preemption.",
        f"- **oracle**: reads the replicas' true caches and loads (no events, no delay); among replicas whose true outstanding "
        f"tokens are at most {sim['oracle_load_bound']}× the pool mean (the imbalance target), the longest true cached prefix, "
        "ties to the less loaded. Greedy per request: a reference, not an upper bound. It does not use the router's settings.",
        "",
        f"Router settings: `{doc['routing']}`.", "",
        "## Results", "",
        "| conv. | replicas | users/replica | workload | requests | hit prefix_aware | hit round_robin | hit least_loaded | "
        "hit oracle | imbalance prefix_aware | imbalance round_robin | imbalance least_loaded | imbalance oracle | "
        "mean tokens | decision µs prefix_aware median (p99) | round_robin | least_loaded |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in doc["runs"]:
        h, im, d, d99 = e["hit_rate"], e["imbalance"], e["decision_us"], e["decision_us_p99"]
        lines.append(
            f"| {e['conversations']} | {e['replicas']} | {e['users'] / e['replicas']:.1f} | {_workload_label(e)} | {e['requests']} | "
            f"{g(h, 'prefix_aware')} | {g(h, 'round_robin')} | {g(h, 'least_loaded')} | {g(h, 'oracle')} | "
            f"{g(im, 'prefix_aware')} | {g(im, 'round_robin')} | {g(im, 'least_loaded')} | {g(im, 'oracle')} | "
            f"{g(e['mean_outstanding_tokens'], 'prefix_aware')} | {g(d, 'prefix_aware')} ({g(d99, 'prefix_aware')}) | "
            f"{g(d, 'round_robin')} ({g(d99, 'round_robin')}) | {g(d, 'least_loaded')} ({g(d99, 'least_loaded')}) |")
    lines += ["", "## Targets (prefix_aware)", "",
              "Hit rate ≥ 0.9 × oracle, imbalance ≤ 1.3, decision median < 200 µs.", "",
              "| conv. | replicas | users/replica | workload | hit / oracle | imbalance | decision µs (median) | met |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        missed = [name for name, ok in (("hit", row["hit_ok"]), ("imbalance", row["imbalance_ok"]),
                                         ("decision", row["decision_ok"])) if not ok]
        lines.append(f"| {row['conversations']} | {row['replicas']} | {row['users_per_replica']} | {_workload_label(row)} | "
                     f"{row['hit_ratio_to_oracle']} | {row['imbalance']} | {row['decision_us']} | "
                     f"{'yes' if not missed else 'MISSED: ' + ', '.join(missed)} |")
    tiered = [e for e in doc["runs"] if e.get("host_tier_blocks")]
    if tiered:
        lines += ["", "## Host tier", "",
                  f"Each replica's device cache holds {sim['capacity_blocks']} blocks; with the tier, the blocks it evicts "
                  f"move to a host tier of {sim['host_tier_blocks']} blocks (LRU) and a prefix continuing there is copied "
                  f"back at {sim['reload_s_per_token'] * 1e6:.2f} µs per token instead of prefilled at "
                  f"{sim['prefill_s_per_token'] * 1e6:.0f} µs. Router: `host_hit_weight` {doc['routing']['host_hit_weight']}. "
                  "Hit rates are prompt tokens served from the device cache (gpu) and from the host tier (host) / all "
                  "prompt tokens; the tier-off row is the same replay without the tier.", "",
                  "| conv. | replicas | workload | policy | hit off | hit on | gpu on | host on | TTFT ms off | TTFT ms on |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in tiered:
            off = next((o for o in doc["runs"] if not o.get("host_tier_blocks") and o["replicas"] == e["replicas"]
                        and o["workload"] == e["workload"] and o["conversations"] == e["conversations"]), None)
            for policy in e["hit_rate"]:
                lines.append(
                    f"| {e['conversations']} | {e['replicas']} | {e['workload']} | {policy} | "
                    f"{g(off['hit_rate'], policy) if off else '–'} | {e['hit_rate'][policy]} | {e['hit_rate_gpu'][policy]} | "
                    f"{e['hit_rate_host'][policy]} | {g(off['ttft_mean_ms'], policy) if off else '–'} | "
                    f"{e['ttft_mean_ms'][policy]} |")
    lines += ["", *doc.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def _workload_label(entry: dict) -> str:
    return entry["workload"] + (" +host tier" if entry.get("host_tier_blocks") else "")


def _parse_run(text: str) -> tuple[int, list[int]]:
    conversations, _, replicas = text.partition(":")
    return int(conversations), [int(n) for n in replicas.split(",")]


def _run_one_workload(args: tuple) -> list[dict]:
    runs, kind, policies, sim, wl = args
    return run_grid(runs, [kind], policies, sim, wl)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["1000:4,8,16,32,64", "10000:32,64"],
                        help="CONVERSATIONS:REPLICAS,... (each replica count replays that many conversations)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--users-per-replica", type=int, default=SimConfig.users_per_replica)
    parser.add_argument("--capacity-blocks", type=int, default=SimConfig.capacity_blocks)
    parser.add_argument("--host-tier-blocks", type=int, default=0,
                        help="per replica host tier (blocks); > 0 replays every run with the tier off and on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="processes (one workload each)")
    parser.add_argument("--out", default="bench/results/routing_sim")
    parser.add_argument("--markdown-only", action="store_true", help="re-render OUT.md from OUT.json, run nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        out = Path(args.out)
        doc = json.loads(out.with_suffix(".json").read_text())
        doc["notes"] = NOTES
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        write_markdown(out.with_suffix(".md"), doc)
        return 0
    runs = [_parse_run(text) for text in args.runs]
    sim = SimConfig(users_per_replica=args.users_per_replica, capacity_blocks=args.capacity_blocks,
                    host_tier_blocks=args.host_tier_blocks, seed=args.seed)
    wl = WorkloadConfig()
    t0 = time.perf_counter()
    jobs = [(runs, kind, args.policies, sim, wl) for kind in args.workloads]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            entries = [e for part in pool.map(_run_one_workload, jobs) for e in part]
    else:
        entries = [e for job in jobs for e in _run_one_workload(job)]
    entries.sort(key=lambda e: (e["conversations"], e["replicas"], e["workload"]))
    try:
        load_average = os.getloadavg()
    except OSError:
        load_average = None
    doc = {
        "command": "python -m tandem.bench.routing_sim " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": f"CPU only, {os.cpu_count()} cores shared, load average at the end {load_average}",
        "wall_s": time.perf_counter() - t0,
        "sim": asdict(sim),
        "workload": asdict(wl),
        "routing": asdict(RoutingConfig()),
        "targets": TARGETS,
        "results": by_replicas(entries),
        "runs": entries,
    }
    doc["targets_check"] = check_targets(entries)
    doc["notes"] = NOTES
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), doc)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


NOTES = [
    "## Caveats",
    "",
    "- Users are 16 per replica but at most conversations/4, so 1k conversations leave 32 and 64 replicas "
    "under-loaded (about 8 and 4 users a replica, a few running requests each): there max/mean is a "
    "small-numbers effect. least_loaded, which ignores prefixes and sees every load, keeps it under 1.3 in one "
    "of those three rows (1.26, 32 replicas, chat), the oracle in none (1.53-1.90); at 64 replicas one chat "
    "request's context (up to ~6.5k tokens) is more than a replica's mean outstanding tokens (4.6k). The 10k "
    "and 100k runs give every replica count its full 16 users; those are the rows the targets are meant for.",
    "- 100k conversations over 64 replicas: `python -m tandem.bench.routing_sim --runs 100000:64 --out "
    "bench/results/routing_sim_100k` (`routing_sim_100k.md`; 50 min on the 2-core machine). Prefix-aware: "
    "chat hit/oracle 0.934, imbalance 1.289, 66 µs; rag 1.001, 1.163, 71 µs. Targets met; the same picture "
    "as 10k, since more conversations at the same concurrency lengthen the replay of time averages.",
    "- The oracle is greedy per request and reads true loads, including tokens generated since the last report. "
    "It is a reference, not an upper bound; where prefix_aware beats it, hit/oracle is above 1.",
    "- Decision µs is wall time on a shared 2-core machine that other jobs were loading during the run (load "
    "average in the first line); the median is the robust figure, the p99 mostly measures preemption.",
    "- Cost model: no preemption; a running request's blocks can be evicted from the LRU while it runs (it "
    "stores its whole chain again when it finishes); decode speed does not depend on batch size.",
]

if __name__ == "__main__":
    sys.exit(main())
