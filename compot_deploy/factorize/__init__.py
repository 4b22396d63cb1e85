"""Per-layer factorization: one pure function from (W, Gram, plan) to factors. No file I/O, no model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..budget import compot_bytes, dense_bytes, lowrank_bytes, position_format, solve_compot_shape, solve_rank
from .compot import compot, compot_whitened
from .cospadi import cospadi
from .svd_llm import svd_llm
from .types import LowRankFactors, SparseFactors
from .whitening import damped_cholesky, unwhiten, whiten

__all__ = [
    "LayerPlan", "plan_layer", "factorize_layer", "relative_error", "SpectralErrorEstimate", "compot", "compot_whitened", "cospadi",
    "svd_llm", "SparseFactors", "LowRankFactors", "damped_cholesky", "whiten", "unwhiten",
]


@dataclass(frozen=True)
class LayerPlan:
    """How one linear is stored. method: 'dense' | 'compot' | 'cospadi' | 'svd-llm'; k, s and the code-position
    format ('bitmask' or an index dtype) for sparse methods, r for svd-llm; bytes: the exact stored bytes."""

    name: str
    method: str
    d_in: int
    d_out: int
    bias: bool
    k: int = 0
    s: int = 0
    r: int = 0
    bytes: int = 0
    dense_bytes: int = 0
    position: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan_layer(name: str, method: str, d_in: int, d_out: int, bias: bool, budget: float, vbytes: int,
               k_over_s: float = 2.0) -> LayerPlan:
    """The largest factorization of `method` whose stored bytes fit `budget`; dense when the budget reaches
    the dense size or nothing smaller fits."""
    dense = dense_bytes(d_in, d_out, vbytes, bias)
    keep_dense = LayerPlan(name, "dense", d_in, d_out, bias, bytes=dense, dense_bytes=dense)
    if budget >= dense:
        return keep_dense
    if method == "svd-llm":
        r = solve_rank(d_in, d_out, budget, vbytes, bias)
        if r < 1:
            return keep_dense
        return LayerPlan(name, method, d_in, d_out, bias, r=r, bytes=lowrank_bytes(d_in, d_out, r, vbytes, bias),
                         dense_bytes=dense)
    shape = solve_compot_shape(d_in, d_out, budget, vbytes, bias, k_over_s)
    if shape is None:
        return keep_dense
    return LayerPlan(name, method, d_in, d_out, bias, k=shape.k, s=shape.s,
                     bytes=compot_bytes(d_in, d_out, shape.k, shape.s, vbytes, bias), dense_bytes=dense,
                     position=position_format(shape.k, shape.s))


def factorize_layer(W, L, plan: LayerPlan, iters: int = 10, tol: float = 1e-4, cospadi_iters: int = 3,
                    seed: int = 0):
    """W: (d_in, d_out), L: whitening Cholesky factor (d_in, d_in) → SparseFactors | LowRankFactors | None (dense)."""
    if plan.method == "dense":
        return None
    if plan.method == "svd-llm":
        return svd_llm(W, L, plan.r)
    if plan.method == "compot":
        return compot(W, L, plan.k, plan.s, iters, tol)[0]
    if plan.method == "cospadi":
        return cospadi(W, L, plan.k, plan.s, cospadi_iters, seed)[0]
    raise ValueError(f"unknown method {plan.method!r}")


class SpectralErrorEstimate:
    """Relative squared error of a plan on M = U diag(S) Vh, estimated from that one SVD (METHOD §5).

    svd-llm: the exact tail energy. compot/cospadi: the error of hard-thresholding M onto its top-k singular
    basis (COMPOT's starting point, an upper bound on what its iterations reach):
    ‖M − U_k H_s(U_kᵀM)‖² = ‖M‖² − ‖H_s(diag(S_k) Vh_k)‖².
    """

    def __init__(self, S, Vh):
        S2 = (S * S).double()
        self.total = float(S2.sum()) or 1.0
        self.tail = (S2.flip(0).cumsum(0).flip(0) / self.total).tolist() + [0.0]  # tail[r] = Σ_{i≥r} σ²
        self.P2 = ((S[:, None] * Vh) ** 2).float()  # ranking only: float32 is plenty

    def __call__(self, plan: LayerPlan) -> float:
        if plan.method == "dense":
            return 0.0
        if plan.method == "svd-llm":
            return self.tail[plan.r]
        kept = float(self.P2[: plan.k].topk(plan.s, dim=0, sorted=False).values.sum(dtype=torch.float64))
        return max(0.0, 1.0 - kept / self.total)


def relative_error(W, W_hat, L) -> float:
    """‖Lᵀ(W − Ŵ)‖_F / ‖Lᵀ W‖_F: the relative output error on the calibration inputs."""
    W = W.to(torch.float64)
    return float(torch.linalg.norm(L.T @ (W - W_hat.to(torch.float64))) / torch.linalg.norm(L.T @ W).clamp_min(1e-300))
