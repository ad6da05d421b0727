"""The routing policy: rank a pool's replicas for one request, cached prefix against load.

Pure Python and deterministic given its inputs and its own state (a round-robin counter, a
seeded RNG, the session map). The hot path, `rank_lists`, takes plain parallel lists (replica
ids, matched blocks, outstanding tokens, KV use) and returns replica ids best first; Serve
sends to the first one with a free slot. `rank` takes `CandidateState`s, for callers that
prefer records.

`prefix_aware` (default) gives each replica a cost in tokens, as Dynamo's KV router does:

    cost = outstanding_tokens − prefix_weight · cached_tokens + kv_weight · load_scale_tokens · kv_usage

`cached_tokens` is how much of this prompt the replica already holds (whole blocks, the last
prompt token always computed). A block the replica holds only in its host tier (copied back
before use, `engine/host_tier.py`) counts `host_hit_weight` of a device block: between a device
hit (1) and a miss (0); docs/ROUTER.md says where the default comes from. So with `prefix_weight` 1 a cached token is worth exactly one
token of queue: a replica holding a 3k-token conversation keeps it until it carries 3k tokens
more than another replica, and then the conversation moves (one re-prefill) instead of the
pile growing. The lowest cost wins; ties rotate so idle replicas share new prefixes.

A balance guard then checks the winner against the whole pool, as SGLang's cache-aware router
does: if its outstanding tokens exceed the least loaded replica's by more than
`balance_abs_tokens` *and* the pool's mean by a factor of more than `balance_rel`, the ranking
falls back to least-loaded, so one hot prefix cannot pile onto one replica.

Sessions: a `session_id` remembers the replica it last went to and that request's prompt
length; that replica is assumed to hold that prompt even before its KV events arrive (a chat
turn extends the previous one). Stickiness is thus a cache estimate inside the same cost, not
an override of it.

`round_robin`, `least_loaded` and `random` are the baselines; they ignore prefixes and sessions.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PolicyName = Literal["prefix_aware", "round_robin", "least_loaded", "random"]
POLICY_NAMES: tuple[str, ...] = ("prefix_aware", "round_robin", "least_loaded", "random")


@dataclass(frozen=True)
class RoutingConfig:
    """One pool's routing settings. `block_size` must equal the workers' KV block size."""

    policy: PolicyName = "prefix_aware"
    block_size: int = 16
    prefix_weight: float = 6.0  # tokens of queue one cached prompt token is worth
    # A prompt token cached only in a replica's host tier, as a fraction of one cached on its
    # device: a reload costs a host-to-device copy, far less than the prefill it saves
    # (docs/ROUTER.md, "Two tiers").
    host_hit_weight: float = 0.75
    load_weight: float = 1.0  # per outstanding token (the unit of the cost)
    kv_weight: float = 0.25  # a full KV cache counts as kv_weight * load_scale_tokens tokens
    load_scale_tokens: int = 4096
    balance_abs_tokens: int = 2048
    balance_rel: float = 1.15  # of the pool's mean outstanding tokens
    max_sessions: int = 100_000
    max_index_blocks: int = 1_000_000
    in_flight_ttl_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {POLICY_NAMES}, got {self.policy!r}")
        if self.block_size < 1 or self.load_scale_tokens < 1 or self.max_sessions < 1 or self.max_index_blocks < 1:
            raise ValueError("block_size, load_scale_tokens, max_sessions and max_index_blocks must be >= 1")
        if min(self.prefix_weight, self.load_weight, self.kv_weight, self.balance_abs_tokens) < 0:
            raise ValueError("weights and balance_abs_tokens must be >= 0")
        if not 0.0 <= self.host_hit_weight <= 1.0:
            raise ValueError("host_hit_weight must be in [0, 1]: a host hit is worth no more than a device hit")
        if self.balance_rel < 1.0:
            raise ValueError("balance_rel must be >= 1")


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """What the policy needs to know about a request."""

    request_id: str
    block_hashes: list[int]
    num_prompt_tokens: int
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class CandidateState:
    """One replica as the policy sees it for one request."""

    replica_id: str
    matched_blocks: int = 0  # device and host tier together
    outstanding_tokens: int = 0
    kv_usage: float = 0.0
    host_blocks: int = 0  # of `matched_blocks`, those only in the host tier (the last ones)


class RoutingPolicy:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._turn = 0  # round-robin position, also breaks ties between equal scores
        self._rng = random.Random(config.seed)
        # session_id -> (replica it last went to, that request's prompt tokens), LRU order
        self._sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def rank(self, request: RoutingRequest, candidates: Sequence[CandidateState]) -> list[str]:
        """Replica ids, best first (empty if there are no candidates)."""
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        return self.rank_lists(
            request,
            [c.replica_id for c in ordered],
            [c.matched_blocks for c in ordered],
            [c.outstanding_tokens for c in ordered],
            [c.kv_usage for c in ordered],
            {i: c.host_blocks for i, c in enumerate(ordered) if c.host_blocks},
        )

    def rank_lists(
        self,
        request: RoutingRequest,
        replica_ids: Sequence[str],
        matched_blocks: Sequence[int] | dict[int, int],
        outstanding_tokens: Sequence[int],
        kv_usage: Sequence[float],
        host_blocks: dict[int, int] | None = None,
    ) -> list[str]:
        """`rank` over parallel lists; `replica_ids` in a stable order (rotation uses it).

        `matched_blocks` may also be a dict {position in replica_ids: blocks} holding only the
        replicas that hold some of the prefix (what the pool router passes). `host_blocks`
        {position: blocks}: how many of a replica's matched blocks are in its host tier only."""
        n = len(replica_ids)
        if n == 0:
            return []
        turn = self._turn
        self._turn += 1
        start = turn % n
        rotated = list(range(start, n)) + list(range(start))  # ties go to the next in turn
        policy = self.config.policy
        if policy == "round_robin":
            return [replica_ids[i] for i in rotated]
        if policy == "random":
            ids = list(replica_ids)
            self._rng.shuffle(ids)
            return ids
        if policy == "least_loaded":
            return self._least_loaded(replica_ids, outstanding_tokens, kv_usage, rotated)
        return self._prefix_aware(request, replica_ids, matched_blocks, outstanding_tokens, kv_usage, rotated,
                                  host_blocks)

    def session_replica(self, session_id: str) -> str | None:
        entry = self._sessions.get(session_id)
        return entry[0] if entry is not None else None

    def forget_replica(self, replica_id: str) -> None:
        for session_id in [s for s, (r, _) in self._sessions.items() if r == replica_id]:
            del self._sessions[session_id]

    def _least_loaded(self, replica_ids, outstanding_tokens, kv_usage, rotated: list[int]) -> list[str]:
        rotated.sort(key=lambda i: (outstanding_tokens[i], kv_usage[i]))  # stable: ties keep the turn order
        return list(map(replica_ids.__getitem__, rotated))

    def _prefix_aware(self, request, replica_ids, matched_blocks, outstanding_tokens, kv_usage, rotated: list[int],
                      host_blocks: dict[int, int] | None = None) -> list[str]:
        config = self.config
        n = len(replica_ids)
        # The last prompt token is always computed, so at most this many blocks can be reused.
        usable_blocks = max(0, (request.num_prompt_tokens - 1) // config.block_size)
        prefix_per_block = config.prefix_weight * config.block_size
        kv_scale = config.kv_weight * config.load_scale_tokens
        load_weight = config.load_weight
        costs = [load_weight * o + kv_scale * k for o, k in zip(outstanding_tokens, kv_usage)]
        if isinstance(matched_blocks, dict):  # replica position -> blocks, only the holders
            for i, m in matched_blocks.items():
                costs[i] -= prefix_per_block * (m if m < usable_blocks else usable_blocks)
        else:
            for i, m in enumerate(matched_blocks):
                if m:
                    costs[i] -= prefix_per_block * (m if m < usable_blocks else usable_blocks)
        if host_blocks:
            # Host blocks are the tail of a match; those within the usable part are worth only
            # host_hit_weight of the device block they were counted as above.
            host_discount = prefix_per_block * (1.0 - config.host_hit_weight)
            for i, h in host_blocks.items():
                m = matched_blocks.get(i, 0) if isinstance(matched_blocks, dict) else matched_blocks[i]
                usable_host = min(m, usable_blocks) - max(0, m - h)
                if usable_host > 0:
                    costs[i] += host_discount * usable_host
        session_id = request.session_id
        if session_id is not None:
            entry = self._sessions.get(session_id)
            if entry is not None:
                # Its last replica holds its last prompt, whether or not the events are in yet.
                last_replica, last_prompt_tokens = entry
                try:
                    i = replica_ids.index(last_replica)
                except ValueError:
                    i = -1
                if i >= 0:
                    known = matched_blocks.get(i, 0) if isinstance(matched_blocks, dict) else matched_blocks[i]
                    known = min(known, usable_blocks)
                    assumed = min(max(0, (last_prompt_tokens - 1) // config.block_size), usable_blocks)
                    if assumed > known:
                        costs[i] -= prefix_per_block * (assumed - known)
        # The balance guard: a replica far above both the least loaded one and the pool's mean
        # takes no new work while another can; those go last, least loaded first.
        ceiling = max(min(outstanding_tokens) + config.balance_abs_tokens, config.balance_rel * sum(outstanding_tokens) / n)
        over = None
        if max(outstanding_tokens) > ceiling:
            over = [i for i in rotated if outstanding_tokens[i] > ceiling]
            rotated = [i for i in rotated if outstanding_tokens[i] <= ceiling]
            over.sort(key=outstanding_tokens.__getitem__)
            rotated += over
            for i in over:
                costs[i] = float("inf")  # keeps them last through the sort below
        rotated.sort(key=costs.__getitem__)  # stable: ties keep the turn order (and `over`'s load order)
        ranked = list(map(replica_ids.__getitem__, rotated))
        if session_id is not None:
            sessions = self._sessions
            sessions[session_id] = (ranked[0], request.num_prompt_tokens)
            sessions.move_to_end(session_id)
            if len(sessions) > config.max_sessions:
                sessions.popitem(last=False)
        return ranked
