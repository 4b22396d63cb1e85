"""SVD-LLM baseline (METHOD §4): truncated SVD of the whitened target."""

from __future__ import annotations

import torch

from .types import LowRankFactors
from .whitening import unwhiten, whiten


def svd_llm(W: torch.Tensor, L: torch.Tensor, r: int) -> LowRankFactors:
    """W: (d_in, d_out), L: (d_in, d_in) → A = L⁻ᵀ U_r Σ_r: (d_in, r), B = V_rᵀ: (r, d_out)."""
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    M = whiten(W, L)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return LowRankFactors(A=unwhiten(U[:, :r] * S[:r], L), B=Vh[:r].clone())
