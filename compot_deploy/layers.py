"""Build one linear of a model into the storage its LayerRecord names: factorize, round to the storage dtype,
quantize. The per-block steps of compress, quantize and the joint allocator all call `build_layer`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .models import dense_weight, is_dense_linear, set_module
from .storage.record import LayerRecord, LayerStats


def round_to(t, dtype: str):
    """Round a tensor through the storage dtype, keep float32 for compute (so memory == file exactly)."""
    import torch

    return t.to(getattr(torch, dtype)).to(torch.float32)


def round_param(p, dtype: str) -> None:
    """One floating parameter rounded through the storage dtype, in place a chunk at a time (no full-size copies;
    a non-contiguous one is replaced)."""
    import torch

    with torch.no_grad():
        if not p.data.is_contiguous():
            p.data = round_to(p.data, dtype)
            return
        for chunk in p.data.view(-1).split(1 << 22):
            chunk.copy_(round_to(chunk, dtype))


def round_params(module, dtype: str) -> None:
    """Every floating parameter of `module` rounded through the storage dtype (new data: a tensor read from the
    old, such as the weight a layer's error is measured against, keeps its values)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.data = round_to(p.data, dtype)


def round_other_params(model, skip: set[str], dtype: str) -> None:
    """Everything outside the layers named in `skip` is stored at the storage dtype too: round it the same way
    (what a lazily loaded model reads from its checkpoint from now on, too)."""
    from .streaming import weights_of

    if weights_of(model) is not None:
        weights_of(model).round_dtype = dtype
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not any(name.startswith(n + ".") for n in skip):
            round_param(p, dtype)


def factor_layer(model, name: str, rec: LayerRecord, gram, f, L=None, memo: dict | None = None) -> LayerStats:
    """Store the dense linear `name` of `model` as `rec` (unquantized) by factorizing it on the Gram of its
    inputs; a dense record only rounds it. f: FactorizeConfig (iterations, damping, seed); L: the Gram's damped
    Cholesky factor when already known; memo: shared by factorizations of the same weight (Storage.factorize)."""
    from .factorize import damped_cholesky, relative_error

    t0 = time.perf_counter()
    mod = model.get_submodule(name)
    W = dense_weight(mod).detach()
    L = damped_cholesky(gram.G, f.eps, name) if L is None else L
    if not rec.factored:
        round_params(mod, rec.dtype)
        W_hat = round_to(W, rec.dtype)
    else:
        factors = rec.storage.factorize(W, L, rec, f, memo)
        factors = replace(factors, **{k: round_to(v, rec.dtype) for k, v in vars(factors).items()
                                      if v.is_floating_point()})
        bias = None if mod.bias is None else round_to(mod.bias.detach(), rec.dtype)
        new = rec.storage.module(factors, bias)
        W_hat = new.reconstruct()
        set_module(model, name, new)
    return LayerStats(rel_error=relative_error(W, W_hat, L), seconds=time.perf_counter() - t0)


def build_layer(model, name: str, rec: LayerRecord, gram, f, q=None, stats: LayerStats | None = None,
                cache: dict | None = None, L=None) -> tuple[LayerRecord, LayerStats]:
    """Bring layer `name` to `rec`, then quantize it by `q` (QuantizeConfig) when given. A layer already factored
    (an earlier pass) is not factored again; dense GPTQ starts from the unrounded weight. Returns the record as
    stored (with its quantization spec) and the measurements, added to `stats` when given. L: the damped
    Cholesky factor of gram.G when already known; cache: a dict shared by calls on the same layer and Gram
    (GPTQ's factored inverse Hessian, what factorizations of several shapes have in common)."""
    from .quantize.apply import quantize_layer

    stats = stats or LayerStats()
    already = rec.factored and not is_dense_linear(model.get_submodule(name))
    if not already and (rec.factored or q is None):
        built = factor_layer(model, name, rec, gram, f, L, cache)
        stats.rel_error, stats.seconds = built.rel_error, built.seconds
    if q is None:
        return rec, stats
    res = quantize_layer(model, name, gram, q, lambda t: round_to(t, rec.dtype), cache)
    stats.quant_rel_error, stats.quant_seconds = res.rel_error, res.seconds
    return rec.with_quant(res.spec), stats
