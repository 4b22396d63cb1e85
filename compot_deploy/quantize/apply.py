"""GPTQ / RTN applied to a (compressed or dense) model, block by block (METHOD §6).

COMPOT layer: the dictionary A with H_A ∝ G (the Gram of its input x), then the code values with the per-column
s × s sub-Hessians of H_C ∝ Âᵀ G Â, sparsity pattern unchanged. Dense layers (kept dense by the allocator, or a
plain model: the GPTQ baseline users know) become QuantLinear. Blocks are quantized in order, each calibrated on
the outputs of the already-quantized blocks before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..models import dense_weight, is_dense_linear, set_module
from ..storage.modules import CompotLinear, LowRankLinear, QuantLinear, put_slot
from ..storage.packing import QuantTensor
from ..storage.record import QuantSpec
from .gptq import Quantized, gptq, gptq_sparse_columns, rtn

log = logging.getLogger(__name__)


def _quantize_matrix(M: torch.Tensor, H: torch.Tensor | None, cfg, name: str, n_tokens: int,
                     cache: dict | None = None) -> Quantized:
    if cfg.method == "rtn":
        return rtn(M, cfg.bits, cfg.group, cfg.sym)
    return gptq(M, H, cfg.bits, cfg.group, cfg.sym, cfg.act_order, damp=cfg.damp, name=name, n_tokens=n_tokens,
                cache=cache)


def output_error2(E: torch.Tensor, G: torch.Tensor) -> float:
    """tr(Eᵀ G E): the squared output error of a weight error E: (d_in, d_out) on inputs with Gram G."""
    return float(((G @ E) * E).sum())


@dataclass
class QuantResult:
    """What quantizing one layer stored (spec) and measured: the relative output error the quantization added,
    ‖(Ŵ_before − Ŵ_after)ᵀ X‖ / ‖Ŵ_beforeᵀ X‖, and its seconds."""

    spec: QuantSpec
    rel_error: float
    seconds: float


def _put(module, slot: str, qz: Quantized, round_scales, groups: dict) -> torch.Tensor:
    """Store qz in module.slot (packed); return the dequantized matrix exactly as the stored model computes it."""
    groups[slot] = qz.group
    return put_slot(module, slot, QuantTensor.from_quantized(qz, round_scales)).dequantize().to(torch.float64)


def quantize_layer(model, name: str, gram, cfg, round_scales, cache: dict | None = None) -> QuantResult:
    """Quantize the layer `name` of `model` in place by `cfg` (QuantizeConfig). gram: Gram of its inputs.
    cache: a dict shared by calls on the same layer and Gram (GPTQ reuses the factored inverse Hessian)."""
    t0 = time.perf_counter()
    mod = model.get_submodule(name)
    H = 2.0 * gram.G / max(gram.n, 1)
    rec: dict = {}  # slot → stored group
    if isinstance(mod, CompotLinear):
        W_before = mod.reconstruct()
        A_hat = _put(mod, "A", _quantize_matrix(mod.A.data, H, cfg, f"{name}.A", gram.n, cache), round_scales,
                     rec)
        if cfg.method == "rtn":
            qv = rtn(mod.values.data, cfg.bits, mod.s, cfg.sym)
        else:
            qv = gptq_sparse_columns(mod.values.data, mod.code_indices(), A_hat.T @ H @ A_hat, cfg.bits, cfg.sym, cfg.damp,
                                     f"{name}.values")
        _put(mod, "values", qv, round_scales, rec)
        W_after = mod.reconstruct()
    elif isinstance(mod, LowRankLinear):
        W_before = mod.reconstruct()
        A_hat = _put(mod, "A", _quantize_matrix(mod.A.data, H, cfg, f"{name}.A", gram.n, cache), round_scales, rec)
        _put(mod, "B", _quantize_matrix(mod.B.data, A_hat.T @ H @ A_hat, cfg, f"{name}.B", gram.n), round_scales, rec)
        W_after = mod.reconstruct()
    elif is_dense_linear(mod):
        W_before = dense_weight(mod).detach().double()
        qz = _quantize_matrix(W_before, H, cfg, name, gram.n, cache)
        new = QuantLinear(W_before.shape[0], W_before.shape[1], qz.bits, qz.group, qz.sym, mod.bias is not None)
        put_slot(new, "weight", QuantTensor.from_quantized(qz, round_scales))
        if mod.bias is not None:
            new.bias.data.copy_(mod.bias.data)
        set_module(model, name, new)
        rec["weight"] = qz.group
        W_after = new.reconstruct()
    else:
        raise TypeError(f"{name}: cannot quantize a {type(mod).__name__}")
    E = W_before - W_after
    spec = QuantSpec(method=cfg.method, bits=cfg.bits, sym=cfg.sym, groups=rec)
    # relative to 1 where the weight's output is zero (an all-zero weight), as joint.measure_layer does
    return QuantResult(spec, (output_error2(E, gram.G) / (output_error2(W_before, gram.G) or 1.0)) ** 0.5,
                       time.perf_counter() - t0)
