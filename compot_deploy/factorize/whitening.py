"""Whitening by the calibration Gram (METHOD §1): G + λI = L Lᵀ, so ‖X(W − Ŵ)‖_F = ‖Lᵀ(W − Ŵ)‖_F."""

from __future__ import annotations

import logging

import torch

from ..errors import CompotError

log = logging.getLogger(__name__)


def damped_cholesky(G: torch.Tensor, eps: float = 1e-6, name: str = "layer", max_eps: float = 1.0,
                    inplace: bool = False) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = G + λI, λ = ε·tr(G)/d; ε grows ×10 on failure up to `max_eps`.

    G: (d, d), any float dtype; returns L: (d, d) float64. inplace: a float64 G becomes L (factored where it
    lies: a 14336² Gram is 1.6 GB, and a copy next to it is what set the 8B walk's peak) and must not be used
    after.
    """
    if not torch.isfinite(G).all():
        raise CompotError(f"Gram of {name} contains NaN/Inf (non-finite activations in calibration)")
    A = G.to(torch.float64, copy=not inplace).contiguous()
    d = A.shape[0]
    diag = A.diagonal().clone()
    mean_diag = float(diag.sum()) / d
    e = eps
    while e <= max_eps * (1 + 1e-9):
        A.diagonal().copy_(diag).add_(e * mean_diag)  # no identity matrix: only the diagonal changes
        if mean_diag > 0 and (_cholesky_lower_inplace(A) if A.device.type == "cpu" else _cholesky_lower_torch(A)) == 0:
            if e != eps:
                log.warning("%s: Gram needed damping eps=%.0e (raised from %.0e) to be positive definite", name, e, eps)
            return A.tril_()
        _mirror_upper_to_lower(A)  # the failed factorization overwrote only the lower triangle
        log.info("%s: Cholesky failed at eps=%.0e, raising damping", name, e)
        e *= 10
    raise CompotError(
        f"Gram of {name} is not positive definite even with damping eps={max_eps:g} "
        f"(trace {mean_diag * d:.3g}); its calibration inputs are degenerate"
    )


def _cholesky_lower_inplace(A: torch.Tensor) -> int:
    """LAPACK potrf on A's own memory: A (d, d) float64, C-contiguous, symmetric. Its lower triangle becomes L
    (the strictly upper one is left as it was). Returns LAPACK's info (0: done; > 0: not positive definite)."""
    from scipy.linalg import lapack

    # A's row-major buffer read column-major is Aᵀ = A; the upper factor U (UᵀU = A) written there, read back
    # row-major, is Uᵀ = L in A's lower triangle.
    _, info = lapack.dpotrf(A.numpy().T, lower=0, overwrite_a=1, clean=0)
    return int(info)


def _cholesky_lower_torch(A: torch.Tensor) -> int:
    """As _cholesky_lower_inplace for a tensor LAPACK cannot reach (a GPU's): the factor is computed beside A,
    then copied into its lower triangle."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        A.copy_(L)
    return int(info)


def _mirror_upper_to_lower(A: torch.Tensor, rows: int = 1024) -> None:
    """A (d, d): the strictly lower triangle set from the strictly upper one, a band of rows at a time (no copy
    of A)."""
    for r0 in range(0, A.shape[0], rows):
        band = A[r0:r0 + rows]
        band[:, :r0] = A[:r0, r0:r0 + rows].T
        band[:, r0:r0 + rows].copy_(band[:, r0:r0 + rows].triu() + band[:, r0:r0 + rows].triu(1).T)


def whiten(W: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """M = Lᵀ W. W: (d_in, d_out), L: (d_in, d_in) lower → M: (d_in, d_out) float64."""
    return L.T @ W.to(torch.float64)


def unwhiten(D: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """A = L⁻ᵀ D by a triangular solve. D: (d_in, k) → A: (d_in, k) float64."""
    return torch.linalg.solve_triangular(L.T, D.to(torch.float64), upper=True)
