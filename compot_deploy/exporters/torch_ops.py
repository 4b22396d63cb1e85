"""The PyTorch side of the ONNX export: autograd Functions whose `symbolic` writes our ops into the graph.

While tracing, each compressed module computes exactly what its eager forward computes, but the packed and
sparse parts are recorded as one node each (`ai.compot::*`, `com.microsoft::MatMulNBits`) over the stored
tensors, so the exported initializers are the compact ones, never a densified or dequantized copy.
"""

from __future__ import annotations

import contextlib

import torch

from ..storage.modules import (CompotLinear, LowRankLinear, QuantEmbedding, QuantLinear, RocketLinear,
                               TiedQuantHead, sparse_codes_matmul)
from ..storage.budget import BITMASK, padded_group
from ..storage.packing import PackedMeta, QuantTensor, dequantize_packed, pack_bits, unpack_bits
from .ops import DOMAIN


def matmul_nbits_ok(qt: QuantTensor) -> bool:
    """MatMulNBits takes blocks of a power-of-two size ≥ 16 at 2, 4 or 8 bits."""
    g = qt.group
    return qt.bits in (2, 4, 8) and g >= 16 and g & (g - 1) == 0 and qt.block_len == g


class SparseCodesMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, values, indices, k: int):
        lead = z.shape[:-1]
        y = sparse_codes_matmul(z.reshape(-1, z.shape[-1]), values, indices.long())
        return y.reshape(*lead, values.shape[1])

    @staticmethod
    def symbolic(g, z, values, indices, k):
        out = g.op(f"{DOMAIN}::SparseCodesMatMul", z, values, indices, k_i=k)
        sizes = z.type().varyingSizes()
        return out.setType(z.type().with_sizes(sizes[:-1] + [values.type().varyingSizes()[-1]]))


class SparseCodesExtraMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, values, indices, extra_values, extra_rows, extra_cols, k: int):
        lead = z.shape[:-1]
        z2 = z.reshape(-1, z.shape[-1])
        y = sparse_codes_matmul(z2, values, indices.long())
        y = y.index_add(1, extra_cols.long(), z2[:, extra_rows.long()] * extra_values.to(z2.dtype))
        return y.reshape(*lead, values.shape[1])

    @staticmethod
    def symbolic(g, z, values, indices, extra_values, extra_rows, extra_cols, k):
        out = g.op(f"{DOMAIN}::SparseCodesExtraMatMul", z, values, indices, extra_values, extra_rows, extra_cols,
                   k_i=k)
        sizes = z.type().varyingSizes()
        return out.setType(z.type().with_sizes(sizes[:-1] + [values.type().varyingSizes()[-1]]))


def _absent(v) -> bool:
    return v is None or (hasattr(v, "node") and v.node().mustBeNone())


def bit_planes(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The stored column bitmask (d_out, ⌈k/8⌉) re-laid as ColumnMaskToIndices reads it: (B, d_out) uint8, row r
    of C at bit r // B of byte [r % B, j]. Same bytes, same bits."""
    d_out, B = mask.shape
    bits = torch.zeros(d_out, 8 * B, dtype=torch.uint8, device=mask.device)
    bits[:, :k] = unpack_bits(mask, 1, k)
    return pack_bits(bits.T.reshape(8, B, d_out).permute(1, 2, 0), 1).squeeze(-1)  # the 8 planes into one byte


def plane_indices(planes: torch.Tensor, s: int) -> torch.Tensor:
    """What ColumnMaskToIndices computes: bit planes (B, d_out) → (s, d_out) int64 set rows, ascending."""
    bits = unpack_bits(planes.unsqueeze(-1), 1, 8).permute(2, 0, 1).reshape(-1, planes.shape[1])  # (8B, d_out)
    return bits.T.nonzero()[:, 1].reshape(planes.shape[1], s).T


class ColumnMaskToIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, planes, module: CompotLinear):
        return plane_indices(planes, module.s)  # from its input only: the tracer records the body too

    @staticmethod
    def symbolic(g, planes, module):
        out = g.op(f"{DOMAIN}::ColumnMaskToIndices", planes, s_i=module.s)
        return out.setType(planes.type().with_dtype(torch.int64).with_sizes([module.s, module.out_features]))


class DequantizeBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qweight, scales, zeros, meta: PackedMeta):
        return dequantize_packed(qweight, scales, zeros, meta)

    @staticmethod
    def symbolic(g, qweight, scales, zeros, meta):
        attrs = dict(bits_i=meta.bits, group_i=meta.group, K_i=meta.K)
        op = f"{DOMAIN}::DequantizeBlocks" + ("" if 8 % meta.bits == 0 else "AnyWidth")
        if _absent(zeros):
            out = g.op(op + "Sym", qweight, scales, **attrs)
        else:
            out = g.op(op, qweight, scales, zeros, **attrs)
        return out.setType(scales.type().with_sizes([meta.K, meta.N]))


class MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, meta: PackedMeta):
        return x @ dequantize_packed(qweight, scales.reshape(meta.N, -1), zeros, meta)

    @staticmethod
    def symbolic(g, x, qweight, scales, zeros, meta):
        inputs = [x, qweight, scales] + ([] if _absent(zeros) else [zeros])
        out = g.op("com.microsoft::MatMulNBits", *inputs, K_i=meta.K, N_i=meta.N, bits_i=meta.bits,
                   block_size_i=meta.group)
        sizes = x.type().varyingSizes()
        return out.setType(x.type().with_sizes(sizes[:-1] + [meta.N]))


class GatherBlockQuantized(torch.autograd.Function):
    """Rows `ids` of a packed table: data (V, H·bits/8) uint8 (QuantEmbedding.table's qweight, one row per token),
    scales (V, H/group); symmetric (ORT's default zero point 2^(bits−1))."""

    @staticmethod
    def forward(ctx, ids, data, scales, bits: int, group: int):
        codes = unpack_bits(data[ids], bits, data.shape[-1] * 8 // bits).float()  # (…, H)
        codes = codes.reshape(*ids.shape, scales.shape[-1], group) - 2 ** (bits - 1)
        return (codes * scales[ids].float()[..., None]).reshape(*ids.shape, -1)

    @staticmethod
    def symbolic(g, ids, data, scales, bits, group):
        out = g.op("com.microsoft::GatherBlockQuantized", data, ids, scales, gather_axis_i=0, quantize_axis_i=1,
                   block_size_i=group, bits_i=bits)
        H = data.type().varyingSizes()[-1] * 8 // bits
        return out.setType(scales.type().with_sizes(ids.type().varyingSizes() + [H]))


def as_matrix(t) -> torch.Tensor:
    """A stored factor as a float tensor in the traced graph; packed ones through DequantizeBlocks."""
    if not isinstance(t, QuantTensor):
        return t
    return DequantizeBlocks.apply(t.qweight, t.scales, t.zeros, t.meta())


def nbits_blocks(t: QuantTensor):
    """(qweight, scales, zeros, meta) of `t` in a layout MatMulNBits takes, or None. A per-column grid (one block of
    all K rows, K not a power of two: Gemma's 640) becomes blocks of the largest power of two ≤ 128 dividing K, its
    scale and zero point repeated per block: the same codes, a few more scale bytes in the ONNX file, and a packed
    weight in the session instead of a float32 one (DequantizeBlocks is folded to float32 at load)."""
    if matmul_nbits_ok(t):
        return t.qweight, t.scales.reshape(-1), t.zeros, t.meta()
    if t.bits not in (2, 4, 8) or t.n_blocks != 1 or t.block_len != t.group:
        return None
    b = next((b for b in (128, 64, 32, 16) if t.K % b == 0), None)
    if b is None:
        return None
    n = t.K // b
    qweight = t.qweight.reshape(t.N, n, b * t.bits // 8)  # a block's codes are whole bytes at 2/4/8 bits
    scales = t.scales.expand(t.N, n).reshape(-1)
    zeros = None
    if t.zeros is not None:  # the one zero point is the low bits of byte 0; repacked with ops the tracer exports
        per = 8 // t.bits
        z = (t.zeros[:, :1].to(torch.int32) % (1 << t.bits)).expand(t.N, n)
        z = torch.nn.functional.pad(z, (0, padded_group(n, t.bits) - n)).reshape(t.N, -1, per)
        zeros = (z * (1 << (t.bits * torch.arange(per, dtype=torch.int32)))).sum(-1).to(torch.uint8)
    return qweight, scales, zeros, PackedMeta(t.K, t.N, t.bits, b, b)


def matmul(x: torch.Tensor, t) -> torch.Tensor:
    """x @ t, as MatMulNBits where the packed layout allows it (nbits_blocks)."""
    blocks = nbits_blocks(t) if isinstance(t, QuantTensor) else None
    if blocks is not None:
        return MatMulNBits.apply(x, *blocks)
    return x @ as_matrix(t)


def product_is_cheaper(d_in: int, d_out: int, k: int, *factors) -> bool:
    """Whether ONNX Runtime should multiply by the factors' product W (d_in, d_out), built once at load, rather
    than by the factors in turn: W takes d_in·d_out multiply-adds per row and as many float32 values in memory,
    the factors k·(d_in + d_out). Packed factors keep MatMulNBits."""
    return d_in * d_out <= k * (d_in + d_out) and not any(isinstance(f, QuantTensor) for f in factors)


def _compot_forward(self: CompotLinear, x, fold_product: bool):
    if self.position == BITMASK:
        idx = ColumnMaskToIndices.apply(self.mask_planes, self)
    else:
        idx = self.indices
    if isinstance(self, RocketLinear):
        def codes(z):
            return SparseCodesExtraMatMul.apply(z, as_matrix(self.values), idx, self.extra_values, self.extra_rows,
                                                self.extra_cols, self.k)
    else:
        def codes(z):
            return SparseCodesMatMul.apply(z, as_matrix(self.values), idx, self.k)
    if fold_product and product_is_cheaper(self.in_features, self.out_features, self.k, self.A):
        # W = A C through our op, so torch's exporter cannot fold it into a stored dense initializer
        y = x @ codes(self.A)
    else:
        y = codes(matmul(x, self.A))
    return y + self.bias if self.bias is not None else y


def _lowrank_forward(self: LowRankLinear, x, fold_product: bool):
    # never cheaper as a product: r·(d_in + d_out) stored values already fit under the dense bytes
    y = matmul(matmul(x, self.A), self.B)
    return y + self.bias if self.bias is not None else y


def _quant_forward(self: QuantLinear, x, fold_product: bool):
    y = matmul(x, self.weight)
    return y + self.bias if self.bias is not None else y


def _embedding_forward(self: QuantEmbedding, ids, fold_product: bool):
    t = self.table
    e = GatherBlockQuantized.apply(ids, self.gather_data, t.scales, t.bits, t.group)
    return e * self.embed_scale if self.embed_scale is not None else e


def _head_forward(self: TiedQuantHead, x, fold_product: bool):
    return matmul(x, self.table)


_FORWARDS = {CompotLinear: _compot_forward, RocketLinear: _compot_forward, LowRankLinear: _lowrank_forward, QuantLinear: _quant_forward,
             QuantEmbedding: _embedding_forward, TiedQuantHead: _head_forward}


def _bound(fn, mod, fold_products: bool):
    def forward(x):  # signature (x): the tracer reads it
        return fn(mod, x, fold_products)

    return forward


@contextlib.contextmanager
def export_forwards(model: torch.nn.Module, fold_products: bool = True):
    """Within the block, compressed modules of `model` trace to our ops (bitmasks exported as `mask_planes`, the
    layout ColumnMaskToIndices reads); their eager forwards come back after. fold_products: factors whose product
    is cheaper to run (product_is_cheaper) are exported as that product, folded at load. Yields how many modules
    were switched."""
    patched = []
    for mod in model.modules():
        fn = _FORWARDS.get(type(mod))
        if fn is not None:
            mod.forward = _bound(fn, mod, fold_products)
            if isinstance(mod, CompotLinear) and mod.position == BITMASK:
                mod.register_buffer("mask_planes", bit_planes(mod.mask, mod.k))
            if isinstance(mod, QuantEmbedding):  # the same bytes, one row per token (no 3-bit padding at 4/8 bits)
                mod.register_buffer("gather_data", mod.table.qweight.reshape(mod.num_embeddings, -1))
            patched.append(mod)
    try:
        yield len(patched)
    finally:
        for mod in patched:
            del mod.forward
            for extra in ("mask_planes", "gather_data"):
                if hasattr(mod, extra):
                    delattr(mod, extra)
