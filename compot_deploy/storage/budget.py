"""Byte accounting (METHOD §3): every byte count of a stored artifact, and the one conversion of a user's budget
(a fraction removed, a fraction kept, or the bytes of the whole file) into bytes.

Every storage method (storage/record.py), every allocator and every report goes through these functions, so a
budget always means bytes of the artifact, never parameter counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import CompotError

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


def coordinate_bytes(n: int, k: int, d_out: int, vbytes: int) -> int:
    """Bytes of n code entries stored in coordinate form (ROCKET's re-activated codes): each its value, its row
    (index_dtype(k)) and its column (index_dtype(d_out))."""
    return n * (vbytes + INDEX_BYTES[index_dtype(k)] + INDEX_BYTES[index_dtype(d_out)])


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


def embedding_bytes(V: int, H: int, bits: int | None, group: int, vbytes: int) -> int:
    """Stored bytes of a (V, H) token embedding table: at the storage dtype, or packed at `bits` in symmetric blocks
    of `group` along H (QuantEmbedding: the layout of a (K = H, N = V) matrix)."""
    return V * H * vbytes if not bits else quant_bytes(H, V, bits, group, True, vbytes)


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


def sparse_extra_bytes(d_out: int, k: int, s: int) -> int:
    """Bytes a sparse-code layer stores besides its floating matrices: the code positions (cheaper format)."""
    return position_bytes(d_out, k, s, position_format(k, s))


def quantized_bytes(slots: dict[str, tuple[int, int]], groups: dict[str, int], bits: int, sym: bool, extra: int,
                    d_out: int, vbytes: int, bias: bool) -> int:
    """Stored bytes of a layer whose floating matrices `slots` (name → (K, N)) are packed at `bits` in blocks of
    `groups[name]` rows (quant_bytes), plus `extra` non-floating bytes (code positions) and the bias."""
    total = sum(quant_bytes(K, N, bits, groups[name], sym, vbytes) for name, (K, N) in slots.items())
    return total + extra + (d_out * vbytes if bias else 0)


def removed_fraction(stored: float, dense: float) -> float:
    """The compression ratio reported to users: the fraction of `dense` bytes removed, 1 − stored / dense."""
    return 1.0 - stored / dense if dense else 0.0


def _stored_tensors(model) -> list:
    """The tensors of `model`'s state dict, a tied one once (by object: a lazily loaded model's parameters on the
    meta device all have data pointer 0)."""
    return list({id(t): t for t in model.state_dict(keep_vars=True).values()}.values())


def dense_model_bytes(model, vbytes: int) -> int:
    """Bytes of every tensor of `model` (tied tensors once), floating ones at `vbytes` each: the dense file."""
    return sum(t.numel() * (vbytes if t.is_floating_point() else t.element_size()) for t in _stored_tensors(model))


def stored_tensor_count(model) -> int:
    """Tensors the model's weights file stores (tied ones once)."""
    return len(_stored_tensors(model))


# ---------------------------------------------------------------------------------------- the user's budget

# safetensors header bytes reserved per stored tensor when the budget is a whole-file size (names, dtype, shape,
# offsets in JSON: ~70–110 bytes each on the models measured)
HEADER_BYTES_PER_TENSOR = 160
# tensors a factorized, quantized layer may add over its dense weight (A, values, positions, scales, zeros, …)
EXTRA_TENSORS_PER_LAYER = 6


class Budget(BaseModel):
    """A user's byte budget, exactly one of:

    removed: the fraction of the target linears' dense bytes (at the storage dtype) to remove (`--ratio`);
    kept: the fraction of those bytes the target linears may keep (`--target-ratio`);
    file_bytes: the bytes of the whole saved weights file (`--target-bytes`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    removed: float | None = Field(None, ge=0.01, lt=1.0, description="fraction of the target linears' bytes "
                                  "removed (at least 1 %: less saves nothing a file header does not eat)")
    kept: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the target linears' bytes kept")
    file_bytes: int | None = Field(None, gt=0, description="bytes of the whole saved weights file")

    @model_validator(mode="after")
    def _one(self):
        if sum(v is not None for v in (self.removed, self.kept, self.file_bytes)) != 1:
            raise ValueError("give exactly one budget: a fraction removed (--ratio), a fraction kept "
                             "(--target-ratio) or the bytes of the file (--target-bytes)")
        return self

    @property
    def describe(self) -> str:
        if self.removed is not None:
            return f"{self.removed:g} of the linears' dense bytes removed"
        if self.kept is not None:
            return f"{self.kept:g} of the linears' dense bytes kept"
        return f"{self.file_bytes:,} bytes for the file"


def budget_bytes(dense: float, *, removed: float | None = None, kept: float | None = None) -> float:
    """Bytes left of `dense` when the fraction `removed` goes (or the fraction `kept` stays): the one conversion
    of a fraction into bytes, for a whole model's linears and for one layer alike."""
    if (removed is None) == (kept is None):
        raise ValueError("give exactly one of removed / kept")
    return kept * dense if kept is not None else (1.0 - removed) * dense


def removed_after_pruning(removed: float, dense_all: float, dense_kept: float) -> float:
    """The fraction of the kept linears' bytes to remove so that, with pruned blocks' linears gone whole, the
    original linears (`dense_all` bytes) lose the fraction `removed`; ≤ 0 when pruning alone removes that much."""
    return 1.0 - budget_bytes(dense_all, removed=removed) / dense_kept


def linear_budget(b: Budget, dense_linears: int, dense_model: int = 0, n_tensors: int = 0,
                  n_targets: int = 0) -> float:
    """Bytes the target linears may take under the user's budget `b`. dense_linears: their dense bytes at the
    storage dtype. For a file budget: what everything else in the file takes (the other tensors at the storage
    dtype, `dense_model` − `dense_linears`, and the header for `n_tensors` original tensors plus what each of
    `n_targets` compressed layers adds) is taken off first."""
    if b.file_bytes is None:
        return budget_bytes(dense_linears, removed=b.removed, kept=b.kept)
    header = HEADER_BYTES_PER_TENSOR * (n_tensors + EXTRA_TENSORS_PER_LAYER * n_targets)
    rest = dense_model - dense_linears + header
    if b.file_bytes <= rest:
        raise CompotError(f"target of {b.file_bytes:,} bytes is below the {rest:,} bytes that the weights outside "
                          f"the compressed linears (and the file header) take")
    return b.file_bytes - rest


def fits(b: Budget, linears_bytes: int, dense_linears: int, file_bytes: int) -> bool:
    """Whether a saved model meets the user's budget: its linears' stored bytes, or its whole file."""
    if b.file_bytes is not None:
        return file_bytes <= b.file_bytes
    return linears_bytes <= linear_budget(b, dense_linears) + 1e-6
