"""One token's log-probability, as the sampler reports it and the roles pass it on."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
