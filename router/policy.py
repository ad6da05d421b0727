"""The routing policy: rank a pool's replicas for one request, cached prefix against load.

Pure Python and deterministic given its inputs and its own state (a round-robin counter, a
seeded RNG, the session map). It sees each candidate as a `CandidateState` (blocks of this
request's prefix it holds, outstanding tokens, KV use) and returns replica ids best first;
Serve sends to the first one with a free slot.

`prefix_aware` (default) scores each replica

    prefix_weight * hit_fraction - load_weight * excess / load_scale - kv_weight * kv_usage

where `hit_fraction` is the share of the prompt already cached there, `excess` is how many
more outstanding tokens it has than the least loaded candidate, and `load_scale` is
max(`load_scale_tokens`, prompt tokens). So with unit weights a whole-prompt hit is worth up
to `load_scale_tokens` of extra queue: a few thousand tokens of skipped prefill pay for about
as many tokens of waiting (the ranking only compares replicas, so only the excess matters, not
the busiest replica's absolute load). A balance guard then checks the winner: if its
outstanding tokens exceed the least loaded replica's by more than `balance_abs_tokens` *and*
by a factor of more than `balance_rel`, the ranking falls back to least-loaded, so one hot
prefix cannot pile onto one replica. A session id sticks to the replica it last went to while
that replica is a candidate and passes the same guard. `round_robin`, `least_loaded` and
`random` are the baselines; they ignore prefixes and sessions.
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
    prefix_weight: float = 1.0
    load_weight: float = 1.0
    kv_weight: float = 0.25
    load_scale_tokens: int = 4096
    balance_abs_tokens: int = 8192
    balance_rel: float = 1.5
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
    matched_blocks: int = 0
    outstanding_tokens: int = 0
    kv_usage: float = 0.0


class RoutingPolicy:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._turn = 0  # round-robin position, also breaks ties between equal scores
        self._rng = random.Random(config.seed)
        self._session_replica: OrderedDict[str, str] = OrderedDict()

    def rank(self, request: RoutingRequest, candidates: Sequence[CandidateState]) -> list[str]:
        """Replica ids, best first (empty if there are no candidates)."""
        if not candidates:
            return []
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        turn = self._turn
        self._turn += 1
        policy = self.config.policy
        if policy == "round_robin":
            start = turn % len(ordered)
            return [c.replica_id for c in ordered[start:] + ordered[:start]]
        if policy == "random":
            ids = [c.replica_id for c in ordered]
            self._rng.shuffle(ids)
            return ids
        if policy == "least_loaded":
            return self._least_loaded(ordered, turn)
        return self._prefix_aware(request, ordered, turn)

    def session_replica(self, session_id: str) -> str | None:
        return self._session_replica.get(session_id)

    def forget_replica(self, replica_id: str) -> None:
        for session_id in [s for s, r in self._session_replica.items() if r == replica_id]:
            del self._session_replica[session_id]

    def _least_loaded(self, ordered: list[CandidateState], turn: int) -> list[str]:
        n = len(ordered)
        ranked = sorted(range(n), key=lambda i: (ordered[i].outstanding_tokens, ordered[i].kv_usage, (i - turn) % n))
        return [ordered[i].replica_id for i in ranked]

    def _prefix_aware(self, request: RoutingRequest, ordered: list[CandidateState], turn: int) -> list[str]:
        config = self.config
        n = len(ordered)
        num_prompt_tokens = max(1, request.num_prompt_tokens)
        least_loaded_tokens = min(c.outstanding_tokens for c in ordered)
        load_scale = max(config.load_scale_tokens, num_prompt_tokens)
        scores = [
            config.prefix_weight * min(1.0, c.matched_blocks * config.block_size / num_prompt_tokens)
            - config.load_weight * (c.outstanding_tokens - least_loaded_tokens) / load_scale
            - config.kv_weight * c.kv_usage
            for c in ordered
        ]
        ranked = [ordered[i] for i in sorted(range(n), key=lambda i: (-scores[i], (i - turn) % n))]

        sticky = None
        if request.session_id is not None:
            replica_id = self._session_replica.get(request.session_id)
            sticky = next((c for c in ranked if c.replica_id == replica_id), None)
        if sticky is not None and not self._overloaded(sticky, least_loaded_tokens):
            ranked.remove(sticky)
            ranked.insert(0, sticky)
            result = [c.replica_id for c in ranked]
        elif self._overloaded(ranked[0], least_loaded_tokens):
            result = self._least_loaded(ordered, turn)
        else:
            result = [c.replica_id for c in ranked]

        if request.session_id is not None:
            self._session_replica[request.session_id] = result[0]
            self._session_replica.move_to_end(request.session_id)
            while len(self._session_replica) > config.max_sessions:
                self._session_replica.popitem(last=False)
        return result

    def _overloaded(self, candidate: CandidateState, least_loaded_tokens: int) -> bool:
        excess = candidate.outstanding_tokens - least_loaded_tokens
        return (
            excess > self.config.balance_abs_tokens
            and candidate.outstanding_tokens > self.config.balance_rel * least_loaded_tokens
        )
