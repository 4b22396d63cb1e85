"""calibrate → allocate → factorize → save, as functions over artifacts (model, Grams, plans, folders)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import allocation as alloc
from .budget import dense_bytes, linears_dense_bytes, ratio, value_bytes
from .calibration import Gram, calibrate, load_texts, make_batches, make_samples
from .artifact import check_output_dir
from .config import CalibrationConfig, CompressConfig, FactorizeConfig, QuantizeConfig
from .errors import CompotError
from .factorize import (LayerPlan, compot_whitened, damped_cholesky, factorize_layer, plan_layer, relative_error,
                        SpectralErrorEstimate, whiten)
from .models import Target, dense_weight, find_targets, is_causal_lm, load_model, set_module, targets_named

log = logging.getLogger(__name__)


def calibration_batches(tokenizer, cfg: CalibrationConfig, causal: bool) -> list[dict]:
    """Decoders calibrate on packed full-length chunks; encoders (measured on MiniLM: +0.04 mean cosine at
    ratio 0.3) on one document per sample, as they are used."""
    packing = causal if cfg.packing is None else cfg.packing
    n = cfg.samples or (32 if packing else 128)
    texts = load_texts(cfg.source)
    samples = make_samples(tokenizer, texts, n, cfg.seq_len, cfg.seed, packing)
    return make_batches(samples, cfg.batch_size, tokenizer.pad_token_id or 0)


def _weight(model, name: str):
    return dense_weight(model.get_submodule(name)).detach()


# ---------------------------------------------------------------- allocate

def allocate(model, targets: list[Target], grams: dict[str, Gram], cfg: CompressConfig,
             progress: bool = False) -> dict[str, LayerPlan]:
    """Per-layer plans whose total stored bytes fit (1 − ratio) of the targets' dense bytes."""
    import torch
    from tqdm.auto import tqdm

    a, f = cfg.allocation, cfg.factorize
    vb = value_bytes(f.dtype)

    def plan(t: Target, budget: float, k_over_s: float = f.k_over_s) -> LayerPlan:
        return plan_layer(t.name, f.method, t.d_in, t.d_out, t.bias, budget, vb, k_over_s)

    if a.strategy == "uniform":
        dense = [dense_bytes(t.d_in, t.d_out, vb, t.bias) for t in targets]
        return {t.name: plan(t, b) for t, b in zip(targets, alloc.uniform(dense, a.ratio))}

    def whitened(t: Target):
        return whiten(_weight(model, t.name), damped_cholesky(grams[t.name].G, f.eps, t.name))

    # dynamic: one SVD per layer estimates its error at every budget of a fine grid (METHOD §5);
    # mckp: COMPOT itself is run on a coarser (ratio × k/s) grid (ROCKET-style profiles).
    if a.strategy == "dynamic":
        ratios = [round(x, 4) for x in np.arange(0.0, a.layer_ratio_cap + 1e-9, 0.02)]
        k_over_s_grid = (f.k_over_s,)
    else:
        ratios, k_over_s_grid = list(a.mckp_ratios), a.mckp_k_over_s
    if f.method == "svd-llm":
        k_over_s_grid = (1.0,)
    cands: list[list[alloc.Candidate]] = []
    for t in tqdm(targets, desc=f"{a.strategy} profiles", unit="layer", disable=None if progress else True, leave=False):
        M = whitened(t)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        estimate = SpectralErrorEstimate(S, Vh)
        dense = dense_bytes(t.d_in, t.d_out, vb, t.bias)
        layer: dict[tuple, alloc.Candidate] = {}
        for r in ratios:
            if not (a.min_layer_ratio <= r <= a.layer_ratio_cap or r == 0.0 and a.min_layer_ratio == 0.0):
                continue
            for ks in k_over_s_grid:
                p = plan(t, (1.0 - r) * dense, ks)
                key = (p.method, p.k, p.s, p.r)
                if key in layer:
                    continue
                if a.strategy == "dynamic" or p.method in ("dense", "svd-llm"):
                    err = estimate(p)
                else:  # CoSpaDi is profiled with COMPOT: K-SVD over the whole grid would take hours
                    err = compot_whitened(M, p.k, p.s, a.mckp_profile_iters, 0.0, U=U)[3][-1] ** 2
                layer[key] = alloc.Candidate(bytes=p.bytes, error=err, tag=(p,))
        if not layer:
            raise CompotError(f"{t.name}: no allocation candidate inside the layer ratio range")
        cands.append(list(layer.values()))
    budget = (1.0 - a.ratio) * linears_dense_bytes(targets, vb)
    try:
        picks = alloc.mckp(cands, budget)
    except ValueError as e:
        raise CompotError(f"{a.strategy} allocation: {e}") from None
    return {t.name: cs[j].tag[0] for t, cs, j in zip(targets, cands, picks)}


# ---------------------------------------------------------------- factorize

@dataclass
class LayerResult:
    plan: LayerPlan
    rel_error: float
    seconds: float


def _round(t, dtype: str):
    """Round a tensor through the storage dtype, keep float32 for compute (so memory == file exactly)."""
    import torch

    return t.to(getattr(torch, dtype)).to(torch.float32)


def compress_layer(model, plan: LayerPlan, gram: Gram, f: FactorizeConfig) -> LayerResult:
    """Factor one linear of `model` by `plan` and put the compact module in its place."""
    from .factorize import LowRankFactors
    from .modules import CompotLinear, LowRankLinear

    t0 = time.perf_counter()
    mod = model.get_submodule(plan.name)
    W = dense_weight(mod).detach()
    bias = None if mod.bias is None else _round(mod.bias.detach(), f.dtype)
    L = damped_cholesky(gram.G, f.eps, plan.name)
    factors = factorize_layer(W, L, plan, f.iters, f.tol, f.cospadi_iters, f.seed)
    if factors is None:
        W_hat = _round(W, f.dtype)
        for p in mod.parameters():
            p.data = _round(p.data, f.dtype)
    else:
        if isinstance(factors, LowRankFactors):
            new = LowRankLinear.from_factors(_round(factors.A, f.dtype), _round(factors.B, f.dtype), bias)
        else:
            new = CompotLinear.from_factors(_round(factors.A, f.dtype), _round(factors.values, f.dtype),
                                            factors.indices, bias)
        W_hat = new.reconstruct()
        set_module(model, plan.name, new)
    return LayerResult(plan, relative_error(W, W_hat, L), time.perf_counter() - t0)


# ---------------------------------------------------------------- compress (all stages)

def _dense_model_bytes(model, vb: int) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * (vb if t.is_floating_point() else t.element_size())
    return total


def quantize_in_memory(model, targets: list[Target], batches: list[dict], q: QuantizeConfig, dtype: str,
                       progress: bool = True) -> dict[str, dict]:
    """GPTQ/RTN every target of `model` in place, block by block on the outputs of the quantized blocks before."""
    from tqdm.auto import tqdm

    from .quantize.apply import quantize_layer

    records: dict[str, dict] = {}
    bar = tqdm(total=len(targets), desc=f"quantize ({q.method} {q.bits}-bit)", unit="layer",
               disable=None if progress else True)

    def on_block(_i, block_grams):
        for name, g in block_grams.items():
            records[name] = quantize_layer(model, name, g, q, lambda t: _round(t, dtype))
            bar.update()
        return True

    calibrate(model, batches, targets, on_block=on_block, progress=False)
    bar.close()
    return records


def round_other_params(model, skip: set[str], dtype: str) -> None:
    """Everything outside the compressed layers is stored at the storage dtype too: round it the same way."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not any(name.startswith(n + ".") for n in skip):
                p.data = _round(p.data, dtype)


def compress_in_memory(model, tokenizer, cfg: CompressConfig, progress: bool = True):
    """Compress (and optionally quantize) `model` in place.

    Returns (targets, {name: layer entry of the `compot` config section}, timings)."""
    from tqdm.auto import tqdm

    if cfg.allocation.strategy == "joint":
        return joint_in_memory(model, tokenizer, cfg, progress)
    timings = {}
    t0 = time.perf_counter()
    targets = find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    batches = calibration_batches(tokenizer, cfg.calibration, is_causal_lm(model))
    grams = calibrate(model, batches, targets, progress=progress)
    timings["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plans = allocate(model, targets, grams, cfg, progress)
    timings["allocate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: dict[str, LayerResult] = {}
    bar = tqdm(total=len(targets), desc=f"factorize ({cfg.factorize.method})", unit="layer",
               disable=None if progress else True)
    if cfg.calibration.sequential:
        def on_block(_i, block_grams):
            for name, g in block_grams.items():
                results[name] = compress_layer(model, plans[name], g, cfg.factorize)
                bar.update()
            return True

        del grams
        calibrate(model, batches, targets, on_block=on_block, progress=False)
    else:
        for t in targets:  # independent once the Grams are known
            results[t.name] = compress_layer(model, plans[t.name], grams[t.name], cfg.factorize)
            bar.update()
    bar.close()
    round_other_params(model, {n for n, r in results.items() if r.plan.method != "dense"}, cfg.factorize.dtype)
    timings["factorize"] = time.perf_counter() - t0
    entries = {t.name: {**results[t.name].plan.to_dict(), "rel_error": results[t.name].rel_error,
                        "seconds": results[t.name].seconds} for t in targets}
    if cfg.quantize is not None:
        t0 = time.perf_counter()
        for name, rec in quantize_in_memory(model, targets, batches, cfg.quantize, cfg.factorize.dtype,
                                            progress).items():
            entries[name]["quant"] = rec
        timings["quantize"] = time.perf_counter() - t0
    return targets, entries, timings


@dataclass
class JointProfile:
    """What the joint allocator measured on a model: its targets, calibration batches, every layer's candidates
    (errors weighted by the layer's sensitivity) and the sensitivities; enough to build it at any budget."""

    targets: list[Target]
    batches: list[dict]
    candidates: list[list[alloc.Candidate]]
    weights: list[float]
    dense_linear_bytes: int
    seconds: float


def joint_profile(model, tokenizer, cfg: CompressConfig, progress: bool = True,
                  targets: list[Target] | None = None) -> JointProfile:
    """Calibrate `model` and measure every joint candidate of every layer (joint.py); the model is left as it was.
    targets: the linears to compress, when already found."""
    from . import joint

    t0 = time.perf_counter()
    a, f = cfg.allocation, cfg.factorize
    targets = targets or find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    batches = calibration_batches(tokenizer, cfg.calibration, is_causal_lm(model))
    grams = calibrate(model, batches, targets, progress=progress)
    cands = joint.measure(model, targets, grams, a.joint, f, progress)
    weights = [1.0] * len(targets)
    if a.joint.sensitivity:
        weights = joint.sensitivities(model, targets, grams, batches[: a.joint.sensitivity_batches],
                                      seed=cfg.calibration.seed)
        cands = joint.weighted(cands, weights)
    vb = value_bytes(f.dtype)
    return JointProfile(targets, batches, cands, weights,
                        linears_dense_bytes(targets, vb), time.perf_counter() - t0)


def joint_build(model, profile: JointProfile, budget: float, cfg: CompressConfig, progress: bool = True,
                methods: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Pick one candidate per layer within `budget` bytes (only of `methods`, when given) and build the picks in
    `model` in place. Returns the layer entries."""
    from . import joint

    cands = profile.candidates
    if methods is not None:
        cands = [[c for c in cs if c.tag[0].method in methods] for cs in cands]
    picks = joint.pick(cands, budget, profile.dense_linear_bytes)
    round_other_params(model, {t.name for t in profile.targets}, cfg.factorize.dtype)
    return joint.assemble(model, profile.targets, profile.batches,
                          {t.name: cs[j] for t, cs, j in zip(profile.targets, cands, picks)}, cfg.factorize,
                          cfg.allocation.joint, {t.name: w for t, w in zip(profile.targets, profile.weights)}, progress)


def joint_in_memory(model, tokenizer, cfg: CompressConfig, progress: bool = True):
    """compress_in_memory for the joint allocator: measure every candidate of every layer, pick one per layer
    within the byte budget, build the picks block by block (joint.py)."""
    from . import joint

    if cfg.quantize is not None:
        raise CompotError("the joint allocator picks the bits of every layer itself: drop the quantize settings "
                          "(--gptq-bits) or the byte target")
    vb = value_bytes(cfg.factorize.dtype)
    targets = find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    n_tensors = len({t.data_ptr() for t in model.state_dict().values()})
    budget = joint.budget_bytes(cfg.allocation, targets, _dense_model_bytes(model, vb), n_tensors, vb)  # fail early
    profile = joint_profile(model, tokenizer, cfg, progress, targets)
    t0 = time.perf_counter()
    entries = joint_build(model, profile, budget, cfg, progress)
    return profile.targets, entries, {"allocate": profile.seconds, "factorize": time.perf_counter() - t0}


def compress(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: CompressConfig, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Load `model_dir`, compress it by `cfg`, write the compact model to `out` atomically; return the report."""
    t_start = time.perf_counter()
    check_output_dir(out, overwrite)  # fail before the slow stages
    model, tokenizer = load_model(model_dir)
    dense_model = _dense_model_bytes(model, value_bytes(cfg.factorize.dtype))
    targets, entries, timings = compress_in_memory(model, tokenizer, cfg, progress)
    return save_with_report(model, tokenizer, out, model_dir, cfg.model_dump(mode="json"), cfg.factorize.dtype,
                            targets, entries, timings, dense_model, t_start, overwrite, str(model_dir))


def quantize_dir(model_dir: str | os.PathLike, out: str | os.PathLike, q: QuantizeConfig,
                 calib: CalibrationConfig = CalibrationConfig(), dtype: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """GPTQ/RTN a folder written by `compress` (its factors) or a plain HF model (its block linears: the dense
    baseline) into `out`."""
    from .artifact import load as load_compressed
    from .models import load_tokenizer, read_hf_config

    t_start = time.perf_counter()
    check_output_dir(out, overwrite)  # fail before the slow stages
    section = read_hf_config(model_dir).get("compot")
    if section:
        if any("quant" in lay for lay in section["layers"].values()):
            raise CompotError(f"{model_dir} is already quantized")
        model, tokenizer = load_compressed(model_dir), load_tokenizer(model_dir)
        dtype = dtype or section["storage_dtype"]
        entries = {n: dict(lay) for n, lay in section["layers"].items()}
        targets = targets_named(model, entries)
        dense_model = section.get("dense_model_bytes", 0)
        config = {**section.get("config", {}), "quantize": q.model_dump(mode="json")}
        source = section.get("source_model", str(model_dir))
    else:
        model, tokenizer = load_model(model_dir)
        dtype = dtype or "float16"
        vb = value_bytes(dtype)
        dense_model = _dense_model_bytes(model, vb)
        targets = find_targets(model)
        entries = {t.name: plan_layer(t.name, "dense", t.d_in, t.d_out, t.bias, float("inf"), vb).to_dict()
                   for t in targets}
        round_other_params(model, {t.name for t in targets}, dtype)
        config = {"quantize": q.model_dump(mode="json")}
        source = str(model_dir)
    t0 = time.perf_counter()
    batches = calibration_batches(tokenizer, calib, is_causal_lm(model))
    for name, rec in quantize_in_memory(model, targets, batches, q, dtype, progress).items():
        entries[name]["quant"] = rec
    timings = {"quantize": time.perf_counter() - t0}
    return save_with_report(model, tokenizer, out, model_dir, config, dtype, targets, entries, timings, dense_model,
                            t_start, overwrite, source)


def save_with_report(model, tokenizer, out, model_dir, config: dict, dtype: str, targets, entries: dict,
                     timings: dict, dense_model: int, t_start: float, overwrite: bool, source: str) -> dict:
    """Write the compressed folder atomically. source: the original (uncompressed) model directory."""
    from . import __version__
    from .artifact import FORMAT_VERSION, WEIGHTS, atomic_dir, save_compressed, write_json_atomic

    section = {
        "format_version": FORMAT_VERSION,
        "producer": f"compot-deploy {__version__}",
        "storage_dtype": dtype,
        "dense_model_bytes": dense_model,
        "source_model": str(Path(source).resolve()),
        "config": config,
        "layers": {t.name: entries[t.name] for t in targets},
    }
    with atomic_dir(out, overwrite) as tmp:
        save_compressed(model, tokenizer, tmp, section, dtype)
        report = _report(model_dir, tmp / WEIGHTS, section, timings, value_bytes(dtype))
        report["seconds"] = time.perf_counter() - t_start
        write_json_atomic(tmp / "compression_report.json", report)
    return report


def _report(model_dir, weights: Path, section: dict, timings, vb: int) -> dict:
    from .artifact import layer_file_bytes
    from .quantize.apply import quantized_layer_bytes

    file_bytes = layer_file_bytes(weights, list(section["layers"]))
    layers = []
    for name, e in section["layers"].items():
        planned = quantized_layer_bytes(e, vb) if "quant" in e else e["bytes"]
        layers.append({**e, "name": name, "planned_bytes": planned, "file_bytes": file_bytes[name],
                       "ratio": ratio(file_bytes[name], e["dense_bytes"])})
    dense_lin = sum(x["dense_bytes"] for x in layers)
    planned = sum(x["planned_bytes"] for x in layers)
    stored = sum(x["file_bytes"] for x in layers)
    model_file = weights.stat().st_size
    dense_model = section["dense_model_bytes"]
    extra = {}
    if any("joint" in e for e in section["layers"].values()):
        from .joint import families

        a = section["config"].get("allocation", {})
        extra["joint"] = {"target_ratio": a.get("target_ratio"), "target_bytes": a.get("target_bytes"),
                          "fits": model_file <= a["target_bytes"] if a.get("target_bytes") else stored <= (
                              a["target_ratio"] * dense_lin + 1e-6),
                          "estimated_error": sum(e["joint"]["estimated_error"] for e in section["layers"].values()),
                          "choices": families(section["layers"])}
    return {
        "model_dir": str(model_dir),
        "linears": {
            "count": len(layers),
            "dense_bytes": dense_lin,
            "planned_bytes": planned,
            "file_bytes": stored,
            "planned_ratio": ratio(planned, dense_lin),
            "file_ratio": ratio(stored, dense_lin),
        },
        "model_file": {"bytes": model_file, "dense_bytes": dense_model, "ratio": ratio(model_file, dense_model)},
        "timings": timings,
        **extra,
        "layers": layers,
    }
