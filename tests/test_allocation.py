import itertools
import random

import pytest

from compot_deploy.allocate.knapsack import Candidate, mckp


@pytest.mark.parametrize("seed", range(5))
def test_mckp_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = []
    for _ in range(4):
        layers.append([Candidate(bytes=rng.randint(10, 400), error=rng.random()) for _ in range(4)])
    budget = 700
    picks = mckp(layers, budget, resolution=700)
    assert sum(layers[i][j].bytes for i, j in enumerate(picks)) <= budget
    best = min(
        (sum(c.error for c in combo) for combo in itertools.product(*layers) if sum(c.bytes for c in combo) <= budget),
        default=None,
    )
    got = sum(layers[i][j].error for i, j in enumerate(picks))
    assert got == pytest.approx(best)


def test_mckp_never_exceeds_budget_with_coarse_units():
    layers = [[Candidate(bytes=b, error=1.0 / b) for b in (101, 257, 499, 1001)] for _ in range(10)]
    picks = mckp(layers, 4000, resolution=37)
    assert sum(layers[i][j].bytes for i, j in enumerate(picks)) <= 4000


def test_mckp_rejects_impossible_budget():
    with pytest.raises(ValueError):
        mckp([[Candidate(100, 0.0)], [Candidate(100, 0.0)]], 150)
