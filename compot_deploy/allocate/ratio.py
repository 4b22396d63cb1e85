"""One factorization method, a fraction of the target linears' bytes removed: per-layer records that fit it.

uniform: every layer keeps the same fraction. spectral: the COMPOT paper's split, one global cut through the
pooled, normalised singular values of the unwhitened weights (`spectral_cut`). dynamic: one SVD of each whitened
weight estimates its error at every budget of a fine grid (METHOD §5). mckp: COMPOT itself is run on a coarser
(ratio × k/s) grid (ROCKET-style profiles). Both then split the global budget with the knapsack.

Each layer's profile (`layer_profile`: its spectrum, or its candidates) needs only its own weight and Gram, so a
block-by-block walk computes it as soon as the block's Grams exist; `allocate_profiles` then splits the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CompotError
from ..models import Target, dense_weight, is_causal_lm
from ..storage.budget import budget_bytes, linear_budget, linears_dense_bytes, value_bytes
from ..storage.record import STORAGE, LayerRecord, plan
from .knapsack import Candidate, mckp


@dataclass
class LayerProfile:
    """What the budget split needs of one layer: spectral: its normalised singular values (n,); dynamic/mckp:
    its candidates (bytes, estimated error, record). Small next to the layer's Gram."""

    spectrum: np.ndarray | None = None
    candidates: list[Candidate] | None = None


def _fit(t: Target, removed: float, f, k_over_s: float | None = None) -> LayerRecord:
    """t's record of f.method at `removed` of its dense bytes (at f.dtype)."""
    dense = LayerRecord(method="dense", d_in=t.d_in, d_out=t.d_out, bias=t.bias, dtype=f.dtype).bytes
    return plan(f.method, t.d_in, t.d_out, t.bias, budget_bytes(dense, removed=removed), f.dtype,
                f.k_over_s if k_over_s is None else k_over_s)


def needs_profiles(cfg) -> bool:
    """Whether cfg's allocation reads per-layer profiles (all but uniform)."""
    return cfg.allocation.strategy != "uniform"


def layer_profile(t: Target, W, gram, cfg, decoder: bool, L=None) -> LayerProfile:
    """Layer t's profile for cfg's allocation. W: (d_in, d_out) its dense weight; gram: its inputs' Gram (unused
    by spectral); L: its damped Cholesky factor when already known (damped_cholesky of gram.G)."""
    import torch

    from ..factorize import SpectralErrorEstimate, compot_whitened, damped_cholesky, whiten

    a, f = cfg.allocation, cfg.factorize
    if a.strategy == "spectral":
        W = W.detach().double()
        return LayerProfile(spectrum=(torch.linalg.svdvals(W) / torch.linalg.matrix_norm(W).clamp_min(1e-300)).numpy())
    cap = a.layer_ratio_cap(decoder=decoder)
    if a.strategy == "dynamic":
        ratios = [round(x, 4) for x in np.arange(0.0, cap + 1e-9, 0.02)]
        k_over_s_grid = (f.k_over_s,)
    else:
        ratios, k_over_s_grid = list(a.mckp_ratios), a.mckp_k_over_s
    if not STORAGE[f.method].sparse_codes:
        k_over_s_grid = (1.0,)
    M = whiten(W.detach(), damped_cholesky(gram.G, f.eps, t.name) if L is None else L)
    if a.strategy == "dynamic":
        U, estimate = None, SpectralErrorEstimate.of(M)
    else:  # mckp starts COMPOT from the left singular vectors
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        estimate = SpectralErrorEstimate(S, Vh)
    layer: dict[LayerRecord, Candidate] = {}
    for r in ratios:
        if not (a.min_layer_ratio <= r <= cap or r == 0.0 and a.min_layer_ratio == 0.0):
            continue
        for ks in k_over_s_grid:
            rec = _fit(t, r, f, ks)
            if rec in layer:
                continue
            if a.strategy == "dynamic" or not rec.storage.sparse_codes:
                err = rec.storage.spectral_error(estimate, rec)
            else:  # sparse codes (CoSpaDi too) are profiled with COMPOT: K-SVD over the grid would take hours
                err = compot_whitened(M, rec.k, rec.s, a.mckp_profile_iters, 0.0, U=U)[3][-1] ** 2
            layer[rec] = Candidate(rec.bytes, err, rec)
    if not layer:
        raise CompotError(f"{t.name}: no allocation candidate inside the layer ratio range")
    return LayerProfile(candidates=error_capped(list(layer.values()), a.max_layer_error))


def allocate(model, targets: list[Target], grams: dict, cfg, progress: bool = False) -> dict[str, LayerRecord]:
    """name → record of every target, whose total stored bytes fit the budget of `cfg` (CompressConfig; the
    budget is a fraction removed)."""
    from ..progress import bar

    decoder = is_causal_lm(model)
    profiles = None
    if needs_profiles(cfg):
        profiles = [layer_profile(t, dense_weight(model.get_submodule(t.name)), grams.get(t.name), cfg, decoder)
                    for t in bar(targets, desc=f"{cfg.allocation.strategy} profiles", unit="layer",
                                 progress=progress)]
    return allocate_profiles(targets, profiles, cfg, decoder)


def allocate_profiles(targets: list[Target], profiles: list[LayerProfile] | None, cfg,
                      decoder: bool) -> dict[str, LayerRecord]:
    """Split cfg's budget across `targets` given their profiles (layer_profile; None for uniform)."""
    a, f = cfg.allocation, cfg.factorize
    removed = a.budget.removed
    if a.strategy == "uniform":
        return {t.name: _fit(t, removed, f) for t in targets}
    total = linear_budget(a.budget, linears_dense_bytes(targets, value_bytes(f.dtype)))
    if a.strategy == "spectral":
        ratios = spectral_cut([p.spectrum for p in profiles], lambda i, r: _fit(targets[i], r, f).bytes,
                              total, a.min_layer_ratio, a.layer_ratio_cap(decoder=decoder))
        return {t.name: _fit(t, r, f) for t, r in zip(targets, ratios, strict=True)}
    cands = [p.candidates for p in profiles]
    try:
        picks = mckp(cands, total)
    except ValueError as e:
        hint = (f" (--max-layer-error {a.max_layer_error:g} leaves no cheap enough candidate in some layers: raise it)"
                if a.max_layer_error is not None else "")
        raise CompotError(f"{a.strategy} allocation: {e}{hint}") from None
    return {t.name: cs[j].record for t, cs, j in zip(targets, cands, picks)}


def error_capped(cands: list[Candidate], cap: float | None) -> list[Candidate]:
    """A layer's candidates whose estimated error is at most `cap` (ROCKET's per-layer cap), the least-error one
    kept whatever it is; all of them when cap is None."""
    if cap is None:
        return cands
    kept = [c for c in cands if c.error <= cap]
    return kept or [min(cands, key=lambda c: c.error)]


def spectral_cut(spectra: list[np.ndarray], layer_bytes: Callable[[int, float], int], total: float,
                 lo: float, hi: float) -> list[float]:
    """The fraction removed from each layer by one global cut through pooled spectra (COMPOT's allocation).

    spectra[i]: (n_i,) singular values of layer i's unwhitened weight divided by its Frobenius norm, so layers of
    any scale compare. A threshold τ removes from layer i the fraction of its values below τ, clamped to [lo, hi];
    τ is the smallest pooled value whose layers fit `total` bytes, layer_bytes(i, ratio) being layer i's stored
    bytes at a removed fraction (non-increasing in it). Layers whose energy sits in few directions lose most.
    """
    sorted_spectra = [np.sort(np.asarray(s, dtype=np.float64)) for s in spectra]

    def ratios_at(tau: float) -> list[float]:
        return [float(np.clip(np.searchsorted(s, tau, side="left") / len(s), lo, hi)) for s in sorted_spectra]

    def fits(tau: float) -> bool:
        return sum(layer_bytes(i, r) for i, r in enumerate(ratios_at(tau))) <= total

    cuts = np.unique(np.concatenate(sorted_spectra + [np.array([np.inf])]))
    if not fits(cuts[-1]):
        raise CompotError(f"spectral allocation: {total:,.0f} bytes cannot be reached with every layer at the "
                          f"largest ratio {hi}; raise --max-layer-ratio")
    first, last = 0, len(cuts) - 1  # bytes fall as τ rises: find the first cut that fits
    while first < last:
        mid = (first + last) // 2
        if fits(cuts[mid]):
            last = mid
        else:
            first = mid + 1
    return ratios_at(cuts[first])
