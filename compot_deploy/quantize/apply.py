"""GPTQ / RTN applied to a (compressed or dense) model, block by block (METHOD §6).

COMPOT layer: the dictionary A with H_A ∝ G (the Gram of its input x), then the code values with the per-column
s × s sub-Hessians of H_C ∝ Âᵀ G Â, sparsity pattern unchanged. Dense layers (kept dense by the allocator, or a
plain model: the GPTQ baseline users know) become QuantLinear. Blocks are quantized in order, each calibrated on
the outputs of the already-quantized blocks before it.
"""

from __future__ import annotations

import logging
import time

import torch

from ..budget import position_bytes, position_format, quant_bytes
from ..models import dense_weight, is_dense_linear, set_module
from ..modules import CompotLinear, LowRankLinear, QuantLinear, put_slot
from .gptq import Quantized, gptq, gptq_sparse_columns, rtn
from .packing import QuantTensor

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


def _put(module, slot: str, qz: Quantized, round_scales, rec: dict) -> torch.Tensor:
    """Store qz in module.slot (packed); return the dequantized matrix exactly as the stored model computes it."""
    rec.setdefault("slots", {})[slot] = [qz.group]
    return put_slot(module, slot, QuantTensor.from_quantized(qz, round_scales)).dequantize().to(torch.float64)


def quantize_layer(model, name: str, gram, cfg, round_scales, cache: dict | None = None) -> dict:
    """Quantize the layer `name` of `model` in place. gram: Gram of its inputs. Returns its quant record.
    cache: a dict shared by calls on the same layer and Gram (GPTQ reuses the factored inverse Hessian)."""
    t0 = time.perf_counter()
    mod = model.get_submodule(name)
    H = 2.0 * gram.G / max(gram.n, 1)
    rec: dict = {"bits": cfg.bits, "group": cfg.group, "sym": cfg.sym, "method": cfg.method}
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
        rec["slots"] = {"weight": [qz.group]}
        W_after = new.reconstruct()
    else:
        raise TypeError(f"{name}: cannot quantize a {type(mod).__name__}")
    E = W_before - W_after
    rec["rel_error"] = (output_error2(E, gram.G) / output_error2(W_before, gram.G)) ** 0.5
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _slot_shapes(lay: dict) -> dict[str, tuple[int, int]]:
    d_in, d_out = lay["d_in"], lay["d_out"]
    if lay["method"] in ("compot", "cospadi"):
        return {"A": (d_in, lay["k"]), "values": (lay["s"], d_out)}
    if lay["method"] == "svd-llm":
        return {"A": (d_in, lay["r"]), "B": (lay["r"], d_out)}
    return {"weight": (d_in, d_out)}


def quantized_layer_bytes(lay: dict, vbytes: int) -> int:
    """Planned stored bytes of a quantized layer entry of the `compot` config section (budget.quant_bytes per
    packed matrix, plus code indices and bias)."""
    q = lay["quant"]
    total = lay["d_out"] * vbytes if lay["bias"] else 0
    for slot, (K, N) in _slot_shapes(lay).items():
        total += quant_bytes(K, N, q["bits"], q["slots"][slot][0], q["sym"], vbytes)
    if lay["method"] in ("compot", "cospadi"):
        total += position_bytes(lay["d_out"], lay["k"], lay["s"], position_format(lay["k"], lay["s"]))
    return total


def rebuild_quant_slots(module, lay: dict):
    """Give a freshly built layer module the empty QuantTensor slots its saved entry describes (for loading)."""
    q = lay["quant"]
    if lay["method"] == "dense":
        return QuantLinear(lay["d_in"], lay["d_out"], q["bits"], q["slots"]["weight"][0], q["sym"], lay["bias"])
    for slot, (group,) in q["slots"].items():
        K, N = getattr(module, slot).shape
        put_slot(module, slot, QuantTensor(K, N, q["bits"], group, q["sym"]))
    return module
