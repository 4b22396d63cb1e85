"""The joint allocator: every way to store each layer, measured, then one knapsack over bytes (knapsack.mckp).

Per layer the candidates are: dense at the storage dtype, dense GPTQ at each (bits, group), and COMPOT / SVD-LLM
factors at each byte ratio, stored at the storage dtype or GPTQ-quantized. Each is a LayerRecord with its exact
stored bytes (storage/budget.py, the one place bytes are counted) and its relative squared error on the
calibration inputs, ‖Lᵀ(W − Ŵ)‖² / ‖LᵀW‖² = tr(EᵀGE) / tr(WᵀGW), measured by building the candidate with the same
code the final model is built with (layers.build_layer). Layers do not matter equally (on MiniLM a probe error
moves the final hidden states 300× more through the last FFN output than through an early query), so each
layer's errors are weighted by its measured sensitivity (`sensitivities`): that lifted the allocator at 0.2 × fp16
bytes from cosine 0.856 to 0.934, at 0.136 × from 0.708 to 0.800. Candidates are measured on the original model's
Grams, each layer on its own (layers stay independent); the chosen ones are then built block by block on the
outputs of the blocks already compressed, as plain GPTQ does, so a choice that is one family everywhere reproduces
that family's model exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from ..config import CompressConfig, FactorizeConfig, JointConfig, QuantizeConfig
from ..errors import CompotError
from ..layers import build_layer, round_other_params, round_to
from ..models import Target, dense_weight, find_targets
from ..storage.budget import (budget_bytes, dense_model_bytes, embedding_bytes, linear_budget, linears_dense_bytes,
                              stored_tensor_count, value_bytes)
from ..storage.record import STORAGE, LayerRecord, LayerStats, QuantSpec, dense_record, plan
from .knapsack import Candidate, mckp


def quant_config(spec: QuantSpec | None) -> QuantizeConfig | None:
    """The QuantizeConfig that rebuilds a layer quantized as `spec` (its first slot's stored group)."""
    if spec is None:
        return None
    return QuantizeConfig(method=spec.method, bits=spec.bits, group=next(iter(spec.groups.values())), sym=spec.sym)


def options(t: Target, space: JointConfig, f: FactorizeConfig) -> list[tuple[LayerRecord, QuantizeConfig | None]]:
    """Every (unquantized record, quantization) the candidate space holds for target `t`, dense ones first;
    a factor size repeated by several ratios (or not fitting, so dense) is listed once."""
    dense = dense_record(t.d_in, t.d_out, t.bias, f.dtype)
    out: list[tuple[LayerRecord, QuantizeConfig | None]] = []
    if "dense" in space.methods:
        out.append((dense, None))
        out += [(dense, QuantizeConfig(method=space.quant_method, bits=b, group=g)) for b, g in space.dense_quant]
    seen: set[LayerRecord] = set()
    for m in (m for m in space.methods if STORAGE[m].factored):
        for r in space.factor_ratios:
            rec = plan(m, t.d_in, t.d_out, t.bias, budget_bytes(dense.bytes, removed=r), f.dtype, f.k_over_s)
            if not rec.factored or rec in seen:
                continue
            seen.add(rec)
            out += [(rec, None if b == 16 else QuantizeConfig(method=space.quant_method, bits=b,
                                                              group=space.factor_group)) for b in space.factor_bits]
    return out


def _holder(module):
    """A one-layer model holding a copy of `module` as "m": candidates are built in it without touching the
    real model."""
    import torch

    h = torch.nn.Module()
    h.add_module("m", copy.deepcopy(module))
    return h


def measure_layer(module, gram, t: Target, space: JointConfig, f: FactorizeConfig) -> list[Candidate]:
    """All candidates of one linear `module` (its inputs' Gram `gram`), each with its record as stored."""
    from ..factorize import damped_cholesky
    from ..quantize.apply import output_error2

    W = dense_weight(module).detach().double()
    G = gram.G.double()
    ref = output_error2(W, G) or 1.0
    # once for the layer's factorizations; dense candidates need none
    L = damped_cholesky(G, f.eps, t.name) if any(STORAGE[m].factored for m in space.methods) else None
    cache: dict = {}
    built: dict[LayerRecord, object] = {}  # one factorization per shape, shared by its bit widths

    def error(holder) -> float:
        return output_error2(W - holder.m.reconstruct().double(), G) / ref

    out: list[Candidate] = []
    for rec, q in options(t, space, f):
        if not rec.factored and q is None:
            out.append(Candidate(rec.bytes, output_error2(W - round_to(W, f.dtype).double(), G) / ref, rec))
            continue
        if rec.factored and rec not in built:
            built[rec] = _holder(module)
            build_layer(built[rec], "m", rec, gram, f, L=L)
        base = built[rec] if rec.factored else None
        holder = base if q is None else (copy.deepcopy(base) if base is not None else _holder(module))
        stored, _ = build_layer(holder, "m", rec, gram, f, q, cache=cache, L=L)
        out.append(Candidate(stored.bytes, error(holder), stored))
    if not out:
        raise CompotError(f"{t.name}: the joint candidate set is empty")
    return out


def measure(model, targets: list[Target], grams: dict, space: JointConfig, f: FactorizeConfig,
            progress: bool = False) -> list[list[Candidate]]:
    """measure_layer for every target, in order (independent layers: any order, any worker)."""
    from ..progress import bar

    return [measure_layer(model.get_submodule(t.name), grams[t.name], t, space, f)
            for t in bar(targets, desc="joint candidates", unit="layer", progress=progress)]


def _final_hidden(model, batches) -> "torch.Tensor":  # noqa: F821
    """Final hidden states of the real (unpadded) tokens of `batches`: (n_tokens, hidden)."""
    import torch

    from ..calibrate.runner import token_rows
    from ..models import final_hidden, output_mask

    with torch.no_grad():
        return torch.cat([token_rows(final_hidden(model, b), output_mask(b)).double() for b in batches])


def sensitivities(model, targets: list[Target], grams: dict, batches: list[dict], probe: float = 0.01,
                  seed: int = 0, progress: bool = True, table: "TableStats | None" = None) -> list[float]:
    """Per target: ‖ΔY‖² / ‖Y‖² of the final hidden states Y on `batches` when that layer alone gets Gaussian
    weight noise of relative squared error `probe` (tr(EᵀGE) = probe · tr(WᵀGW)), divided by `probe`: the factor
    turning a layer's relative squared error into the model's. The model is restored after each probe. With
    `table`, one more, last: the embedding table's, noise of relative squared error `probe` on its looked-up rows
    (weighed by the token counts)."""
    import torch

    from ..progress import bar as progress_bar
    from ..quantize.apply import output_error2

    y0 = _final_hidden(model, batches)
    out = []
    for i, t in enumerate(progress_bar(targets, desc="joint sensitivity", unit="layer", progress=progress)):
        W = dense_weight(model.get_submodule(t.name))
        G = grams[t.name].G.double()
        N = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
        E = N * (probe * output_error2(W.detach().double(), G) / max(output_error2(N, G), 1e-300)) ** 0.5
        saved = W.detach().clone()
        with torch.no_grad():
            W.add_(E.to(W.dtype))
            out.append(final_change(model, batches, y0) / probe)
            W.copy_(saved)
    if table is not None:
        T = table.module.weight
        N = torch.randn(T.shape, generator=torch.Generator().manual_seed(seed + len(targets)))
        N *= (probe * table.energy / max(table.weighed_energy(N), 1e-300)) ** 0.5
        saved = T.detach().clone()
        with torch.no_grad():
            T.add_(N.to(T.dtype))
            out.append(final_change(model, batches, y0) / probe)
            T.copy_(saved)
    return out


def gradient_sensitivities(model, targets: list[Target], grams: dict, batches: list[dict], probes: int = 2,
                           seed: int = 0, progress: bool = True, table: "TableStats | None" = None) -> list[float]:
    """`sensitivities` to first order, for every layer from the same few backward passes instead of one forward
    pass per layer. A weight error E moves the final hidden states Y by J·E (J: ∂Y/∂W); for Gaussian noise of
    relative squared error p (the probe's) E‖J·E‖² = p·‖J‖²_F·tr(WᵀGW) / (d_out·tr(G)), so the sensitivity is
    ‖J‖²_F·tr(WᵀGW) / (d_out·tr(G)·‖Y‖²). ‖J‖²_F = E_v ‖Jᵀv‖² over Gaussian v (Hutchinson), and Jᵀv is the
    gradient of ⟨v, Y⟩ with respect to W: `probes` draws of v per batch, one backward pass each. With `table`, the
    embedding table's lookups get one more, last: noise of relative squared error p on the looked-up rows
    (Σ_t c_t‖ΔE_t‖² = p·Σ_t c_t‖E_t‖², c_t the token counts) gives ‖J‖²_F·Σ_t c_t‖E_t‖² / (H·Σ_t c_t·‖Y‖²)."""
    import torch

    from ..calibrate.runner import token_rows
    from ..models import final_hidden, output_mask
    from ..progress import bar as progress_bar
    from ..quantize.apply import output_error2

    weights = [model.get_submodule(t.name).weight for t in targets]  # the parameters (the norm of ∂/∂Wᵀ is ∂/∂W's)
    if table is not None:
        weights.append(table.module.weight)
    flags = [w.requires_grad for w in weights]
    gen = torch.Generator().manual_seed(seed)
    jac = torch.zeros(len(weights), dtype=torch.float64)
    y2 = 0.0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for b in progress_bar(batches, desc="joint sensitivity (gradients)", unit="batch", progress=progress):
                Y = token_rows(final_hidden(model, b), output_mask(b))
                y2 += float(Y.detach().double().pow(2).sum())
                for k in range(probes):
                    v = torch.randn(Y.shape, generator=gen, dtype=Y.dtype)
                    grads = torch.autograd.grad((Y * v).sum(), weights, retain_graph=k < probes - 1)
                    jac += torch.stack([g.double().pow(2).sum() for g in grads[: len(targets)]]
                                       # the table's: no float64 copy of it (Gemma's would be 1.3 GB)
                                       + [torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
                                          for g in grads[len(targets):]])
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    jac /= probes
    out = []
    for t, j in zip(targets, jac[: len(targets)].tolist(), strict=True):
        G = grams[t.name].G.double()
        W = dense_weight(model.get_submodule(t.name)).detach().double()
        out.append(j * output_error2(W, G) / (t.d_out * float(G.trace()) * (y2 or 1.0)))
    if table is not None:
        out.append(float(jac[-1]) * table.energy / (table.hidden * table.tokens * (y2 or 1.0)))
    return out


@dataclass
class TableStats:
    """What the table's candidates and sensitivity need: the embedding module, how often each row is looked up on
    the calibration batches (counts: (V,) float64), Σ_t c_t‖E_t‖² (energy), the tokens and the hidden size."""

    module: object
    counts: "torch.Tensor"  # noqa: F821
    energy: float
    tokens: float
    hidden: int

    def weighed_energy(self, T) -> float:
        """Σ_t c_t‖T_t‖² of a (V, H) table T: only the rows looked up count (no float64 copy of the whole table)."""
        rows = self.counts.nonzero().flatten()
        return float(T.detach()[rows].double().square().sum(1) @ self.counts[rows])

    @classmethod
    def of(cls, model, batches: list[dict], group: int) -> "TableStats":
        import torch

        from ..quantize.embeddings import quantizable_table

        _, emb = quantizable_table(model, group)
        V, H = emb.weight.shape
        counts = torch.zeros(V, dtype=torch.float64)
        for b in batches:
            ids, mask = b["input_ids"], b.get("attention_mask")
            ids = ids[mask.bool()] if mask is not None else ids.flatten()
            counts += torch.bincount(ids.flatten(), minlength=V)[:V].double()
        table = cls(emb, counts, 0.0, float(counts.sum()), H)
        table.energy = table.weighed_energy(emb.weight)
        return table


@dataclass(frozen=True)
class TableChoice:
    """How the joint allocator stores the embedding table: `bits` None = at the storage dtype."""

    bits: int | None
    group: int

    @property
    def label(self) -> str:
        return f"table {self.bits}-bit g{self.group}" if self.bits else "table dense"


TABLE_BITS = (None, 8, 4)


def table_candidates(model, table: TableStats, batches: list[dict], e, dtype: str, sensitivity: float,
                     progress: bool = True) -> list[Candidate]:
    """The embedding table's joint candidates (storage dtype, 8 and 4 bits in groups of e.group, rounded as
    `compress --embedding-bits` rounds them), in the unit of the linears' weighted errors: the lookups' relative
    squared error (rows weighed by how often the calibration text reads them) times their `sensitivity`, plus, for
    a table tied to the LM head, the head's relative squared output error on its inputs' Gram (the logits are the
    output: weight 1, taken as comparable with the final hidden states' change the other candidates estimate)."""
    import torch

    from ..calibrate.runner import input_gram
    from ..quantize.embeddings import embed_scale, packed_table, table_errors2, tied_head

    E = table.module.weight.detach()
    V, H = E.shape
    head = tied_head(model, table.module)
    gram = input_gram(model, model.get_submodule(head), batches, "head Gram", progress) if head else None
    out = []
    for bits in TABLE_BITS:
        if bits is None:
            rows = lambda i0, i1: round_to(E[i0:i1], dtype)  # noqa: E731
        else:
            packed = packed_table(E, bits, e.group, dtype, embed_scale(table.module),
                                  gram if e.method == "gptq" else None, f"{head} (tied table)", progress)
            rows = lambda i0, i1, p=packed: p.rows(torch.arange(i0, i1))  # noqa: E731
        lookup2, head2 = table_errors2(E, rows, gram, table.counts)
        out.append(Candidate(embedding_bytes(V, H, bits, e.group, value_bytes(dtype)),
                             sensitivity * lookup2 + (head2 or 0.0), TableChoice(bits, e.group)))
    return out


def final_change(model, batches: list[dict], y0) -> float:
    """‖Y − y0‖² / ‖y0‖² of `model`'s final hidden states Y on `batches` (y0: the original's, _final_hidden):
    the unit the sensitivity-weighted candidate errors estimate."""
    return float(((_final_hidden(model, batches) - y0) ** 2).sum()) / (float((y0 * y0).sum()) or 1.0)


def pick(cands: list[list[Candidate]], budget: float, dense_lin: int) -> list[int]:
    """One candidate per layer: least Σ estimated error within `budget` bytes."""
    try:
        return mckp(cands, budget, resolution=20000)
    except ValueError:
        least = sum(min(c.bytes for c in cs) for cs in cands)
        raise CompotError(f"byte budget {budget:,.0f} for the linears is below the smallest this candidate set "
                          f"reaches: {least:,} bytes ({least / dense_lin:.3f} of dense)") from None


# ------------------------------------------------------------------------------------ profile, then build


@dataclass
class JointProfile:
    """What the joint allocator measured on a model: its targets, calibration batches, every layer's candidates
    (errors weighted by the layer's sensitivity) and the sensitivities; enough to build it at any budget."""

    targets: list[Target]
    batches: list[dict]
    candidates: list[list[Candidate]]
    weights: list[float]
    dense_linear_bytes: int
    seconds: float
    calibration: dict | None = None  # calibrate.data.check_token_count's summary
    table: list[Candidate] | None = None  # the embedding table's candidates (--embedding-bits joint)


def budget_for(model, targets: list[Target], cfg: CompressConfig) -> float:
    """The bytes the target linears may take under cfg's budget (fails before any profiling)."""
    vb = value_bytes(cfg.factorize.dtype)
    dense_model = dense_model_bytes(model, vb)
    from ..quantize.embeddings import resolve_bits

    e = cfg.embeddings
    bits = resolve_bits(model, e.bits, e.group, joint=True)
    dense_lin = linears_dense_bytes(targets, vb)
    if bits:
        V, H = model.get_input_embeddings().weight.shape
        if bits == "joint":  # the table is one more knapsack item: the budget covers it with the linears
            dense_lin += embedding_bytes(V, H, None, e.group, vb)
        else:  # the table is stored packed (compression.compress_model quantizes it after the linears)
            dense_model -= embedding_bytes(V, H, None, e.group, vb) - embedding_bytes(V, H, bits, e.group, vb)
    return linear_budget(cfg.allocation.budget, dense_lin, dense_model, stored_tensor_count(model) + bool(bits),
                         len(targets))


def profile(model, tokenizer, cfg: CompressConfig, targets: list[Target] | None = None,
            progress: bool = True) -> JointProfile:
    """Calibrate `model` and measure every joint candidate of every layer; the model is left as it was.
    targets: the linears to compress, when already found."""
    from ..calibrate.data import calibration_batches, check_token_count
    from ..calibrate.runner import calibrate

    t0 = time.perf_counter()
    a, f = cfg.allocation, cfg.factorize
    targets = targets or find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    batches = calibration_batches(tokenizer, cfg.calibration, model, progress)
    grams = calibrate(model, batches, targets, progress=progress)
    calibration = check_token_count(batches, targets, {n: g.n for n, g in grams.items()})
    cands = measure(model, targets, grams, a.joint, f, progress)
    weights = [1.0] * len(targets)
    probe = batches[: a.joint.sensitivity_batches]
    table = TableStats.of(model, probe, cfg.embeddings.group) if cfg.embeddings.bits == "joint" else None
    table_weight = 1.0
    if a.joint.sensitivity:
        measure_sensitivity = gradient_sensitivities if a.joint.sensitivity_method == "gradient" else sensitivities
        weights = measure_sensitivity(model, targets, grams, probe, seed=cfg.calibration.seed, progress=progress,
                                      table=table)
        if table is not None:
            table_weight = weights.pop()
        cands = [[c.weighted(w) for c in cs] for cs, w in zip(cands, weights)]
    prof = JointProfile(targets, batches, cands, weights, linears_dense_bytes(targets, value_bytes(f.dtype)), 0.0,
                        calibration)
    if table is not None:
        prof.table = table_candidates(model, table, batches, cfg.embeddings, f.dtype, table_weight, progress)
    prof.seconds = time.perf_counter() - t0
    return prof


def choose(prof: JointProfile, budget: float, methods: tuple[str, ...] | None = None,
           cands: list[list[Candidate]] | None = None) -> tuple[list[Candidate], Candidate | None]:
    """One candidate per layer (of `cands`, default the profile's; only of `methods`, when given) and the table's
    (when it is a candidate: else None), least Σ estimated error within `budget` bytes. The table has three
    options, so each gets its own knapsack over the layers with what it leaves of the budget (the same resolution
    as a fixed table's: a knapsack over both would discretise the table's bytes too)."""
    cands = prof.candidates if cands is None else cands
    if methods is not None:
        cands = [[c for c in cs if c.record.method in methods] for cs in cands]
    if not prof.table:
        return [cs[j] for cs, j in zip(cands, pick(cands, budget, prof.dense_linear_bytes), strict=True)], None
    best, failure = None, None
    for t in sorted(prof.table, key=lambda t: -t.bytes):  # the last failure, if any, is the smallest table's
        try:
            picks = pick(cands, budget - t.bytes, prof.dense_linear_bytes)
        except CompotError as e:
            failure = e
            continue
        chosen = [cs[j] for cs, j in zip(cands, picks, strict=True)]
        err = t.error + sum(c.error for c in chosen)
        if best is None or err < best[0]:
            best = (err, chosen, t)
    if best is None:
        raise CompotError(f"{failure} with the embedding table at its smallest") from None
    return best[1], best[2]


def estimated_error(prof: JointProfile, budget: float, cands: list[list[Candidate]] | None = None) -> float:
    """The least Σ (sensitivity-weighted) estimated error `choose` reaches within `budget` bytes (over `cands`,
    default the profile's)."""
    chosen, table = choose(prof, budget, cands=cands)
    return sum(c.error for c in chosen) + (table.error if table else 0.0)


def with_depth(model, prof: JointProfile, budget: float, cfg: CompressConfig,
               progress: bool = True) -> tuple[JointProfile, "PruneResult | None", dict]:  # noqa: F821
    """Depth as a joint candidate: whether removing cfg.prune.blocks blocks (ReplaceMe, prune/) and giving the
    whole `budget` to the layers left beats spending it on every layer. Both sides are in the unit of the weighted
    candidate errors, the final hidden states' relative squared change on the sensitivity batches: the pruned
    model's is measured (on a copy, nothing compressed), the knapsack's is its estimate, and they add (the kept
    layers' candidates and sensitivities are those measured on the unpruned model). When pruning wins, `model` is
    pruned in place (the same windows and maps: pruning is deterministic) and the returned profile holds the kept
    layers under their new names; else the profile is returned unchanged. Returns (profile, prune result or None,
    the comparison)."""
    from ..prune import prune_model

    probe = prof.batches[: cfg.allocation.joint.sensitivity_batches]
    y0 = _final_hidden(model, probe)
    trial = copy.deepcopy(model)
    tried = prune_model(trial, prof.batches, cfg.prune, progress)
    prune_error = final_change(trial, probe, y0)
    del trial
    gone = {t.name for t in tried.removed_targets}
    keep = [i for i, t in enumerate(prof.targets) if t.name not in gone]
    without = estimated_error(prof, budget)
    rest = estimated_error(prof, budget, [prof.candidates[i] for i in keep])
    depth = {"blocks": cfg.prune.blocks, "removed_blocks": list(tried.removed), "prune_error": prune_error,
             "estimated_error_without_pruning": without, "estimated_error_with_pruning": prune_error + rest,
             "pruned": prune_error + rest < without}
    if not depth["pruned"]:
        return prof, None, depth
    pruned = prune_model(model, prof.batches, cfg.prune, progress)
    renamed = find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    def shape(ts: list[Target]) -> list[tuple]:
        return [(t.d_in, t.d_out, t.name.split(".")[-1]) for t in ts]

    if shape(renamed) != shape([prof.targets[i] for i in keep]):
        raise CompotError("the pruned model's linears do not line up with the unpruned model's kept ones")
    return (JointProfile(renamed, prof.batches, [prof.candidates[i] for i in keep], [prof.weights[i] for i in keep],
                         prof.dense_linear_bytes, prof.seconds, prof.calibration, prof.table), pruned, depth)


def build(model, prof: JointProfile, budget: float, cfg: CompressConfig, progress: bool = True,
          methods: tuple[str, ...] | None = None
          ) -> tuple[dict[str, LayerRecord], dict[str, LayerStats], Candidate | None]:
    """Pick one candidate per layer within `budget` bytes (only of `methods`, when given: 'dense', 'compot',
    'svd-llm') and build the picks in `model` in place, block by block on the outputs of the compressed blocks
    before. Returns the records, their measurements (with the choice, its estimated (weighted) error and the
    layer's sensitivity under `joint`) and the table's pick (a TableChoice record; None unless it is a candidate:
    compression.compress_model stores the table so after the linears)."""
    from ..calibrate.runner import run_blocks

    chosen, table = choose(prof, budget, methods)
    picked = {t.name: c for t, c in zip(prof.targets, chosen, strict=True)}
    weights = dict(zip((t.name for t in prof.targets), prof.weights))
    round_other_params(model, {t.name for t in prof.targets}, cfg.factorize.dtype)
    records: dict[str, LayerRecord] = {}
    stats: dict[str, LayerStats] = {}

    def step(_i, block_grams):
        for name, g in block_grams.items():
            cand = picked[name]
            records[name], stats[name] = build_layer(model, name, cand.record.with_quant(None), g, cfg.factorize,
                                                     quant_config(cand.record.quant))
            stats[name].joint = {"choice": cand.record.label, "estimated_error": cand.error, "bytes": cand.bytes,
                                 "sensitivity": weights[name]}
        return True

    run_blocks(model, prof.batches, prof.targets, step, "joint build", progress)
    return records, stats, table


def families(stats: dict[str, LayerStats]) -> dict[str, int]:
    """How many layers took each choice, most frequent first."""
    counts: dict[str, int] = {}
    for s in stats.values():
        counts[s.joint["choice"]] = counts.get(s.joint["choice"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
