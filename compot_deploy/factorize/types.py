"""Factor containers produced by the methods (all float64, un-whitened, W ≈ product)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseFactors:
    """W ≈ A · C with C column-sparse.

    A: (d_in, k); values, indices: (s, d_out) — column j of C holds values[:, j] at rows indices[:, j].
    """

    A: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    @property
    def k(self) -> int:
        return self.A.shape[1]

    @property
    def s(self) -> int:
        return self.values.shape[0]

    def codes_dense(self) -> torch.Tensor:
        """C: (k, d_out) — for analysis only; runtime modules never build it."""
        C = torch.zeros(self.k, self.values.shape[1], dtype=self.values.dtype)
        return C.scatter_(0, self.indices.long(), self.values)

    def dense(self) -> torch.Tensor:
        """Ŵ: (d_in, d_out)."""
        return self.A @ self.codes_dense()


@dataclass
class LowRankFactors:
    """W ≈ A · B. A: (d_in, r), B: (r, d_out)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def r(self) -> int:
        return self.A.shape[1]

    def dense(self) -> torch.Tensor:
        return self.A @ self.B


def hard_threshold(P: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H_s on each column of P: (k, n) → (values, indices), both (s, n), keeping the s largest |entries|
    (in no particular order within a column; CompotLinear stores them in ascending row order)."""
    idx = P.abs().topk(s, dim=0, sorted=False).indices
    return P.gather(0, idx), idx
