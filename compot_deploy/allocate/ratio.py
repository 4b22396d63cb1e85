"""One factorization method, a fraction of the target linears' bytes removed: per-layer records that fit it.

uniform: every layer keeps the same fraction. dynamic: one SVD of each whitened weight estimates its error at
every budget of a fine grid (METHOD §5). mckp: COMPOT itself is run on a coarser (ratio × k/s) grid (ROCKET-style
profiles). Both then split the global budget with the knapsack.
"""

from __future__ import annotations

import numpy as np

from ..errors import CompotError
from ..models import Target, dense_weight
from ..storage.budget import budget_bytes, linear_budget, linears_dense_bytes, value_bytes
from ..storage.record import STORAGE, LayerRecord, plan
from .knapsack import Candidate, mckp


def allocate(model, targets: list[Target], grams: dict, cfg, progress: bool = False) -> dict[str, LayerRecord]:
    """name → record of every target, whose total stored bytes fit the budget of `cfg` (CompressConfig; the
    budget is a fraction removed)."""
    import torch

    from ..progress import bar

    from ..factorize import SpectralErrorEstimate, compot_whitened, damped_cholesky, whiten

    a, f = cfg.allocation, cfg.factorize
    removed = a.budget.removed

    def fit(t: Target, nbytes: float, k_over_s: float = f.k_over_s) -> LayerRecord:
        return plan(f.method, t.d_in, t.d_out, t.bias, nbytes, f.dtype, k_over_s)

    def dense(t: Target) -> int:
        return LayerRecord(method="dense", d_in=t.d_in, d_out=t.d_out, bias=t.bias, dtype=f.dtype).bytes

    if a.strategy == "uniform":
        return {t.name: fit(t, budget_bytes(dense(t), removed=removed)) for t in targets}

    if a.strategy == "dynamic":
        ratios = [round(x, 4) for x in np.arange(0.0, a.layer_ratio_cap + 1e-9, 0.02)]
        k_over_s_grid = (f.k_over_s,)
    else:
        ratios, k_over_s_grid = list(a.mckp_ratios), a.mckp_k_over_s
    if not STORAGE[f.method].sparse_codes:
        k_over_s_grid = (1.0,)
    cands: list[list[Candidate]] = []
    for t in bar(targets, desc=f"{a.strategy} profiles", unit="layer", progress=progress):
        W = dense_weight(model.get_submodule(t.name)).detach()
        M = whiten(W, damped_cholesky(grams[t.name].G, f.eps, t.name))
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        estimate = SpectralErrorEstimate(S, Vh)
        layer: dict[LayerRecord, Candidate] = {}
        for r in ratios:
            if not (a.min_layer_ratio <= r <= a.layer_ratio_cap or r == 0.0 and a.min_layer_ratio == 0.0):
                continue
            for ks in k_over_s_grid:
                rec = fit(t, budget_bytes(dense(t), removed=r), ks)
                if rec in layer:
                    continue
                if a.strategy == "dynamic" or not rec.storage.sparse_codes:
                    err = rec.storage.spectral_error(estimate, rec)
                else:  # sparse codes (CoSpaDi too) are profiled with COMPOT: K-SVD over the grid would take hours
                    err = compot_whitened(M, rec.k, rec.s, a.mckp_profile_iters, 0.0, U=U)[3][-1] ** 2
                layer[rec] = Candidate(rec.bytes, err, rec)
        if not layer:
            raise CompotError(f"{t.name}: no allocation candidate inside the layer ratio range")
        cands.append(list(layer.values()))
    total = linear_budget(a.budget, linears_dense_bytes(targets, value_bytes(f.dtype)))
    try:
        picks = mckp(cands, total)
    except ValueError as e:
        raise CompotError(f"{a.strategy} allocation: {e}") from None
    return {t.name: cs[j].record for t, cs, j in zip(targets, cands, picks)}
