"""SVD-LLM baseline (METHOD §4): truncated SVD of the whitened target."""

from __future__ import annotations

import torch

from .types import LowRankFactors
from .whitening import unwhiten, whiten


def svd_llm(W: torch.Tensor, L: torch.Tensor, r: int, memo: dict | None = None) -> LowRankFactors:
    """W: (d_in, d_out), L: (d_in, d_in) → A = L⁻ᵀ U_r Σ_r: (d_in, r), B = V_rᵀ: (r, d_out). memo: a dict shared
    by calls on the same W and L (other ranks), keeping the SVD of the whitened W."""
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    svd = None if memo is None else memo.get("svd-llm svd")
    if svd is None:
        svd = torch.linalg.svd(whiten(W, L), full_matrices=False)
        if memo is not None:
            memo["svd-llm svd"] = svd
    U, S, Vh = svd
    return LowRankFactors(A=unwhiten(U[:, :r] * S[:r], L), B=Vh[:r].clone())
