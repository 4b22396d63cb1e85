"""COMPOT (METHOD §2): orthogonal dictionary + column-sparse codes, closed-form alternation."""

from __future__ import annotations

import torch

from .types import SparseFactors, hard_threshold
from .whitening import unwhiten, whiten


def procrustes(B: torch.Tensor) -> torch.Tensor:
    """argmax_D tr(Dᵀ B) over DᵀD = I: the polar factor P Qᵀ of B = P Σ Qᵀ. B: (d_in, k) → (d_in, k).

    Computed as B (BᵀB)^(-1/2) from a k × k eigendecomposition (much cheaper than a tall SVD); falls back to the
    SVD when B is close to rank-deficient.
    """
    evals, Q = torch.linalg.eigh(B.T @ B)
    if evals[0] > 1e-10 * evals[-1]:
        return B @ ((Q * evals.rsqrt()) @ Q.T)
    P, _, Qh = torch.linalg.svd(B, full_matrices=False)
    return P @ Qh


def top_left_singular(M: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of M: (d_in, d_out), d_in ≤ d_out, by descending singular value: (d_in, d_in).

    From the eigendecomposition of the d_in × d_in Gram M Mᵀ, 3-4× cheaper than the SVD of a wide M (640 × 2048
    float64: 0.07 s against 0.31); squaring the condition number blurs only the smallest directions, and this
    is COMPOT's starting point, which the alternations refine.
    """
    return torch.linalg.eigh(M @ M.T)[1].flip(1)


def stalled(history: list[float], tol: float) -> bool:
    """COMPOT's stopping rule: the last alternation lowered the relative error by less than `tol` of it."""
    return len(history) > 1 and history[-2] - history[-1] < tol * max(history[-2], 1e-12)


def compot_whitened(
    M: torch.Tensor, k: int, s: int, iters: int = 10, tol: float = 1e-4, U: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """min ‖M − D C‖_F over DᵀD = I_k and s-sparse columns of C.

    M: (d_in, d_out) float64; k ≤ min(d_in, d_out); s ≤ k. U: optional left singular vectors of M
    (d_in, ≥k), reused when the caller already has them.
    Returns D: (d_in, k), values, indices: (s, d_out), and the relative error after each step.
    """
    d_in, d_out = M.shape
    if not (1 <= s <= k <= min(d_in, d_out)):
        raise ValueError(f"need 1 <= s <= k <= min(d_in, d_out); got s={s}, k={k}, M {tuple(M.shape)}")
    if d_in > d_out:
        # Optimal D lies in the column space of M (Procrustes of M Cᵀ keeps it there), so solve the same problem
        # exactly on QᵀM: (d_out, d_out) instead of (d_in, d_out), Q any orthonormal basis of that space (the
        # caller's U, else a QR: 3× cheaper than the SVD), and map back with Q.
        Q, R = (U[:, :d_out], U[:, :d_out].T @ M) if U is not None else torch.linalg.qr(M)
        D, values, indices, history = compot_whitened(R, k, s, iters, tol)
        return Q @ D, values, indices, history
    if U is None:
        U = top_left_singular(M)
    D = U[:, :k].clone()
    norm2 = float((M * M).sum()) or 1.0
    history: list[float] = []
    values, indices = hard_threshold(D.T @ M, s)
    for it in range(iters + 1):
        C = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, values)
        # D orthonormal and C = H_s(DᵀM) ⇒ ‖M − DC‖² = ‖M‖² − ‖C‖²: no product needed to track the error
        history.append(max(0.0, 1.0 - float((values * values).sum()) / norm2) ** 0.5)
        if it == iters or stalled(history, tol):
            break
        D = procrustes(M @ C.T)
        values, indices = hard_threshold(D.T @ M, s)
    return D, values, indices, history


def refit_support(M: torch.Tensor, D: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  ridge: float = 1e-10, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """ROCKET's closing least squares on COMPOT's fixed support: the dictionary, then each column's values.

    M: (d_in, d_out), D: (d_in, k), values, indices: (s, d_out) → D: (d_in, k) (no longer orthogonal), values.
    Each step lowers ‖M − D C‖ over a set holding the current point, so the error cannot rise (up to the ridge,
    ridge·mean(diag) of the normal matrix, there only to keep unused atoms solvable).
    """
    k, d_out = D.shape[1], M.shape[1]
    C = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, values)
    mask = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, 1.0)
    D, C = refit_masked(M, C, mask, ridge, rtol, steps=indices.shape[0])
    return D, C.gather(0, indices)


def refit_masked(M: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, ridge: float = 1e-10, rtol: float = 1e-6,
                 steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dictionary D = argmin ‖M − D C‖ (ridge-damped normal equations), then C re-solved on its support.

    M: (d_in, d_out), C: (k, d_out) zero off the support, mask: (k, d_out) 1 on it (any count per column) →
    D: (d_in, k), C: (k, d_out). `steps`: conjugate-gradient steps, at most the largest column count.
    """
    # D = argmin ‖M − D C‖: D (C Cᵀ) = M Cᵀ
    CCt = C @ C.T
    CCt.diagonal().add_(ridge * float(CCt.diagonal().mean()) + 1e-300)
    D = torch.linalg.solve(CCt, (M @ C.T).T).T
    # values: per column j, min ‖m_j − D c‖ over c on its support. Conjugate gradients on the masked normal
    # equations, all columns at once from the current values: each step lowers every column's error, and no
    # per-column normal matrices are formed (D is near-orthogonal, so few steps reach the solution).
    C = C.clone()
    G = D.T @ D
    r = (D.T @ M - G @ C) * mask
    p = r.clone()
    rr = (r * r).sum(0)
    stop = rtol * rtol * float(((D.T @ M) ** 2).sum())
    for _ in range(steps if steps is not None else int(mask.sum(0).max())):
        if float(rr.sum()) <= stop:
            break
        Ap = (G @ p) * mask
        alpha = rr / (p * Ap).sum(0).clamp_min(1e-300)
        C += alpha * p
        r -= alpha * Ap
        rr_new = (r * r).sum(0)
        p = r + (rr_new / rr.clamp_min(1e-300)) * p
        rr = rr_new
    return D, C


def compot(
    W: torch.Tensor, L: torch.Tensor, k: int, s: int, iters: int = 10, tol: float = 1e-4, refit: bool = False
) -> tuple[SparseFactors, list[float]]:
    """Factor W: (d_in, d_out) whitened by L: (d_in, d_in) into A: (d_in, k) and s-sparse codes; `refit` closes
    with refit_support (the history then ends with the refitted error)."""
    M = whiten(W, L)
    D, values, indices, history = compot_whitened(M, k, s, iters, tol)
    if refit:
        D, values = refit_support(M, D, values, indices)
        C = torch.zeros(k, M.shape[1], dtype=M.dtype).scatter_(0, indices, values)
        history.append(float(torch.linalg.norm(M - D @ C) / torch.linalg.norm(M).clamp_min(1e-300)))
    return SparseFactors(A=unwhiten(D, L), values=values, indices=indices), history
