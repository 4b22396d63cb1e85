"""Packed storage of quantized matrices, laid out as ONNX Runtime's MatMulNBits reads its B input.

A matrix M: (K, N) (K = the input dimension, quantized in blocks of `group` rows) is stored transposed, as
qweight: uint8 (N, n_blocks, block_len·bits/8) — a bit stream, element k of a block at bits [k·bits, (k+1)·bits),
low bits first; at 2/4/8 bits that is byte k·bits/8 as MatMulNBits reads it —, scales: (N, n_blocks) at the
storage dtype, and, for asymmetric grids, zeros: uint8 (N, ⌈n_blocks·bits/8⌉) packed the same way. Symmetric grids
store no zeros (their zero is 2^(bits−1), MatMulNBits' default). 3-bit blocks are padded to 8 elements (3 bytes);
MatMulNBits does not take them, so they are exported through ai.compot::DequantizeBlocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from typing import NamedTuple

import torch
from torch import nn

from .budget import effective_group, padded_group

if TYPE_CHECKING:
    from ..quantize.gptq import Quantized

SUPPORTED_BITS = (2, 3, 4, 8)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(…, L) integers < 2^bits (bits in 1…8), L·bits a multiple of 8 → (…, L·bits/8) uint8: the bit stream with
    element k at bits [k·bits, (k+1)·bits), low bits first."""
    if 8 % bits:  # 8 elements fill `bits` whole bytes: build each such word, then cut it into bytes
        L = q.shape[-1]
        q = torch.nn.functional.pad(q.to(torch.int64), (0, -L % 8)).reshape(*q.shape[:-1], -1, 8)
        word = (q << (bits * torch.arange(8))).sum(-1, keepdim=True)
        out = ((word >> (8 * torch.arange(bits))) & 255).to(torch.uint8).reshape(*q.shape[:-2], -1)
        return out[..., : L * bits // 8]
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8)
    for j in range(per):
        out |= q[..., j] << (bits * j)
    return out


def unpack_bits(p: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_bits: (…, B) uint8 → (…, length) uint8."""
    if bits == 8:  # no shifts: a shift by 0 in a traced forward breaks torch's ONNX peephole pass
        return p[..., :length]
    mask = (1 << bits) - 1
    if 8 % bits:
        B = p.shape[-1]
        w = torch.nn.functional.pad(p.to(torch.int64), (0, -B % bits)).reshape(*p.shape[:-1], -1, bits)
        word = (w << (8 * torch.arange(bits))).sum(-1, keepdim=True)
        codes = ((word >> (bits * torch.arange(8))) & mask).to(torch.uint8)
        return codes.reshape(*p.shape[:-1], -1)[..., :length]
    per = 8 // bits
    parts = [(p >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, -1).reshape(*p.shape[:-1], p.shape[-1] * per)[..., :length]


class PackedMeta(NamedTuple):
    """Shape and grid of a packed matrix: K rows in blocks of `group` (padded to `block_len`), N columns."""

    K: int
    N: int
    bits: int
    group: int
    block_len: int


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      meta: PackedMeta) -> torch.Tensor:
    """M: (K, N) float32 from qweight (N, n_blocks, blob), scales (N, n_blocks), zeros (packed) or None (symmetric:
    2^(bits−1))."""
    n_blocks = qweight.shape[1]
    codes = unpack_bits(qweight, meta.bits, meta.block_len)[..., : meta.group].float()
    if zeros is None:
        zp = torch.full((meta.N, n_blocks), float(2 ** (meta.bits - 1)))
    else:
        zp = unpack_bits(zeros, meta.bits, n_blocks).float()
    w = (codes - zp[..., None]) * scales.float()[..., None]
    return w.reshape(meta.N, -1)[:, : meta.K].T


class QuantTensor(nn.Module):
    """A (K, N) matrix stored packed (see module docstring); `dequantize()` gives it back as float32."""

    def __init__(self, K: int, N: int, bits: int, group: int, sym: bool):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        group = effective_group(group, K)
        self.K, self.N, self.bits, self.group, self.sym = K, N, bits, group, sym
        self.n_blocks = -(-K // group)
        self.block_len = padded_group(group, bits)
        self.register_buffer("qweight", torch.zeros(N, self.n_blocks, self.block_len * bits // 8, dtype=torch.uint8))
        self.scales = nn.Parameter(torch.ones(N, self.n_blocks), requires_grad=False)
        if sym:
            self.zeros = None
        else:
            zlen = padded_group(self.n_blocks, bits) * bits // 8
            self.register_buffer("zeros", torch.zeros(N, zlen, dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, qz: "Quantized", round_scales=lambda t: t) -> "QuantTensor":
        K, N = qz.q.shape
        m = cls(K, N, qz.bits, qz.group, qz.sym)
        q = torch.zeros(N, m.n_blocks * m.group, dtype=torch.uint8)
        q[:, :K] = qz.q.T
        q = q.reshape(N, m.n_blocks, m.group)
        if m.block_len != m.group:
            q = torch.cat([q, torch.zeros(N, m.n_blocks, m.block_len - m.group, dtype=torch.uint8)], -1)
        m.qweight.copy_(pack_bits(q, qz.bits))
        m.scales.data.copy_(round_scales(qz.scales.T.float()))
        if not qz.sym:
            z = torch.zeros(N, padded_group(m.n_blocks, qz.bits), dtype=torch.uint8)
            z[:, : m.n_blocks] = qz.zeros.T.to(torch.uint8)
            m.zeros.copy_(pack_bits(z, qz.bits))
        return m

    def meta(self) -> "PackedMeta":
        return PackedMeta(self.K, self.N, self.bits, self.group, self.block_len)

    def dequantize(self) -> torch.Tensor:
        """M: (K, N) float32."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.meta())

    def extra_repr(self) -> str:
        return f"K={self.K}, N={self.N}, bits={self.bits}, group={self.group}, sym={self.sym}"
