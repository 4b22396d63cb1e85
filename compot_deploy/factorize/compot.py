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
    if U is None:
        U = torch.linalg.svd(M, full_matrices=False).U
    if d_in > d_out:
        # Optimal D lies in the column space of M (Procrustes of M Cᵀ keeps it there), so solve the same problem
        # exactly on UᵀM: (d_out, d_out) instead of (d_in, d_out), and map back with U.
        D, values, indices, history = compot_whitened(U.T @ M, k, s, iters, tol, U=torch.eye(d_out, dtype=M.dtype))
        return U @ D, values, indices, history
    D = U[:, :k].clone()
    norm2 = float((M * M).sum()) or 1.0
    history: list[float] = []
    values, indices = hard_threshold(D.T @ M, s)
    for it in range(iters + 1):
        C = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, values)
        # D orthonormal and C = H_s(DᵀM) ⇒ ‖M − DC‖² = ‖M‖² − ‖C‖²: no product needed to track the error
        history.append(max(0.0, 1.0 - float((values * values).sum()) / norm2) ** 0.5)
        if it == iters or (len(history) > 1 and history[-2] - history[-1] < tol * max(history[-2], 1e-12)):
            break
        D = procrustes(M @ C.T)
        values, indices = hard_threshold(D.T @ M, s)
    return D, values, indices, history


def refit_support(M, D, values, indices, ridge=1e-10, chunk_bytes=2**27):
    """ROCKET's closing least squares on COMPOT's fixed support: the dictionary, then each column's values.

    M: (d_in, d_out), D: (d_in, k), values, indices: (s, d_out) → D: (d_in, k) (no longer orthogonal), values.
    Each step minimises ‖M − D C‖ exactly over a set holding the current point, so the error cannot rise
    (up to the ridge, ridge·mean(diag) of each normal matrix, there only to keep unused atoms solvable).
    """
    k, d_out = D.shape[1], M.shape[1]
    s = indices.shape[0]
    C = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, values)
    # D = argmin ‖M − D C‖: D (C Cᵀ) = M Cᵀ
    CCt = C @ C.T
    CCt.diagonal().add_(ridge * float(CCt.diagonal().mean()) + 1e-300)
    D = torch.linalg.solve(CCt, (M @ C.T).T).T
    # values: per column j, (D_Sᵀ D_S) c = D_Sᵀ m_j on its support S = indices[:, j], in chunks of columns
    G = D.T @ D
    R = D.T @ M  # (k, d_out)
    lam = ridge * float(G.diagonal().mean()) + 1e-300
    out = torch.empty_like(values)
    step = max(1, chunk_bytes // (8 * s * s))
    for a in range(0, d_out, step):
        idx = indices[:, a:a + step].T  # (n, s)
        Gs = G[idx[:, :, None], idx[:, None, :]]  # (n, s, s)
        Gs.diagonal(dim1=1, dim2=2).add_(lam)
        rhs = R[:, a:a + step].gather(0, idx.T).T.unsqueeze(-1)  # (n, s, 1)
        out[:, a:a + step] = torch.linalg.solve(Gs, rhs).squeeze(-1).T
    return D, out


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
