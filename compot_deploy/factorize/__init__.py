"""Per-layer factorization math: pure functions from (W, whitening factor, shape) to factors. No file I/O, no model;
storage/record.py maps each storage method to its function here."""

from __future__ import annotations

import numpy as np
import torch

from .compot import compot, compot_whitened
from .cospadi import cospadi
from .svd_llm import svd_llm
from .types import LowRankFactors, SparseFactors
from .whitening import damped_cholesky, unwhiten, whiten

__all__ = [
    "relative_error", "SpectralErrorEstimate", "compot", "compot_whitened", "cospadi",
    "svd_llm", "SparseFactors", "LowRankFactors", "damped_cholesky", "whiten", "unwhiten",
]


class SpectralErrorEstimate:
    """Relative squared error of a factorization of M = U diag(S) Vh, estimated from that one SVD (METHOD §5).

    lowrank(r): the exact tail energy. sparse(k, s): the error of hard-thresholding M onto its top-k singular
    basis (COMPOT's starting point, an upper bound on what its iterations reach):
    ‖M − U_k H_s(U_kᵀM)‖² = ‖M‖² − ‖H_s(diag(S_k) Vh_k)‖².
    """

    def __init__(self, S, Vh, SVh=None):
        S2 = (S * S).double()
        self.total = float(S2.sum()) or 1.0
        self.tail = (S2.flip(0).cumsum(0).flip(0) / self.total).tolist() + [0.0]  # tail[r] = Σ_{i≥r} σ²
        # (d_out, r): each column's energies along the basis, a row apiece so top-s runs along contiguous memory;
        # ranking only: float32 is plenty. NumPy: its introselect (np.partition) is 3-4x faster than torch.topk
        self.P2T = ((S[:, None] * Vh if SVh is None else SVh) ** 2).float().T.contiguous().cpu().numpy()

    @classmethod
    def of(cls, M) -> "SpectralErrorEstimate":
        """The estimate for M: (m, n) from the eigendecomposition of its smaller Gram (MMᵀ or MᵀM), 3-4× cheaper
        than its SVD; diag(S)·Vh is then UᵀM (wide M) or diag(S)·Vᵀ (tall). Squaring blurs only the smallest
        singular values, whose energy the estimates barely see."""
        m, n = M.shape
        lam, Q = torch.linalg.eigh(M @ M.T if m <= n else M.T @ M)
        lam, Q = lam.flip(0), Q.flip(1)
        S = lam.clamp_min(0.0).sqrt()
        return cls(S, None, Q.T @ M if m <= n else S[:, None] * Q.T)

    def lowrank(self, r: int) -> float:
        return self.tail[r]

    def sparse(self, k: int, s: int) -> float:
        kept = float(np.partition(self.P2T[:, :k], k - s, axis=1)[:, k - s:].sum(dtype=np.float64))
        return max(0.0, 1.0 - kept / self.total)


def relative_error(W, W_hat, L) -> float:
    """‖Lᵀ(W − Ŵ)‖_F / ‖Lᵀ W‖_F: the relative output error on the calibration inputs."""
    W = W.to(torch.float64)
    return float(torch.linalg.norm(L.T @ (W - W_hat.to(torch.float64))) / torch.linalg.norm(L.T @ W).clamp_min(1e-300))
