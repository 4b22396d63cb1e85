"""Splitting a global byte budget across layers: uniform, or a multiple-choice knapsack over per-layer
(bytes, estimated error) candidates — the solver behind both `dynamic` (METHOD §5) and `mckp` (§4).

Pure functions on numbers: no model, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def uniform(dense_bytes: list[int], ratio: float) -> list[float]:
    """Every layer keeps (1 − ratio) of its dense bytes."""
    return [(1.0 - ratio) * d for d in dense_bytes]


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: its exact bytes and its estimated error (relative squared, whitened)."""

    bytes: int
    error: float
    tag: tuple = ()


def mckp(candidates: list[list[Candidate]], budget: float, resolution: int = 4000) -> list[int]:
    """Multiple-choice knapsack: one candidate per layer, minimising Σ error with Σ bytes ≤ budget.

    Bytes are discretised into `resolution` units, each candidate's cost rounded up, so the exact total
    never exceeds the budget. Returns the chosen candidate index per layer.
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
    return picked[::-1]
