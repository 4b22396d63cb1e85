"""Drop-in replacements for a dense linear (nn.Linear or GPT-2's Conv1D): y = x W + b with W factored."""

from __future__ import annotations

import torch
from torch import nn

from .budget import index_dtype

_INDEX_TORCH = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}

# Upper bound on the elements of one gathered (tokens, chunk, d_out) block in the sparse product.
_GATHER_ELEMS = 1 << 24


def sparse_codes_matmul(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y[:, j] = Σ_t z[:, indices[t, j]] · values[t, j], without materialising the (k, d_out) code matrix.

    z: (n, k), values/indices: (s, d_out) → y: (n, d_out). Gathers a few code rows at a time to bound memory.
    """
    n = z.shape[0]
    s, d_out = values.shape
    idx = indices.long()
    chunk = max(1, min(s, _GATHER_ELEMS // max(1, n * d_out)))
    y = z.new_zeros(n, d_out)
    for t0 in range(0, s, chunk):
        g = z[:, idx[t0 : t0 + chunk]]  # (n, c, d_out)
        y += (g * values[t0 : t0 + chunk]).sum(1)
    return y


class CompotLinear(nn.Module):
    """y = (x A) C + b with A: (d_in, k) dense and C: (k, d_out) column-sparse, s non-zeros per column.

    Stores `A`, `values` (s, d_out), `indices` (s, d_out, the smallest unsigned dtype that fits k) and `bias`.
    """

    def __init__(self, d_in: int, d_out: int, k: int, s: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = d_in, d_out, k, s
        self.A = nn.Parameter(torch.zeros(d_in, k, dtype=dtype), requires_grad=False)
        self.values = nn.Parameter(torch.zeros(s, d_out, dtype=dtype), requires_grad=False)
        self.register_buffer("indices", torch.zeros(s, d_out, dtype=_INDEX_TORCH[index_dtype(k)]))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> "CompotLinear":
        d_in, k = A.shape
        s, d_out = values.shape
        m = cls(d_in, d_out, k, s, bias is not None, dtype)
        m.A.data.copy_(A)
        m.values.data.copy_(values)
        m.indices.copy_(indices.to(m.indices.dtype))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        z = x.reshape(-1, self.in_features) @ self.A
        y = sparse_codes_matmul(z, self.values, self.indices)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, s={self.s}, bias={self.bias is not None}"


class LowRankLinear(nn.Module):
    """y = (x A) B + b with A: (d_in, r), B: (r, d_out)."""

    def __init__(self, d_in: int, d_out: int, r: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.r = d_in, d_out, r
        self.A = nn.Parameter(torch.zeros(d_in, r, dtype=dtype), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(r, d_out, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        m = cls(A.shape[0], B.shape[1], A.shape[1], bias is not None, dtype)
        m.A.data.copy_(A)
        m.B.data.copy_(B)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.A) @ self.B
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, bias={self.bias is not None}"
