"""Whitening by the calibration Gram (METHOD §1): G + λI = L Lᵀ, so ‖X(W − Ŵ)‖_F = ‖Lᵀ(W − Ŵ)‖_F."""

from __future__ import annotations

import logging

import torch

from ..errors import CompotError

log = logging.getLogger(__name__)


def damped_cholesky(G: torch.Tensor, eps: float = 1e-6, name: str = "layer", max_eps: float = 1.0,
                    inplace: bool = False) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = G + λI, λ = ε·tr(G)/d; ε grows ×10 on failure up to `max_eps`.

    G: (d, d), any float dtype; returns L: (d, d) float64. inplace: G (float64) is damped in place, not copied,
    and must not be used after (a 14336² Gram is 1.6 GB a copy).
    """
    G = G.to(torch.float64)
    d = G.shape[0]
    if not torch.isfinite(G).all():
        raise CompotError(f"Gram of {name} contains NaN/Inf (non-finite activations in calibration)")
    mean_diag = float(torch.trace(G)) / d
    e, added = eps, 0.0
    damped = G if inplace else G.clone()  # no identity matrix: only the diagonal changes
    while e <= max_eps * (1 + 1e-9):
        damped.diagonal().add_(e * mean_diag - added)
        added = e * mean_diag
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and mean_diag > 0:
            if e != eps:
                log.warning("%s: Gram needed damping eps=%.0e (raised from %.0e) to be positive definite", name, e, eps)
            return L
        log.info("%s: Cholesky failed at eps=%.0e, raising damping", name, e)
        e *= 10
    raise CompotError(
        f"Gram of {name} is not positive definite even with damping eps={max_eps:g} "
        f"(trace {mean_diag * d:.3g}); its calibration inputs are degenerate"
    )


def whiten(W: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """M = Lᵀ W. W: (d_in, d_out), L: (d_in, d_in) lower → M: (d_in, d_out) float64."""
    return L.T @ W.to(torch.float64)


def unwhiten(D: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """A = L⁻ᵀ D by a triangular solve. D: (d_in, k) → A: (d_in, k) float64."""
    return torch.linalg.solve_triangular(L.T, D.to(torch.float64), upper=True)
