"""Byte accounting: the one place that says how many bytes a stored layer takes (METHOD §3).

Every method, every allocator and every report goes through these functions, so "ratio" always means
bytes of the artifact, never parameter counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def value_bytes(dtype: str) -> int:
    """Bytes of one stored value of `dtype` ('float32' | 'float16' | 'bfloat16')."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def index_dtype(k: int) -> str:
    """Smallest unsigned integer dtype that can index `k` dictionary atoms (as stored in safetensors)."""
    if k <= 256:
        return "uint8"
    if k <= 65536:
        return "uint16"
    return "int32"


INDEX_BYTES = {"uint8": 1, "uint16": 2, "int32": 4}

BITMASK = "bitmask"


def position_bytes(d_out: int, k: int, s: int, fmt: str) -> int:
    """Bytes that say where the s non-zeros of each of d_out code columns sit: s indices per column, or a k-bit
    mask per column (values then stored in ascending row order)."""
    if fmt == BITMASK:
        return d_out * -(-k // 8)
    return d_out * s * INDEX_BYTES[fmt]


def position_format(k: int, s: int) -> str:
    """Whichever of index list (smallest dtype fitting k) and column bitmask stores the positions in fewer bytes."""
    lst = index_dtype(k)
    return BITMASK if position_bytes(1, k, s, BITMASK) < position_bytes(1, k, s, lst) else lst


def dense_bytes(d_in: int, d_out: int, vbytes: int, bias: bool) -> int:
    """Stored bytes of a dense linear W: (d_in, d_out) plus its bias."""
    return (d_in * d_out + (d_out if bias else 0)) * vbytes


def compot_bytes(d_in: int, d_out: int, k: int, s: int, vbytes: int, bias: bool) -> int:
    """Stored bytes of a COMPOT linear: A (d_in, k) dense, s values per output column and their positions (in the
    cheaper format, see position_format), bias."""
    return (d_in * k * vbytes + d_out * s * vbytes + position_bytes(d_out, k, s, position_format(k, s))
            + (d_out * vbytes if bias else 0))


def linears_dense_bytes(targets, vbytes: int) -> int:
    """Dense bytes of every linear in `targets` (anything with d_in, d_out, bias), biases included."""
    return sum(dense_bytes(t.d_in, t.d_out, vbytes, t.bias) for t in targets)


def lowrank_bytes(d_in: int, d_out: int, r: int, vbytes: int, bias: bool) -> int:
    """Stored bytes of a rank-r linear A (d_in, r) · B (r, d_out) plus bias."""
    return r * (d_in + d_out) * vbytes + (d_out * vbytes if bias else 0)


def padded_group(group: int, bits: int) -> int:
    """Block length rounded up so a block of `bits`-bit elements fills whole bytes."""
    per = 8 // math.gcd(8, bits)
    return -(-group // per) * per


def effective_group(group: int, K: int) -> int:
    """Rows per quantization block of a K-row matrix: `group`, or all K rows when group is 0 or exceeds K."""
    return K if group <= 0 else min(group, K)


def quant_bytes(K: int, N: int, bits: int, group: int, sym: bool, scale_bytes: int) -> int:
    """Stored bytes of a (K, N) matrix quantized in blocks of `group` along K (MatMulNBits layout; see
    effective_group): packed codes (each block padded to whole bytes), one scale per (block, column), packed zero
    points unless symmetric."""
    group = effective_group(group, K)
    n_blocks = -(-K // group)
    block_bytes = padded_group(group, bits) * bits // 8
    zero_bytes = 0 if sym else N * padded_group(n_blocks, bits) * bits // 8
    return N * n_blocks * (block_bytes + scale_bytes) + zero_bytes


@dataclass(frozen=True)
class SparseShape:
    k: int
    s: int


def max_atoms(d_in: int, d_out: int) -> int:
    """Atoms beyond min(d_in, d_out) can never help: M = LᵀW has rank ≤ min(d_in, d_out)."""
    return min(d_in, d_out)


def solve_compot_shape(
    d_in: int, d_out: int, budget: float, vbytes: int, bias: bool, k_over_s: float = 2.0
) -> SparseShape | None:
    """Largest sparsity s whose bytes fit `budget`, with k = round(k_over_s · s) capped at min(d_in, d_out).

    Returns None when even s = 1 does not fit.
    """
    if k_over_s < 1.0:
        raise ValueError(f"k/s must be >= 1, got {k_over_s}")
    kmax = max_atoms(d_in, d_out)

    def shape(s: int) -> SparseShape:
        return SparseShape(k=min(kmax, max(s, round(k_over_s * s))), s=s)

    def fits(s: int) -> bool:
        sh = shape(s)
        return compot_bytes(d_in, d_out, sh.k, sh.s, vbytes, bias) <= budget

    if not fits(1):
        return None
    lo, hi = 1, kmax  # bytes never decrease as s grows: bisect for the last s that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return shape(lo)


def solve_rank(d_in: int, d_out: int, budget: float, vbytes: int, bias: bool) -> int:
    """Largest rank r whose low-rank bytes fit `budget` (0 when none fits)."""
    fixed = d_out * vbytes if bias else 0
    r = int((budget - fixed) // ((d_in + d_out) * vbytes))
    return max(0, min(r, min(d_in, d_out)))


def ratio(stored: float, dense: float) -> float:
    """Compression ratio reported to users: 1 − stored / dense."""
    return 1.0 - stored / dense if dense else 0.0
