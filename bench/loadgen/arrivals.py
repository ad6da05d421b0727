"""Arrival processes: when the runner starts the next session.

Open loop (`FixedRate`, `Poisson`, `Gamma`) yields the gaps between session starts whatever the
server does; `ClosedLoop` keeps `concurrency` sessions going, each starting its next session as
soon as the last one ends (the gap stream is unused there).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ArrivalProcess(Protocol):
    closed_loop: bool

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        """Seconds between consecutive session starts (open loop)."""
        ...

    def describe(self) -> str:
        ...

    @property
    def offered_load(self) -> float:
        """The x axis of a sweep: sessions/s for open loop, concurrency for closed loop."""
        ...


@dataclass(frozen=True)
class FixedRate:
    rate: float  # sessions per second; inf = all at once
    closed_loop: bool = False

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        gap = 0.0 if math.isinf(self.rate) else 1.0 / self.rate
        while True:
            yield gap

    def describe(self) -> str:
        return f"fixed rate {self.rate:g}/s"

    @property
    def offered_load(self) -> float:
        return self.rate


@dataclass(frozen=True)
class Poisson:
    rate: float
    closed_loop: bool = False

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        while True:
            yield 0.0 if math.isinf(self.rate) else float(rng.exponential(1.0 / self.rate))

    def describe(self) -> str:
        return f"Poisson {self.rate:g}/s"

    @property
    def offered_load(self) -> float:
        return self.rate


@dataclass(frozen=True)
class Gamma:
    """Gamma-distributed gaps with mean 1/rate and shape `burstiness` (vLLM's convention):
    1 is Poisson, below 1 burstier (coefficient of variation 1/sqrt(burstiness)), above 1
    more regular."""

    rate: float
    burstiness: float = 1.0
    closed_loop: bool = False

    def __post_init__(self) -> None:
        if self.burstiness <= 0:
            raise ValueError("burstiness must be > 0")

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        while True:
            if math.isinf(self.rate):
                yield 0.0
            else:
                yield float(rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness)))

    def describe(self) -> str:
        return f"gamma {self.rate:g}/s, burstiness {self.burstiness:g}"

    @property
    def offered_load(self) -> float:
        return self.rate


@dataclass(frozen=True)
class ClosedLoop:
    concurrency: int
    closed_loop: bool = True

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("closed-loop concurrency must be >= 1")

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        while True:
            yield 0.0

    def describe(self) -> str:
        return f"closed loop, {self.concurrency} concurrent"

    @property
    def offered_load(self) -> float:
        return float(self.concurrency)


ARRIVALS = ("poisson", "fixed", "gamma", "closed")


def make_arrival(kind: str, rate: float, burstiness: float = 1.0, concurrency: int = 1) -> ArrivalProcess:
    if kind == "poisson":
        return Poisson(rate)
    if kind == "fixed":
        return FixedRate(rate)
    if kind == "gamma":
        return Gamma(rate, burstiness)
    if kind == "closed":
        return ClosedLoop(concurrency)
    raise ValueError(f"unknown arrival process {kind!r}; choose from {ARRIVALS}")
