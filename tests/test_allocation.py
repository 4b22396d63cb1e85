import itertools
import random

import pytest

from compot_deploy.allocate.knapsack import Candidate, mckp
from compot_deploy.errors import CompotError


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


def _normalised_spectrum(W):
    import torch

    W = torch.as_tensor(W, dtype=torch.float64)
    return (torch.linalg.svdvals(W) / torch.linalg.matrix_norm(W)).numpy()


def test_spectral_cut_removes_most_from_the_low_rank_layer_and_fits_the_budget():
    import numpy as np

    from compot_deploy.allocate.ratio import spectral_cut

    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((64, 4)) @ rng.standard_normal((4, 64)) + 0.01 * rng.standard_normal((64, 64))
    flat = rng.standard_normal((64, 64))
    spectra = [_normalised_spectrum(low_rank), _normalised_spectrum(flat)]
    dense = 64 * 64 * 2

    def layer_bytes(i, r):  # bytes fall linearly with the removed fraction
        return int(np.ceil(dense * (1 - r)))

    ratios = spectral_cut(spectra, layer_bytes, total=dense, lo=0.0, hi=0.9)  # half of the two layers' bytes
    assert sum(layer_bytes(i, r) for i, r in enumerate(ratios)) <= dense
    assert ratios[0] == pytest.approx(0.9)  # 60 of its 64 directions hold 1e-4 of its energy: capped
    assert 0.05 <= ratios[1] <= 0.15  # the flat layer gives up only what the budget still needs
    # the smallest cut that fits: one pooled value lower and the layers no longer fit
    tighter = spectral_cut(spectra, layer_bytes, total=dense + 200, lo=0.0, hi=0.9)
    assert ratios[1] >= tighter[1]
    with pytest.raises(CompotError, match="max-layer-ratio"):
        spectral_cut(spectra, layer_bytes, total=0.5 * dense, lo=0.0, hi=0.6)
    guarded = spectral_cut(spectra, layer_bytes, total=dense, lo=0.3, hi=0.7)  # guards bind; 1/64 steps of the flat one
    assert guarded[0] == pytest.approx(0.7) and guarded[1] == pytest.approx(0.3, abs=1 / 64 + 1e-9)


def test_default_layer_cap_is_wide_for_decoders_and_near_the_budget_for_encoders():
    from compot_deploy.config import AllocationConfig
    from compot_deploy.storage.budget import Budget

    a = AllocationConfig(budget=Budget(removed=0.3))
    assert a.layer_ratio_cap() == pytest.approx(0.4) and a.layer_ratio_cap(decoder=True) == pytest.approx(0.9)
    assert AllocationConfig(budget=Budget(removed=0.95)).layer_ratio_cap(decoder=True) == pytest.approx(0.99)
    pinned = AllocationConfig(budget=Budget(removed=0.3), max_layer_ratio=0.5)
    assert pinned.layer_ratio_cap() == pinned.layer_ratio_cap(decoder=True) == 0.5


def test_per_layer_error_cap_drops_candidates_over_it():
    """ROCKET's per-layer error cap (--max-layer-error): candidates estimated above it leave the knapsack, the
    least-error one always stays."""
    from compot_deploy.allocate.knapsack import Candidate
    from compot_deploy.allocate.ratio import error_capped

    cands = [Candidate(100, 0.0), Candidate(60, 0.2), Candidate(30, 0.7)]
    assert error_capped(cands, None) == cands
    assert error_capped(cands, 0.5) == cands[:2]
    assert error_capped(cands[1:], 0.1) == [cands[1]]
