"""Drop-in replacements for a dense linear (nn.Linear or GPT-2's Conv1D): y = x W + b with W factored."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .budget import BITMASK, index_dtype, position_format
from .packing import QuantTensor, pack_bits, unpack_bits

_INDEX_TORCH = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}

# Token count from which scattering the codes into a transient dense (k, d_out) block and calling one MatMul
# beats the CSR product (measured on 2 cores: CSR 0.09 ms vs 0.41 ms at 1 token, dense 6.8 ms vs 14.5 ms at 320).
DENSIFY_FROM_TOKENS = 64


def matrix(t) -> torch.Tensor:
    """A factor as float32, whether stored plainly or packed (QuantTensor)."""
    return t.dequantize() if isinstance(t, QuantTensor) else t


def put_slot(module: nn.Module, slot: str, qt: QuantTensor) -> QuantTensor:
    """Replace the (K, N) factor `slot` of `module` by the packed matrix `qt` of the same shape; return it."""
    cur = getattr(module, slot)
    shape = (cur.K, cur.N) if isinstance(cur, QuantTensor) else tuple(cur.shape)
    if shape != (qt.K, qt.N):
        raise ValueError(f"{slot}: packed shape {(qt.K, qt.N)} != {shape}")
    delattr(module, slot)
    module.add_module(slot, qt)
    return qt


def sparse_codes_matmul(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y[:, j] = Σ_t z[:, indices[t, j]] · values[t, j]; nothing dense of size (k, d_out) outlives the call.

    z: (n, k), values/indices: (s, d_out) → y: (n, d_out). Few tokens: a CSR product that gathers the s rows each
    output reads; many tokens: scatter into a temporary dense block, then one MatMul (the two ONNX bodies, too).
    """
    n, k = z.shape
    s, d_out = values.shape
    idx = indices.long()
    if n >= DENSIFY_FROM_TOKENS:
        return z @ z.new_zeros(k, d_out).scatter_(0, idx, values)
    crow = torch.arange(0, (d_out + 1) * s, s, dtype=torch.long, device=z.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        Ct = torch.sparse_csr_tensor(crow, idx.T.reshape(-1), values.T.reshape(-1), (d_out, k))
        return (Ct @ z.T).T


class LinearView:
    """What an architecture may read from a linear it holds (T5 checks `.weight.dtype` before its output
    projection): `weight` laid out as nn.Linear's, (d_out, d_in) float32, rebuilt from the stored factors on every
    read — for code that inspects a weight, never the way the layer runs."""

    @property
    def weight(self) -> torch.Tensor:
        return self.reconstruct().T.float()


class CompotLinear(LinearView, nn.Module):
    """y = (x A) C + b with A: (d_in, k) dense and C: (k, d_out) column-sparse, s non-zeros per column.

    Stores `A`, `values` (s, d_out; row t of column j is its t-th non-zero in ascending row order), `bias`, and
    the positions in the cheaper format (budget.position_format): `indices` (s, d_out, the smallest unsigned
    dtype that fits k) or `mask` (d_out, ⌈k/8⌉ bytes, bit i of column j set when row i is a non-zero).
    """

    def __init__(self, d_in: int, d_out: int, k: int, s: int, bias: bool, dtype: torch.dtype = torch.float32,
                 position: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = d_in, d_out, k, s
        self.position = position or position_format(k, s)
        self.A = nn.Parameter(torch.zeros(d_in, k, dtype=dtype), requires_grad=False)
        self.values = nn.Parameter(torch.zeros(s, d_out, dtype=dtype), requires_grad=False)
        if self.position == BITMASK:
            self.register_buffer("mask", torch.zeros(d_out, -(-k // 8), dtype=torch.uint8))
        else:
            self.register_buffer("indices", torch.zeros(s, d_out, dtype=_INDEX_TORCH[self.position]))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype), requires_grad=False) if bias else None

    def code_indices(self) -> torch.Tensor:
        """(s, d_out) int64 row of each stored value, ascending within a column."""
        if self.position != BITMASK:
            return self.indices.long()
        bits = unpack_bits(self.mask, 1, self.k).bool()  # (d_out, k)
        return bits.nonzero()[:, 1].reshape(self.out_features, self.s).T

    @classmethod
    def from_factors(cls, A: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> "CompotLinear":
        d_in, k = A.shape
        s, d_out = values.shape
        m = cls(d_in, d_out, k, s, bias is not None, dtype)
        order = indices.long().argsort(dim=0)  # the stored layout is ascending rows within a column
        idx = indices.long().gather(0, order)
        m.A.data.copy_(A)
        m.values.data.copy_(values.gather(0, order))
        if m.position == BITMASK:
            bits = torch.zeros(d_out, -(-k // 8) * 8, dtype=torch.uint8).scatter_(1, idx.T, 1)
            m.mask.copy_(pack_bits(bits, 1))
        else:
            m.indices.copy_(idx.to(m.indices.dtype))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        z = x.reshape(-1, self.in_features) @ matrix(self.A)
        y = sparse_codes_matmul(z, matrix(self.values), self.code_indices())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def reconstruct(self) -> torch.Tensor:
        """Ŵ = A C: (d_in, d_out) float64, exactly as stored — for error analysis, never for inference."""
        C = torch.zeros(self.k, self.out_features, dtype=torch.float64)
        C.scatter_(0, self.code_indices(), matrix(self.values).double())
        return matrix(self.A).double() @ C

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, s={self.s}, positions={self.position}, "
                f"bias={self.bias is not None}")


class RocketLinear(CompotLinear):
    """ROCKET's layer: CompotLinear's y = (x A) C + b, C holding s codes per column plus `extra` more, stored in
    coordinate form: `extra_values` (e,), `extra_rows` (e,, the smallest dtype fitting k), `extra_cols` (e,, the
    smallest fitting d_out)."""

    def __init__(self, d_in: int, d_out: int, k: int, s: int, bias: bool, dtype: torch.dtype = torch.float32,
                 position: str | None = None, extra: int = 0):
        super().__init__(d_in, d_out, k, s, bias, dtype, position)
        self.extra = extra
        self.extra_values = nn.Parameter(torch.zeros(extra, dtype=dtype), requires_grad=False)
        self.register_buffer("extra_rows", torch.zeros(extra, dtype=_INDEX_TORCH[index_dtype(k)]))
        self.register_buffer("extra_cols", torch.zeros(extra, dtype=_INDEX_TORCH[index_dtype(d_out)]))

    @classmethod
    def from_factors(cls, A, values, indices, bias, dtype: torch.dtype = torch.float32, extra=None) -> "RocketLinear":
        """As CompotLinear.from_factors; extra: (values, rows, cols) of the re-activated codes, each (e,)."""
        base = CompotLinear.from_factors(A, values, indices, bias, dtype)
        ev, rows, cols = extra
        m = cls(base.in_features, base.out_features, base.k, base.s, bias is not None, dtype, base.position, len(ev))
        m.load_state_dict(base.state_dict(), strict=False)
        order = (cols.long() * base.k + rows.long()).argsort()  # column-major: each column's extras together
        m.extra_values.data.copy_(ev[order])
        m.extra_rows.copy_(rows[order].to(m.extra_rows.dtype))
        m.extra_cols.copy_(cols[order].to(m.extra_cols.dtype))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        z = x.reshape(-1, self.in_features) @ matrix(self.A)
        y = sparse_codes_matmul(z, matrix(self.values), self.code_indices())
        y = y.index_add(1, self.extra_cols.long(), z[:, self.extra_rows.long()] * self.extra_values)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def reconstruct(self) -> torch.Tensor:
        W = super().reconstruct()
        A = matrix(self.A).double()
        return W.index_add(1, self.extra_cols.long(), A[:, self.extra_rows.long()] * self.extra_values.double())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", extra={self.extra}"


class LowRankLinear(LinearView, nn.Module):
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
        y = (x @ matrix(self.A)) @ matrix(self.B)
        return y + self.bias if self.bias is not None else y

    def reconstruct(self) -> torch.Tensor:
        """Ŵ = A B: (d_in, d_out) float64, exactly as stored."""
        return matrix(self.A).double() @ matrix(self.B).double()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, bias={self.bias is not None}"


class QuantLinear(nn.Module):
    """A dense linear with a packed quantized weight (plain GPTQ/RTN): y = x Ŵ + b, Ŵ: (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, bits: int, group: int, sym: bool, bias: bool):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = QuantTensor(d_in, d_out, bits, group, sym)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None

    def reconstruct(self) -> torch.Tensor:
        """Ŵ: (d_in, d_out) float64, exactly as stored."""
        return self.weight.dequantize().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.dequantize()
        return y + self.bias if self.bias is not None else y


class QuantEmbedding(nn.Module):
    """A token embedding table E: (V, H) stored packed, rows dequantized as they are looked up.

    `table` is the QuantTensor of Eᵀ (K = H, N = V, symmetric, no zero points): row v of E is packed column v, its
    H values in blocks along H — the bytes com.microsoft::GatherBlockQuantized reads as its (V, H·bits/8) data and
    its (V, H/group) scales. `embed_scale`: a constant factor on every looked-up row (Gemma's √H), or None.
    """

    def __init__(self, V: int, H: int, bits: int, group: int, embed_scale: float | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = V, H
        self.table = QuantTensor(H, V, bits, group, sym=True)
        self.embed_scale = embed_scale

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] as float32: ids (…) → (…, H)."""
        t = self.table
        codes = unpack_bits(t.qweight[ids], t.bits, t.block_len)[..., : t.group].float()  # (…, n_blocks, group)
        rows = (codes - 2 ** (t.bits - 1)) * t.scales[ids].float()[..., None]
        return rows.reshape(*ids.shape, -1)[..., : self.embedding_dim]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.rows(ids)
        return e * self.embed_scale if self.embed_scale is not None else e

    @property
    def weight(self) -> torch.Tensor:
        """E: (V, H) float32, rebuilt on every read — for code that inspects the table, never for lookups."""
        return self.table.dequantize().T

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.table.bits}, group={self.table.group}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""))


class TiedQuantHead(nn.Module):
    """An LM head y = x Eᵀ (x: (…, H) → (…, V)) tied to a QuantEmbedding: it holds the same `table`, so the packed
    bytes are stored once and read by both (GatherBlockQuantized for lookups, MatMulNBits for the head)."""

    def __init__(self, table: QuantTensor):
        super().__init__()
        self.in_features, self.out_features = table.K, table.N
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table.dequantize()

    @property
    def weight(self) -> torch.Tensor:
        """Eᵀ laid out as nn.Linear's weight, (V, H) float32, rebuilt on every read."""
        return self.table.dequantize().T
