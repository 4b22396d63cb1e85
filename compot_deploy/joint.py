"""The joint allocator: every way to store each layer, measured, then one knapsack over bytes (allocation.mckp).

Per layer the candidates are: dense at the storage dtype, dense GPTQ at each (bits, group), and COMPOT / SVD-LLM
factors at each byte ratio, stored at the storage dtype or GPTQ-quantized. Each carries its exact stored bytes
(budget.py, the one place bytes are counted) and its relative squared error on the calibration inputs,
‖Lᵀ(W − Ŵ)‖² / ‖LᵀW‖² = tr(EᵀGE) / tr(WᵀGW), measured by building the candidate with the same code the final
model is built with. Layers do not matter equally (on MiniLM a probe error moves the final hidden states 300×
more through the last FFN output than through an early query), so each layer's errors are weighted by its
measured sensitivity (`sensitivities`): that lifted the allocator at 0.2 × fp16 bytes from cosine 0.856 to
0.934, at 0.136 × from 0.708 to 0.800. Candidates are measured on the original model's Grams, each layer on its
own (layers stay independent); the chosen ones are then built block by block on the outputs of the blocks already
compressed, as plain GPTQ does, so a choice that is one family everywhere reproduces that family's model exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from . import allocation as alloc
from .budget import dense_bytes, linears_dense_bytes, value_bytes
from .config import AllocationConfig, FactorizeConfig, JointConfig, QuantizeConfig
from .errors import CompotError
from .factorize import LayerPlan, plan_layer
from .models import Target, dense_weight
from .pipeline import _round, compress_layer

# safetensors header bytes reserved per stored tensor when the budget is a whole-file size (names, dtype, shape,
# offsets in JSON: ~70–110 bytes each on the models measured)
HEADER_BYTES_PER_TENSOR = 160


@dataclass(frozen=True)
class JointChoice:
    """One way to store a layer. method: 'dense' | 'compot' | 'svd-llm'; ratio: byte ratio removed by the
    float16 factorization (0 for dense); bits: 16 = stored at the storage dtype, else GPTQ; group: GPTQ group."""

    method: str
    ratio: float = 0.0
    bits: int = 16
    group: int = 0

    @property
    def label(self) -> str:
        q = "" if self.bits == 16 else f"{self.bits}-bit g{self.group or 'col'}"
        if self.method == "dense":
            return f"dense {q or 'fp'}"
        return f"{self.method} {self.ratio:g}" + (f" + {q}" if q else "")

    def quantize_config(self, method: str) -> QuantizeConfig | None:
        return None if self.bits == 16 else QuantizeConfig(method=method, bits=self.bits, group=self.group)


def choices(space: JointConfig) -> list[JointChoice]:
    """Every choice of the candidate space, dense ones first."""
    out = []
    if "dense" in space.methods:
        out.append(JointChoice("dense"))
        out += [JointChoice("dense", 0.0, b, g) for b, g in space.dense_quant]
    for m in ("compot", "svd-llm"):
        if m in space.methods:
            out += [JointChoice(m, r, b, 0 if b == 16 else space.factor_group)
                    for r in space.factor_ratios for b in space.factor_bits]
    return out


def _holder(module):
    """A one-layer model holding a copy of `module` as "m": the pipeline's per-layer functions build candidates
    in it without touching the real model."""
    import torch

    h = torch.nn.Module()
    h.add_module("m", copy.deepcopy(module))
    return h


def measure_layer(module, gram, t: Target, space: JointConfig, f: FactorizeConfig) -> list[alloc.Candidate]:
    """All candidates of one linear `module` (its inputs' Gram `gram`), each tagged (JointChoice, LayerPlan)."""
    import torch

    from .quantize.apply import output_error2, quantize_layer, quantized_layer_bytes

    vb = value_bytes(f.dtype)
    W = dense_weight(module).detach().double()
    G = gram.G.double()
    ref = output_error2(W, G) or 1.0
    cache: dict = {}

    def error(W_hat) -> float:
        return output_error2(W - W_hat.double(), G) / ref

    def rounded(x):
        return _round(x, f.dtype)

    dense = dense_bytes(t.d_in, t.d_out, vb, t.bias)
    dense_plan = LayerPlan("m", "dense", t.d_in, t.d_out, t.bias, bytes=dense, dense_bytes=dense)
    out: list[alloc.Candidate] = []
    built: dict[tuple, object] = {}  # one factorization per shape, shared by its bit widths
    seen: set = set()
    for ch in choices(space):
        if ch.method == "dense" and ch.bits == 16:
            out.append(alloc.Candidate(dense, error(rounded(W)), (ch, dense_plan)))
            continue
        if ch.method == "dense":
            plan, holder = dense_plan, _holder(module)
        else:
            plan = plan_layer("m", ch.method, t.d_in, t.d_out, t.bias, (1.0 - ch.ratio) * dense, vb, f.k_over_s)
            shape = (plan.method, plan.k, plan.s, plan.r)
            if plan.method == "dense" or (shape, ch.bits, ch.group) in seen:  # nothing fits / same as a smaller ratio
                continue
            seen.add((shape, ch.bits, ch.group))
            if shape not in built:
                built[shape] = _holder(module)
                compress_layer(built[shape], plan, gram, f)
            holder = built[shape] if ch.bits == 16 else copy.deepcopy(built[shape])
        q = ch.quantize_config(space.quant_method)
        if q is None:
            out.append(alloc.Candidate(plan.bytes, error(holder.m.reconstruct()), (ch, plan)))
            continue
        rec = quantize_layer(holder, "m", gram, q, rounded, cache)
        nbytes = quantized_layer_bytes({**plan.to_dict(), "quant": rec}, vb)
        out.append(alloc.Candidate(nbytes, error(holder.m.reconstruct()), (ch, plan)))
    if not out:
        raise CompotError(f"{t.name}: the joint candidate set is empty")
    return out


def measure(model, targets: list[Target], grams: dict, space: JointConfig, f: FactorizeConfig,
            progress: bool = False) -> list[list[alloc.Candidate]]:
    """measure_layer for every target, in order (independent layers: any order, any worker)."""
    from tqdm.auto import tqdm

    bar = tqdm(targets, desc="joint candidates", unit="layer", disable=None if progress else True, leave=False)
    return [measure_layer(model.get_submodule(t.name), grams[t.name], t, space, f) for t in bar]


def _final_hidden(model, batches) -> "torch.Tensor":  # noqa: F821
    """Final hidden states of the real (unpadded) tokens of `batches`: (n_tokens, hidden)."""
    import torch

    body = getattr(model, "base_model", model)  # a causal LM's decoder: no vocabulary-sized logits
    out = []
    with torch.no_grad():
        for b in batches:
            out.append(body(**b).last_hidden_state[b["attention_mask"].bool()].double())
    return torch.cat(out)


def sensitivities(model, targets: list[Target], grams: dict, batches: list[dict], probe: float = 0.01,
                  seed: int = 0) -> list[float]:
    """Per target: ‖ΔY‖² / ‖Y‖² of the final hidden states Y on `batches` when that layer alone gets Gaussian
    weight noise of relative squared error `probe` (tr(EᵀGE) = probe · tr(WᵀGW)), divided by `probe`: the factor
    turning a layer's relative squared error into the model's. The model is restored after each probe."""
    import torch

    from .quantize.apply import output_error2

    y0 = _final_hidden(model, batches)
    ref = float((y0 * y0).sum()) or 1.0
    out = []
    for i, t in enumerate(targets):
        W = dense_weight(model.get_submodule(t.name))
        G = grams[t.name].G.double()
        N = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
        E = N * (probe * output_error2(W.detach().double(), G) / max(output_error2(N, G), 1e-300)) ** 0.5
        saved = W.detach().clone()
        with torch.no_grad():
            W.add_(E.to(W.dtype))
            out.append(float(((_final_hidden(model, batches) - y0) ** 2).sum()) / ref / probe)
            W.copy_(saved)
    return out


def weighted(cands: list[list[alloc.Candidate]], weights: list[float]) -> list[list[alloc.Candidate]]:
    """Each layer's candidate errors scaled by its weight (its sensitivity)."""
    return [[alloc.Candidate(c.bytes, c.error * w, c.tag) for c in cs] for cs, w in zip(cands, weights)]


def budget_bytes(a: AllocationConfig, targets: list[Target], dense_model: int, n_tensors: int, vb: int) -> float:
    """Bytes the target linears may take: target_ratio × their dense bytes, or target_bytes less what everything
    else in the weights file takes (the other tensors at the storage dtype, and the header). n_tensors: tensors the
    original stores."""
    dense_lin = linears_dense_bytes(targets, vb)
    if a.target_ratio is not None:
        return a.target_ratio * dense_lin
    header = HEADER_BYTES_PER_TENSOR * (n_tensors + 6 * len(targets))  # a factorized, quantized layer: ≤ 7 tensors
    rest = dense_model - dense_lin + header
    if a.target_bytes <= rest:
        raise CompotError(f"target of {a.target_bytes:,} bytes is below the {rest:,} bytes that the weights outside "
                          f"the compressed linears (and the file header) take")
    return a.target_bytes - rest


def pick(cands: list[list[alloc.Candidate]], budget: float, dense_lin: int) -> list[int]:
    """One candidate per layer: least Σ estimated error within `budget` bytes."""
    try:
        return alloc.mckp(cands, budget, resolution=20000)
    except ValueError:
        least = sum(min(c.bytes for c in cs) for cs in cands)
        raise CompotError(f"byte budget {budget:,.0f} for the linears is below the smallest this candidate set "
                          f"reaches: {least:,} bytes ({least / dense_lin:.3f} of dense)") from None


def assemble(model, targets: list[Target], batches: list[dict], picked: dict[str, alloc.Candidate],
             f: FactorizeConfig, space: JointConfig, weights: dict[str, float] | None = None,
             progress: bool = False) -> dict[str, dict]:
    """Build each layer's picked candidate in place, block by block on the outputs of the compressed blocks before.
    Returns the layer entries of the `compot` config section (with the choice, its estimated (weighted) error and
    the layer's sensitivity under "joint")."""
    from tqdm.auto import tqdm

    from .calibration import calibrate
    from .quantize.apply import quantize_layer

    entries: dict[str, dict] = {}
    weights = weights or {}
    bar = tqdm(total=len(targets), desc="joint build", unit="layer", disable=None if progress else True)

    def on_block(_i, block_grams):
        for name, g in block_grams.items():
            cand = picked[name]
            ch, plan = cand.tag
            plan = LayerPlan(**{**plan.to_dict(), "name": name})
            entry = plan.to_dict()
            if not (plan.method == "dense" and ch.bits < 16):  # dense GPTQ starts from the unrounded weight
                res = compress_layer(model, plan, g, f)
                entry.update(rel_error=res.rel_error, seconds=res.seconds)
            q = ch.quantize_config(space.quant_method)
            if q is not None:
                entry["quant"] = quantize_layer(model, name, g, q, lambda t: _round(t, f.dtype))
            entry["joint"] = {"choice": ch.label, "estimated_error": cand.error, "bytes": cand.bytes,
                              "sensitivity": weights.get(name, 1.0)}
            entries[name] = entry
            bar.update()
        return True

    calibrate(model, batches, targets, on_block=on_block, progress=False)
    bar.close()
    return entries


def families(entries: dict[str, dict]) -> dict[str, int]:
    """How many layers took each choice, most frequent first."""
    counts: dict[str, int] = {}
    for e in entries.values():
        label = e["joint"]["choice"]
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
