"""ROCKET's factorization (the seed's other sparse dictionary method), as its paper and public code describe it:
the top-k eigenbasis of M Mᵀ (M = LᵀW, whitened), codes kept per column by |c_ij|·‖a_i‖^½ (a_i the un-whitened
atom), over-sparsified by `reactivate` of the entries, the globally best dropped entries re-activated (so columns
differ in count), then a ridge least-squares refit of the dictionary and of the values on the fixed support.

Stored as COMPOT's fixed-s codes (s per column) plus `extra` re-activated entries in coordinate form
(RocketFactors): byte-exact for columns of varying count without a per-column pointer array.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compot import refit_masked
from .types import SparseFactors
from .whitening import unwhiten, whiten


@dataclass
class RocketFactors(SparseFactors):
    """W ≈ A · (C_s + C_extra): A: (d_in, k); values, indices: (s, d_out) as SparseFactors; extra_values,
    extra_rows, extra_cols: (e,) the re-activated entries of C, none of them on the fixed-s support."""

    extra_values: torch.Tensor = None
    extra_rows: torch.Tensor = None
    extra_cols: torch.Tensor = None

    def codes_dense(self) -> torch.Tensor:
        C = super().codes_dense()
        C[self.extra_rows.long(), self.extra_cols.long()] = self.extra_values.to(C.dtype)
        return C


def rocket_select(P: torch.Tensor, weight: torch.Tensor, s: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which codes ROCKET keeps. P: (k, d_out) codes, weight: (k,) atom weights → indices (s, d_out) of each
    column's s best scores |P|·weight, and the flat positions (extra,) of the best `extra` scores off them."""
    score = P.abs() * weight[:, None]
    idx = score.topk(s, dim=0, sorted=False).indices
    rest = score.scatter(0, idx, -1.0).reshape(-1)
    flat = rest.topk(extra, sorted=False).indices if extra else torch.zeros(0, dtype=torch.long)
    return idx, flat


def rocket(W: torch.Tensor, L: torch.Tensor, k: int, s: int, extra: int, ridge: float = 1e-6
           ) -> tuple[RocketFactors, list[float]]:
    """Factor W: (d_in, d_out) whitened by L: (d_in, d_in) into A: (d_in, k), s codes per column and `extra`
    more anywhere. Returns the factors (float64) and the relative whitened error before and after the refit."""
    M = whiten(W, L)
    d_in, d_out = M.shape
    if not (1 <= s <= k <= min(d_in, d_out)) or not 0 <= extra <= (k - s) * d_out:
        raise ValueError(f"need 1 <= s <= k <= min(d_in, d_out) and extra <= (k - s)·d_out; got s={s}, k={k}, "
                         f"extra={extra}, M {tuple(M.shape)}")
    D = torch.linalg.svd(M, full_matrices=False).U[:, :k]  # the top-k eigenvectors of M Mᵀ
    P = D.T @ M
    # an atom's weight: the square root of its un-whitened norm (large atoms move the raw weights more)
    weight = torch.linalg.vector_norm(unwhiten(D, L), dim=0).sqrt()
    idx, flat = rocket_select(P, weight, s, extra)
    mask = torch.zeros(k, d_out, dtype=M.dtype).scatter_(0, idx, 1.0)
    mask.view(-1)[flat] = 1.0
    C = P * mask
    norm = float(torch.linalg.norm(M)) or 1.0
    history = [float(torch.linalg.norm(M - D @ C)) / norm]
    D, C = refit_masked(M, C, mask, ridge)
    history.append(float(torch.linalg.norm(M - D @ C)) / norm)
    rows, cols = flat // d_out, flat % d_out
    return RocketFactors(A=unwhiten(D, L), values=C.gather(0, idx), indices=idx, extra_values=C[rows, cols],
                         extra_rows=rows, extra_cols=cols), history
