"""GPTQ (Frantar et al., 2022) as pure tensor functions, in this project's convention W: (K, N) = (d_in, d_out).

Rows of W are input dimensions: GPTQ quantizes them one at a time and pushes each row's rounding error onto the
rows not yet quantized through the inverse Hessian H = 2 XᵀX / n of the layer's inputs (METHOD §6).
Quantization groups run along K: one scale (and zero) per (group of `group` rows, output column).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..storage.budget import effective_group
from ..errors import CompotError

log = logging.getLogger(__name__)


@dataclass
class Quantized:
    """Integer codes and their grid. q: (K, N) int in [0, 2^bits); scales, zeros: (n_groups, N) with
    w ≈ (q − zero) · scale for row i in group i // group. zeros are integers (a fixed mid-point when symmetric)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        g = torch.arange(self.q.shape[0]) // self.group
        return (self.q.to(self.scales.dtype) - self.zeros[g]) * self.scales[g]


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid per column of w: (rows, N) → scale, zero: (N,). Symmetric grids centre on 2^(bits−1)."""
    maxq = 2**bits - 1
    lo = w.min(0).values.clamp(max=0)
    hi = w.max(0).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize_values(w, scale, zero, bits: int):
    """Integer codes of w on the grid (scale, zero), broadcast along rows."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(W: torch.Tensor, bits: int = 4, group: int = 128, sym: bool = False) -> Quantized:
    """Round-to-nearest with the same grid as GPTQ: the baseline GPTQ must beat. W: (K, N)."""
    W = W.to(torch.float64)
    K, N = W.shape
    group = effective_group(group, K)
    scales, zeros, qs = [], [], []
    for g0 in range(0, K, group):
        s, z = grid(W[g0 : g0 + group], bits, sym)
        scales.append(s)
        zeros.append(z)
        qs.append(quantize_values(W[g0 : g0 + group], s, z, bits))
    return Quantized(torch.cat(qs).to(torch.uint8), torch.stack(scales), torch.stack(zeros), bits, group, sym)


def damped_inverse_cholesky(H: torch.Tensor, damp: float = 0.01, name: str = "layer", max_damp: float = 10.0):
    """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = UᵀU, the form GPTQ's updates read), λ = damp · mean(diag H), raising
    damp ×10 on failure (each step logged) up to `max_damp`. H: (K, K) float64 → U: (K, K) upper."""
    K = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    if not torch.isfinite(H).all() or mean_diag <= 0:
        raise CompotError(f"GPTQ Hessian of {name} is degenerate (non-finite or zero)")
    d = damp
    while d <= max_damp:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * torch.eye(K, dtype=H.dtype))
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                if d != damp:
                    log.warning("%s: GPTQ Hessian needed damping %.2g (raised from %.2g)", name, d, damp)
                return U
        log.warning("%s: GPTQ Cholesky failed at damping %.2g, raising it", name, d)
        d = max(d * 10, 1e-6)
    raise CompotError(f"GPTQ Hessian of {name} stays singular even with damping {max_damp:g}")


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group: int = 128, sym: bool = False,
         act_order: bool = False, block: int = 128, damp: float = 0.01, name: str = "layer",
         n_tokens: int | None = None, cache: dict | None = None) -> Quantized:
    """GPTQ with lazy batched updates. W: (K, N), H: (K, K) Hessian of the inputs (∝ XᵀX).

    act_order quantizes rows by decreasing diag(H); groups stay contiguous in the original row order
    ("static groups", grids fixed from the unquantized weights), so the stored layout needs no row index.
    cache: a dict shared by calls on the same H (and the same dead inputs of W), keeping its factored inverse.
    """
    W = W.to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    K, N = W.shape
    group = effective_group(group, K)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[dead] = 0
    n_groups = (K + group - 1) // group
    scales = torch.empty(n_groups, N, dtype=torch.float64)
    zeros = torch.empty(n_groups, N, dtype=torch.float64)
    if act_order:
        for g in range(n_groups):
            scales[g], zeros[g] = grid(W[g * group : (g + 1) * group], bits, sym)
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        perm = torch.arange(K)
    W, H = W[perm], H[perm][:, perm]
    U = None if cache is None else cache.get((damp, act_order))
    if U is None:  # once per Hessian: calls sharing a cache share the warning too
        if n_tokens is not None and n_tokens < K or bool(dead.any()):
            log.warning("%s: GPTQ Hessian is rank-deficient (%s tokens for %d inputs, %d dead inputs); relying on "
                        "damping", name, n_tokens, K, int(dead.sum()))
        U = damped_inverse_cholesky(H, damp, name)
        if cache is not None:
            cache[(damp, act_order)] = U
    block = max(group, block // group * group)  # whole groups per block: a group's rows are all in flight together
    Q = torch.zeros_like(W)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1 = W[b0:b1].clone()
        Err = torch.zeros_like(W1)
        for i in range(b1 - b0):
            row = b0 + i
            g = int(perm[row]) // group
            if not act_order and row % group == 0:  # grid from the error-updated rows of this group
                scales[g], zeros[g] = grid(W1[i : i + group], bits, sym)
            q = quantize_values(W1[i], scales[g], zeros[g], bits)
            Q[row] = q
            err = (W1[i] - (q - zeros[g]) * scales[g]) / U[row, row]
            W1[i:] -= torch.outer(U[row, row : b1], err)
            Err[i] = err
        W[b1:] -= U[b0:b1, b1:].T @ Err
    inv = torch.argsort(perm)
    return Quantized(Q[inv].to(torch.uint8), scales, zeros, bits, group, sym)


def by_columns(fn, W: torch.Tensor, chunk: int = 16384) -> Quantized:
    """fn(W[:, c0:c1]) → Quantized over chunks of `chunk` output columns, joined. RTN's and GPTQ's columns are
    independent (GPTQ's given H), so this equals fn(W) without float64 copies of the whole matrix (a 262k-token
    table: 1.3 GB each). W: (K, N)."""
    parts = [fn(W[:, c0 : c0 + chunk]) for c0 in range(0, W.shape[1], chunk)]
    p = parts[0]
    return Quantized(torch.cat([x.q for x in parts], 1), torch.cat([x.scales for x in parts], 1),
                     torch.cat([x.zeros for x in parts], 1), p.bits, p.group, p.sym)


def gptq_sparse_columns(values: torch.Tensor, indices: torch.Tensor, H: torch.Tensor, bits: int = 4,
                        sym: bool = False, damp: float = 0.01, name: str = "codes", chunk: int = 256) -> Quantized:
    """GPTQ on the stored values of column-sparse codes, sparsity pattern unchanged (METHOD §6).

    values, indices: (s, N); H: (k, k) Hessian of the code inputs z = x Â. Column j only reads rows
    indices[:, j], so its s values are quantized by GPTQ on the s × s sub-Hessian H[idx_j, idx_j] — a batch
    of small independent problems. One grid (scale, zero) per column: the result has group = s.
    """
    s, N = values.shape
    V = values.to(torch.float64).T.clone()  # (N, s)
    H = H.to(torch.float64)
    scale, zero = grid(V.T, bits, sym)  # (N,)
    Q = torch.zeros_like(V)
    idx = indices.long().T  # (N, s)
    eye = torch.eye(s, dtype=torch.float64)
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        sub = H[idx[c0:c1, :, None], idx[c0:c1, None, :]]  # (c, s, s)
        mean_diag = sub.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
        d = damp
        while True:
            L, info = torch.linalg.cholesky_ex(sub + d * mean_diag * eye)
            U, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info.abs().max()) == 0 and int(info2.abs().max()) == 0:
                break
            if d > 10:
                raise CompotError(f"GPTQ sub-Hessians of {name} stay singular even with damping 10")
            log.warning("%s: GPTQ sub-Hessian Cholesky failed at damping %.2g, raising it", name, d)
            d = max(d * 10, 1e-6)
        W = V[c0:c1].clone()  # (c, s)
        sc, ze = scale[c0:c1], zero[c0:c1]
        for t in range(s):
            q = quantize_values(W[:, t], sc, ze, bits)
            Q[c0:c1, t] = q
            err = (W[:, t] - (q - ze) * sc) / U[:, t, t]
            W[:, t:] -= err[:, None] * U[:, t, t:]
    return Quantized(Q.T.contiguous().to(torch.uint8), scale[None], zero[None], bits, s, sym)
