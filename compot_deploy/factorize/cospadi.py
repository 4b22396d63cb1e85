"""CoSpaDi baseline (METHOD §4): dense dictionary + column-sparse codes by K-SVD with batch OMP."""

from __future__ import annotations

import torch

from .types import SparseFactors
from .whitening import unwhiten, whiten


def batch_omp(D: torch.Tensor, M: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for every column of M at once (Batch-OMP, Cholesky-updated).

    D: (d, k) with unit-norm columns, M: (d, n) → values, indices: (s, n).
    """
    k, n = D.shape[1], M.shape[1]
    Gd = D.T @ D  # (k, k)
    alpha0 = D.T @ M  # (k, n)
    alpha = alpha0.clone()
    idx = torch.zeros(n, s, dtype=torch.long)
    # Inverse of the Cholesky factor of Gd[I, I], grown one row per step: only batched mat-vecs, no solves.
    Linv = torch.zeros(n, s, s, dtype=M.dtype)
    Linv[:, 0, 0] = 1.0
    cols = torch.arange(n)
    gamma = alpha0.new_zeros(n, 0)
    for t in range(s):
        score = alpha.abs().T  # (n, k)
        if t:
            score.scatter_(1, idx[:, :t], -1.0)
        kt = score.argmax(dim=1)
        if t:
            g = Gd[idx[:, :t], kt[:, None]]  # (n, t): correlations of chosen atoms with the new one
            w = torch.bmm(Linv[:, :t, :t], g.unsqueeze(-1)).squeeze(-1)
            lam = (1.0 - (w * w).sum(1)).clamp_min(1e-10).sqrt()
            Linv[:, t, :t] = -torch.bmm(w.unsqueeze(1), Linv[:, :t, :t]).squeeze(1) / lam[:, None]
            Linv[:, t, t] = 1.0 / lam
        idx[:, t] = kt
        Li = Linv[:, : t + 1, : t + 1]
        rhs = alpha0.T[cols[:, None], idx[:, : t + 1]].unsqueeze(-1)  # (n, t+1, 1)
        gamma = torch.bmm(Li.transpose(1, 2), torch.bmm(Li, rhs)).squeeze(-1)
        C = torch.zeros(k, n, dtype=M.dtype).scatter_(0, idx[:, : t + 1].T, gamma.T)
        alpha = alpha0 - Gd @ C
    return gamma.T.contiguous(), idx.T.contiguous()


def ksvd_whitened(
    M: torch.Tensor, k: int, s: int, iters: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Approximate K-SVD on M: (d_in, d_out). Init from the top-k left singular vectors (as COMPOT).

    Returns D: (d_in, k) unit-norm atoms, values, indices: (s, d_out), relative error per iteration.
    """
    d_in, d_out = M.shape
    gen = torch.Generator().manual_seed(seed)
    D = torch.linalg.svd(M, full_matrices=False).U[:, :k].clone()
    norm = float(torch.linalg.norm(M)) or 1.0
    history: list[float] = []
    for _ in range(iters):
        values, indices = batch_omp(D, M, s)
        C = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, indices, values)
        R = M - D @ C
        history.append(float(torch.linalg.norm(R)) / norm)
        for j in torch.randperm(k, generator=gen).tolist():
            omega = C[j].nonzero().squeeze(1)
            if omega.numel() == 0:
                # unused atom: restart it on the worst-represented column
                worst = int(R.norm(dim=0).argmax())
                D[:, j] = R[:, worst] / R[:, worst].norm().clamp_min(1e-12)
                continue
            E = R[:, omega] + D[:, j : j + 1] * C[j, omega]
            d = E @ C[j, omega]
            d = d / d.norm().clamp_min(1e-12)
            c = E.T @ d
            D[:, j] = d
            C[j, omega] = c
            R[:, omega] = E - d[:, None] * c
    values = C.gather(0, indices)
    history.append(float(torch.linalg.norm(M - D @ C)) / norm)
    return D, values, indices, history


def cospadi(
    W: torch.Tensor, L: torch.Tensor, k: int, s: int, iters: int = 5, seed: int = 0
) -> tuple[SparseFactors, list[float]]:
    """W: (d_in, d_out) whitened by L → A = L⁻ᵀ D: (d_in, k) and s-sparse codes."""
    D, values, indices, history = ksvd_whitened(whiten(W, L), k, s, iters, seed)
    return SparseFactors(A=unwhiten(D, L), values=values, indices=indices), history
