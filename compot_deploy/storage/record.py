"""How one linear is stored: the typed LayerRecord, and the registry of storage methods behind it.

A LayerRecord is the deterministic spec of a stored layer (method, shapes, k/s/rank, storage dtype, code-position
format, quantization): it is what the `compot` section of config.json lists per layer, what the allocators choose
between and what `load` rebuilds. Measurements (errors, seconds, the joint allocator's estimates) are kept apart
in LayerStats, so a saved spec is reproducible byte for byte. Each storage method is one `Storage` in STORAGE:
its bytes (through budget.py), its empty module for loading, how to factor a weight into it and how to wrap the
factors in a module. Code elsewhere asks the record, never the method's name.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from . import budget
from .budget import value_bytes

StorageName = Literal["dense", "compot", "cospadi", "svd-llm", "rocket"]
Dtype = Literal["float16", "float32", "bfloat16"]


class QuantSpec(BaseModel):
    """Packed quantization of a layer's floating matrices. groups: slot name → rows per quantization block as
    stored (GPTQ/RTN may clamp the configured group to the matrix)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["gptq", "rtn"]
    bits: Literal[2, 3, 4, 8]
    sym: bool
    groups: dict[str, int]

    @property
    def label(self) -> str:
        return f"{self.method}{self.bits}"


class LayerRecord(BaseModel):
    """How one linear y = x W (W: (d_in, d_out)) is stored. k, s and position for sparse codes, r for low rank,
    extra for ROCKET's re-activated codes (stored as (value, row, column) beyond the s per column)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StorageName
    d_in: int
    d_out: int
    bias: bool
    dtype: Dtype = "float16"
    k: int = 0
    s: int = 0
    r: int = 0
    position: str = ""
    extra: int = 0
    quant: QuantSpec | None = None

    @property
    def storage(self) -> "Storage":
        return STORAGE[self.method]

    @property
    def factored(self) -> bool:
        """True when the layer is stored as factors rather than one (d_in, d_out) matrix."""
        return self.storage.factored

    @property
    def vbytes(self) -> int:
        return value_bytes(self.dtype)

    @property
    def dense_bytes(self) -> int:
        return budget.dense_bytes(self.d_in, self.d_out, self.vbytes, self.bias)

    @property
    def float_bytes(self) -> int:
        """Stored bytes with every floating matrix at the storage dtype (no quantization)."""
        return self.storage.float_bytes(self)

    @property
    def bytes(self) -> int:
        """Exact stored bytes: values, positions, scales, zero points, bias."""
        if self.quant is None:
            return self.float_bytes
        return budget.quantized_bytes(self.slots(), self.quant.groups, self.quant.bits, self.quant.sym,
                                      self.storage.extra_bytes(self), self.d_out, self.vbytes, self.bias)

    def slots(self) -> dict[str, tuple[int, int]]:
        """The floating (K, N) matrices of the stored layer, by module attribute name (what GPTQ packs)."""
        return self.storage.slots(self)

    @property
    def paper_params(self) -> int:
        """Values the papers count (COMPOT d_in·k + s·d_out, SVD-LLM r·(d_in + d_out), dense d_in·d_out): no
        positions, scales, bias or bits. For comparing with published tables only; budgets are in bytes."""
        return sum(K * N for K, N in self.slots().values()) + self.extra

    def with_quant(self, quant: QuantSpec | None) -> "LayerRecord":
        return self.model_copy(update={"quant": quant})

    @property
    def shape_label(self) -> str:
        return self.storage.shape_label(self)

    @property
    def label(self) -> str:
        """A short human name: 'dense fp', 'dense gptq4 g128', 'compot 0.3 + gptq4 g128'."""
        q = "" if self.quant is None else f"{self.quant.label} g{_group_label(self.quant, self.slots())}"
        if not self.factored:
            return f"dense {q or 'fp'}"
        r = round(budget.removed_fraction(self.float_bytes, self.dense_bytes), 2)
        return f"{self.method} {r:g}" + (f" + {q}" if q else "")

    def empty_module(self):
        """The module `load` fills from the weights file: None keeps the model's own dense linear."""
        module = self.storage.empty_module(self)
        if self.quant is not None:
            from .packing import QuantTensor
            from .modules import QuantLinear, put_slot

            if module is None:
                g = self.quant.groups["weight"]
                return QuantLinear(self.d_in, self.d_out, self.quant.bits, g, self.quant.sym, self.bias)
            for slot, (K, N) in self.slots().items():
                put_slot(module, slot, QuantTensor(K, N, self.quant.bits, self.quant.groups[slot], self.quant.sym))
        return module

    def to_json(self) -> dict:
        """The entry of the `compot` config section: the spec, and its exact bytes for readers."""
        head = {"method": self.method, "d_in": self.d_in, "d_out": self.d_out, "bias": self.bias}
        rest = self.model_dump(mode="json", exclude_defaults=True, exclude=set(head))
        return {**head, **rest, "bytes": self.bytes, "dense_bytes": self.dense_bytes}

    @classmethod
    def from_json(cls, entry: dict) -> "LayerRecord":
        """Inverse of to_json; the stated bytes must be what the spec stores."""
        stated = {k: entry[k] for k in ("bytes", "dense_bytes") if k in entry}
        rec = cls.model_validate({k: v for k, v in entry.items() if k not in stated})
        for k, v in stated.items():
            if getattr(rec, k) != v:
                raise ValueError(f"{k} {v} does not match the layer spec ({getattr(rec, k)})")
        return rec


def _group_label(q: QuantSpec, slots: dict[str, tuple[int, int]]) -> str:
    """The group size of the first slot, or 'col' when a group spans the whole column."""
    slot, (K, _) = next(iter(slots.items()))
    g = q.groups[slot]
    return "col" if g >= K else str(g)


@dataclass
class LayerStats:
    """What building a layer measured (not part of the spec): the relative whitened output error
    ‖Lᵀ(W − Ŵ)‖ / ‖LᵀW‖ and seconds of the factorization and of the quantization, and the joint allocator's
    choice (label, estimated error, bytes, sensitivity)."""

    rel_error: float | None = None
    seconds: float = 0.0
    quant_rel_error: float | None = None
    quant_seconds: float = 0.0
    joint: dict = field(default_factory=dict)

    @property
    def final_error(self) -> float | None:
        return self.quant_rel_error if self.quant_rel_error is not None else self.rel_error

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


# ------------------------------------------------------------------------------------------- the registry


class Storage(abc.ABC):
    """One storage method: bytes, module and factorization of the layers stored its way."""

    name = ""
    factored = True
    sparse_codes = False  # column-sparse codes with k/s atoms per non-zero
    joint_candidate = True  # cheap enough to build at every candidate size of the joint allocator

    @abc.abstractmethod
    def slots(self, rec: LayerRecord) -> dict[str, tuple[int, int]]:
        """The floating (K, N) matrices of a layer stored this way."""

    def extra_bytes(self, rec: LayerRecord) -> int:
        return 0

    def float_bytes(self, rec: LayerRecord) -> int:
        return (sum(K * N for K, N in self.slots(rec).values()) * rec.vbytes + self.extra_bytes(rec)
                + (rec.d_out * rec.vbytes if rec.bias else 0))

    def shape_label(self, rec: LayerRecord) -> str:
        return "-"

    @abc.abstractmethod
    def fit(self, d_in: int, d_out: int, bias: bool, nbytes: float, dtype: str, k_over_s: float) -> LayerRecord | None:
        """The largest layer of this method within `nbytes`, or None when none fits."""

    def empty_module(self, rec: LayerRecord):
        return None

    def factorize(self, W, L, rec: LayerRecord, cfg, memo: dict | None = None):
        """W: (d_in, d_out), L: (d_in, d_in) whitening factor → factors (float64) of `rec`'s shape. memo: a dict
        shared by factorizations of the same W and L into several shapes (the joint allocator's candidates),
        where what they have in common is kept."""
        raise TypeError(f"{self.name} layers are not factored")

    def module(self, factors, bias):
        """The compact module holding `factors` (already rounded to the storage dtype)."""
        raise TypeError(f"{self.name} layers are not factored")

    @abc.abstractmethod
    def spectral_error(self, estimate, rec: LayerRecord) -> float:
        """Estimated relative squared whitened error of `rec` from one SVD (factorize.SpectralErrorEstimate)."""


class Dense(Storage):
    name, factored = "dense", False

    def slots(self, rec):
        return {"weight": (rec.d_in, rec.d_out)}

    def fit(self, d_in, d_out, bias, nbytes, dtype, k_over_s):
        rec = LayerRecord(method="dense", d_in=d_in, d_out=d_out, bias=bias, dtype=dtype)
        return rec if rec.bytes <= nbytes else None

    def spectral_error(self, estimate, rec):
        return 0.0


class SparseCodes(Storage):
    """W ≈ A·C, A: (d_in, k) dense, C: (k, d_out) with s non-zeros per column (COMPOT, CoSpaDi)."""

    sparse_codes = True

    def __init__(self, name: str, solve, joint_candidate: bool):
        self.name, self._solve, self.joint_candidate = name, solve, joint_candidate

    def slots(self, rec):
        return {"A": (rec.d_in, rec.k), "values": (rec.s, rec.d_out)}

    def extra_bytes(self, rec):
        return budget.sparse_extra_bytes(rec.d_out, rec.k, rec.s)

    def shape_label(self, rec):
        return f"k={rec.k} s={rec.s}"

    def fit(self, d_in, d_out, bias, nbytes, dtype, k_over_s):
        shape = budget.solve_compot_shape(d_in, d_out, nbytes, value_bytes(dtype), bias, k_over_s)
        if shape is None:
            return None
        return LayerRecord(method=self.name, d_in=d_in, d_out=d_out, bias=bias, dtype=dtype, k=shape.k, s=shape.s,
                           position=budget.position_format(shape.k, shape.s))

    def empty_module(self, rec):
        from .modules import CompotLinear

        return CompotLinear(rec.d_in, rec.d_out, rec.k, rec.s, rec.bias, position=rec.position)

    def factorize(self, W, L, rec, cfg, memo=None):
        return self._solve(W, L, rec, cfg)

    def module(self, factors, bias):
        from .modules import CompotLinear

        return CompotLinear.from_factors(factors.A, factors.values, factors.indices, bias)

    def spectral_error(self, estimate, rec):
        return estimate.sparse(rec.k, rec.s)


class LowRank(Storage):
    """W ≈ A·B, A: (d_in, r), B: (r, d_out) (SVD-LLM)."""

    name = "svd-llm"

    def slots(self, rec):
        return {"A": (rec.d_in, rec.r), "B": (rec.r, rec.d_out)}

    def shape_label(self, rec):
        return f"r={rec.r}"

    def fit(self, d_in, d_out, bias, nbytes, dtype, k_over_s):
        r = budget.solve_rank(d_in, d_out, nbytes, value_bytes(dtype), bias)
        return LayerRecord(method=self.name, d_in=d_in, d_out=d_out, bias=bias, dtype=dtype, r=r) if r >= 1 else None

    def empty_module(self, rec):
        from .modules import LowRankLinear

        return LowRankLinear(rec.d_in, rec.d_out, rec.r, rec.bias)

    def factorize(self, W, L, rec, cfg, memo=None):
        from ..factorize import svd_llm

        return svd_llm(W, L, rec.r, memo)

    def module(self, factors, bias):
        from .modules import LowRankLinear

        return LowRankLinear.from_factors(factors.A, factors.B, bias)

    def spectral_error(self, estimate, rec):
        return estimate.lowrank(rec.r)


class RocketCodes(SparseCodes):
    """ROCKET: COMPOT's layout (A, s codes per column) plus rec.extra re-activated codes anywhere in C, each stored
    as its value, row (index_dtype(k)) and column (index_dtype(d_out)). The allocators' s is the average count:
    fit keeps s − ⌈REACTIVATE·s⌉ per column and spends the bytes freed on extras."""

    REACTIVATE = 0.005  # ROCKET's over-sparsification, re-activated globally

    def __init__(self):
        from ..factorize.rocket import rocket

        super().__init__("rocket", lambda W, L, rec, cfg: rocket(W, L, rec.k, rec.s, rec.extra)[0], False)

    def extra_bytes(self, rec):
        return super().extra_bytes(rec) + budget.coordinate_bytes(rec.extra, rec.k, rec.d_out, rec.vbytes)

    def shape_label(self, rec):
        return f"k={rec.k} s={rec.s}+{rec.extra}"

    def fit(self, d_in, d_out, bias, nbytes, dtype, k_over_s):
        avg = super().fit(d_in, d_out, bias, nbytes, dtype, k_over_s)
        if avg is None:
            return None
        s = max(1, avg.s - max(1, round(self.REACTIVATE * avg.s)))
        base = avg.model_copy(update={"s": s, "position": budget.position_format(avg.k, s)})
        per = budget.coordinate_bytes(1, base.k, d_out, base.vbytes)
        extra = min((avg.s - s) * d_out, (avg.k - s) * d_out, max(0, int((nbytes - base.bytes) // per)))
        return base.model_copy(update={"extra": extra})

    def empty_module(self, rec):
        from .modules import RocketLinear

        return RocketLinear(rec.d_in, rec.d_out, rec.k, rec.s, rec.bias, position=rec.position, extra=rec.extra)

    def module(self, factors, bias):
        from .modules import RocketLinear

        return RocketLinear.from_factors(factors.A, factors.values, factors.indices, bias, extra=(
            factors.extra_values, factors.extra_rows, factors.extra_cols))


def _compot(W, L, rec, cfg):
    from ..factorize import compot

    return compot(W, L, rec.k, rec.s, cfg.iters, cfg.tol, cfg.refit)[0]


def _cospadi(W, L, rec, cfg):
    from ..factorize import cospadi

    return cospadi(W, L, rec.k, rec.s, cfg.cospadi_iters, cfg.seed)[0]


# CoSpaDi's K-SVD is too slow to build at every candidate size of the joint allocator
STORAGE: dict[str, Storage] = {s.name: s for s in (Dense(), SparseCodes("compot", _compot, True),
                                                   SparseCodes("cospadi", _cospadi, False), LowRank(),
                                                   RocketCodes())}


def dense_record(d_in: int, d_out: int, bias: bool, dtype: str) -> LayerRecord:
    return LayerRecord(method="dense", d_in=d_in, d_out=d_out, bias=bias, dtype=dtype)


def plan(method: str, d_in: int, d_out: int, bias: bool, nbytes: float, dtype: str,
         k_over_s: float = 2.0) -> LayerRecord:
    """The largest layer of `method` whose stored bytes fit `nbytes`; dense when the budget reaches the dense size
    or nothing smaller fits."""
    dense = dense_record(d_in, d_out, bias, dtype)
    if nbytes >= dense.bytes:
        return dense
    return STORAGE[method].fit(d_in, d_out, bias, nbytes, dtype, k_over_s) or dense
