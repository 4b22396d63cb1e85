"""A multiple-choice knapsack over per-layer (bytes, estimated error) candidates: the solver behind `dynamic`
(METHOD §5), `mckp` (§4) and the joint allocator.

Pure functions on numbers: no model, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..storage.record import LayerRecord


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: its exact bytes, its estimated error (relative squared, whitened) and the record
    that stores it so."""

    bytes: int
    error: float
    record: "LayerRecord | None" = None

    def weighted(self, w: float) -> "Candidate":
        return replace(self, error=self.error * w)


def mckp(candidates: list[list[Candidate]], budget: float, resolution: int = 4000) -> list[int]:
    """Multiple-choice knapsack: one candidate per layer, minimising Σ error with Σ bytes ≤ budget.

    Bytes are discretised into `resolution` units, each candidate's cost rounded up, so the exact total
    never exceeds the budget; the bytes that rounding left unused are then spent exactly (`refine`).
    Returns the chosen candidate index per layer.
    Raises ValueError when even the cheapest candidates do not fit.
    """
    if sum(min(c.bytes for c in cs) for cs in candidates) > budget:
        raise ValueError("byte budget below the smallest candidate of every layer")
    unit = max(1.0, budget / resolution)
    cap = int(budget // unit)
    inf = math.inf
    best = np.zeros(cap + 1)  # best[u] = min error of the layers so far within u units
    choices = []
    for cs in candidates:
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for j, c in enumerate(cs):
            u = math.ceil(c.bytes / unit)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + c.error
            better = cand < new
            new[better], arg[better] = cand[better], j
        choices.append(arg)
        best = new
    u = int(np.argmin(best))
    if not np.isfinite(best[u]):
        raise ValueError("no combination of candidates fits the byte budget")
    picked = []
    for cs, arg in zip(reversed(candidates), reversed(choices)):
        j = int(arg[u])
        picked.append(j)
        u -= math.ceil(cs[j].bytes / unit)
    return refine(candidates, picked[::-1], budget)


def refine(candidates: list[list[Candidate]], picks: list[int], budget: float) -> list[int]:
    """Greedily switch single layers to lower-error candidates while the exact total stays within `budget`,
    largest error reduction first."""
    picks = list(picks)
    total = sum(cs[j].bytes for cs, j in zip(candidates, picks))
    while True:
        best = None
        for i, (cs, j) in enumerate(zip(candidates, picks)):
            for jj, c in enumerate(cs):
                gain = cs[j].error - c.error
                if gain > 0 and total - cs[j].bytes + c.bytes <= budget and (best is None or gain > best[0]):
                    best = (gain, i, jj)
        if best is None:
            return picks
        _, i, jj = best
        total += candidates[i][jj].bytes - candidates[i][picks[i]].bytes
        picks[i] = jj
