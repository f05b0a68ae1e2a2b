"""Choosing a backend: lowest expected wait in seconds of GPU work, without herding.

Each candidate carries the seconds of work ahead of a new request there (``wait_s``: the pod's
last report plus what this router sent since, each priced with the pod's own seconds per work
unit) and what this request would cost there (``cost_s``). The score is the wait alone. Scoring
the finish time (wait + cost) would favour faster GPUs, but the pods of one ImageGenerator share
one GPU type, and their learned unit costs differ mostly by measurement noise; adding the cost
would turn that noise into a standing preference for one idle pod over another.

Several router replicas see the same reports and would all send their next request to the same
pod. Two ways out, chosen by the ``pick`` setting:

* ``least-wait``: every candidate whose wait is within ``TIE_FRACTION`` of one request's cost of
  the best is treated as tied, and one of them is chosen at random. A pod is never chosen over one
  that is better by more than half a request, yet replicas holding equal views spread out.
* ``p2c``: power of two choices (Mitzenmacher): two distinct candidates drawn at random, the lower
  wait wins. Slightly worse than least-wait with one router, the classic remedy with many.

The functions here are pure: candidates in, candidate out, randomness from the given ``rng``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TIE_FRACTION = 0.5
MIN_TIE_S = 1e-3
"""Scores closer than this are equal whatever the request costs (free requests, unmeasured pods)."""


@dataclass(frozen=True)
class Candidate:
    name: str
    wait_s: float
    cost_s: float

    @property
    def score(self) -> float:
        return self.wait_s


Picker = Callable[[Sequence[Candidate], random.Random], Candidate]


def least_wait(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """The lowest score, chosen at random among those within a fraction of a request of it."""
    if not candidates:
        raise ValueError("no candidates")
    best = min(c.score for c in candidates)
    tolerance = max(MIN_TIE_S, TIE_FRACTION * min(c.cost_s for c in candidates))
    return rng.choice([c for c in candidates if c.score <= best + tolerance])


def power_of_two(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """The better of two distinct candidates drawn at random (ties broken at random)."""
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    if abs(a.score - b.score) <= MIN_TIE_S:
        return rng.choice((a, b))
    return a if a.score < b.score else b


PICKERS: dict[str, Picker] = {"least-wait": least_wait, "p2c": power_of_two}
