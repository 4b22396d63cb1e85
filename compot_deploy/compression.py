"""The compress stage: calibrate → allocate → factorize (→ quantize) one model, and the folder it writes.

`compress` (the CLI command, `build`'s first stage and the Python API) and `quantize_dir` (the quantize command)
are the two front doors; both run the per-layer builder (layers.build_layer) as steps of the one block-by-block
walk (calibrate/runner.py) and save through `save`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import CalibrationConfig, CompressConfig, EmbeddingConfig, FactorizeConfig, QuantizeConfig
from .errors import CompotError
from .layers import build_layer, factor_layer, round_other_params
from .models import Target, block_module, dense_weight, find_targets, is_causal_lm, load_model, targets_named
from .storage.artifact import REPORT, check_output_dir
from .storage.budget import (dense_model_bytes, fits, linears_dense_bytes, removed_after_pruning, removed_fraction,
                             value_bytes)
from .storage.record import LayerRecord, LayerStats, dense_record

if TYPE_CHECKING:
    from .allocate.knapsack import Candidate
    from .prune import PruneResult

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    """What compressing a model in memory produced: each target's record and measurements, stage seconds."""

    targets: list[Target]
    records: dict[str, LayerRecord]
    stats: dict[str, LayerStats]
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # the process's peak so far, after each stage
    calibration: dict | None = None  # calibrate.data.check_token_count's summary
    pruned: "PruneResult | None" = None  # the blocks the prune step removed
    embeddings: dict | None = None  # the quantized embedding table (quantize/embeddings.py), if any
    table_choice: "Candidate | None" = None  # the joint allocator's pick for the table (--embedding-bits joint)
    depth: dict | None = None  # the joint allocator's pruned-vs-unpruned comparison (allocate/joint.with_depth)
    resumed: dict | None = None  # what an earlier, killed run had finished (resume.py)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage and record the process's peak RSS at its end."""
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0
        self.peak_rss_mib[name] = peak_rss_mib()


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (MiB): VmHWM where Linux reports it (getrusage's ru_maxrss
    carries a parent's peak across fork + exec, so a process started by a big one would report the parent's);
    None where the OS reports neither (Windows)."""
    from .bench import peak_rss_bytes

    try:
        return peak_rss_bytes() / 2**20
    except ImportError:  # no `resource` module
        return None


def quantize_model(model, targets: list[Target], batches: list[dict], records: dict[str, LayerRecord],
                   stats: dict[str, LayerStats], q: QuantizeConfig, f: FactorizeConfig,
                   progress: bool = True) -> None:
    """GPTQ/RTN every target of `model` in place, block by block on the outputs of the quantized blocks before;
    records and stats are updated."""

    def step(_i, block_grams):
        for name, g in block_grams.items():
            records[name], stats[name] = build_layer(model, name, records[name], g, f, q, stats.get(name))
        return True

    from .calibrate.runner import run_blocks

    run_blocks(model, batches, targets, step, f"quantize ({q.method} {q.bits}-bit)", progress)


def compress_model(model, tokenizer, cfg: CompressConfig, progress: bool = True,
                   work: "ResumeState | None" = None) -> Compressed:  # noqa: F821
    """Prune (optionally), then compress (and optionally quantize) `model` in place by `cfg`; then, with
    --embedding-bits, quantize its token embedding table. work: where the finished parts of a ratio-allocated,
    non-sequential compression are kept and read back (resume.py)."""
    from .quantize.embeddings import resolve_bits

    e = cfg.embeddings
    bits = resolve_bits(model, e.bits, e.group, joint=cfg.allocation.strategy == "joint")  # fails before any work
    result = _compress_linears(model, tokenizer, cfg, progress, work)
    store_table(model, tokenizer, cfg, result, bits, progress)
    return result


def store_table(model, tokenizer, cfg: CompressConfig, result: Compressed, bits, progress: bool = True) -> None:
    """After the linears: quantize the token embedding table at `bits` (resolve_bits' answer; "joint": the joint
    allocator's pick in `result`), its entry into result.embeddings."""
    from .calibrate.data import calibration_batches
    from .quantize.embeddings import quantize_embeddings
    from .streaming import load_rest

    e = cfg.embeddings
    if bits == "joint":
        bits = result.table_choice.record.bits
    if bits:
        with result.stage("embeddings"):
            load_rest(model)
            batches = calibration_batches(tokenizer, cfg.calibration, model, progress) if e.method == "gptq" else None
            result.embeddings = quantize_embeddings(model, bits, e.group, cfg.factorize.dtype, e.method, batches,
                                                    progress)


def _compress_linears(model, tokenizer, cfg: CompressConfig, progress: bool,
                      work: "ResumeState | None" = None) -> Compressed:  # noqa: F821
    from .allocate import joint
    from .allocate.ratio import allocate_profiles
    from .calibrate.data import calibration_batches
    from .calibrate.runner import GramStore

    result = Compressed([], {}, {})
    batches = None
    if cfg.prune.blocks and cfg.allocation.strategy != "joint":  # joint: depth is one of its candidates
        from .prune import prune_model

        with result.stage("prune"):
            batches = calibration_batches(tokenizer, cfg.calibration, model, progress)
            result.pruned = prune_model(model, batches, cfg.prune, progress)
    targets = result.targets = find_targets(model, list(cfg.include) or None, list(cfg.exclude) or None)
    if cfg.allocation.strategy == "joint":
        budget = joint.budget_for(model, targets, cfg)  # fails before the profiling
        with result.stage("allocate"):  # calibration and every candidate's measurement
            prof = joint.profile(model, tokenizer, cfg, targets, progress)
        return build_joint(model, prof, budget, cfg, progress, result=result)
    if result.pruned is not None:
        dtype = cfg.factorize.dtype
        cfg = _budget_after_pruning(cfg, targets, result.pruned)
        if cfg is None:  # pruning alone met the budget: the other linears stay dense
            result.records = {t.name: dense_record(t.d_in, t.d_out, t.bias, dtype) for t in targets}
            round_other_params(model, set(), dtype)
            return result

    with contextlib.ExitStack() as scope:
        grams = GramStore(work.grams_folder if work is not None else
                          scope.enter_context(tempfile.TemporaryDirectory(prefix="compot-grams-")))
        done = work.allocation() if work is not None else None
        if done is not None:  # a resumed job: its Grams are on disk, its budget split
            result.records, result.calibration, grams.files, timings = done
            result.timings.update(timings)
            result.resumed = {"allocation": True, "blocks": []}
            log.warning("resuming the compression in %s: calibration and allocation are done", work.folder)
            if cfg.quantize is not None:
                batches = batches or calibration_batches(tokenizer, cfg.calibration, model, progress)
        else:
            with result.stage("calibrate"):
                batches = batches or calibration_batches(tokenizer, cfg.calibration, model, progress)
                profiles = _calibrate_and_profile(model, batches, targets, cfg, grams, result, progress)
            with result.stage("allocate"):
                result.records = allocate_profiles(targets, profiles, cfg, is_causal_lm(model))
            profiled = result.timings.pop("profiles")  # computed during the walk, counted as allocation
            result.timings["calibrate"] -= profiled
            result.timings["allocate"] += profiled
            if work is not None:
                work.save_allocation(result.records, result.calibration, grams.files,
                                     {k: result.timings[k] for k in ("calibrate", "allocate")})
        _factorize(model, batches, targets, result.records, grams, cfg, result, progress, work)
    if cfg.quantize is not None:
        with result.stage("quantize"):
            quantize_model(model, targets, batches, result.records, result.stats, cfg.quantize, cfg.factorize, progress)
    return result


def _calibrate_and_profile(model, batches: list[dict], targets: list[Target], cfg: CompressConfig,
                           grams: "GramStore", result: Compressed, progress: bool) -> list | None:  # noqa: F821
    """One walk over the unchanged model: as soon as each block's Grams exist, their damped Cholesky factors L
    (G + λI = L Lᵀ) are computed and go to `grams` (on disk; the factorization needs nothing else of them), and
    the block's allocation profiles (their seconds counted as result.timings["profiles"]). Returns the profiles
    in target order (None for an allocation that needs none)."""
    from .allocate.ratio import layer_profile, needs_profiles
    from .calibrate.data import check_token_count
    from .calibrate.runner import Gram, run_blocks
    from .factorize import damped_cholesky

    by_name = {t.name: t for t in targets}
    decoder, profiles, profile, counts = is_causal_lm(model), {}, needs_profiles(cfg), {}
    result.timings["profiles"] = 0.0

    def keep(_i, block_grams):
        t0 = time.perf_counter()
        factors = {}  # one damped Cholesky factor per Gram (q/k/v share one), damping it in place: G is done with
        for name, g in block_grams.items():
            counts[name] = g.n
            if id(g) not in factors:
                factors[id(g)] = Gram(G=damped_cholesky(g.G, cfg.factorize.eps, name, inplace=True), n=g.n)
                g.G = None
            if profile:
                W = dense_weight(model.get_submodule(name))
                profiles[name] = layer_profile(by_name[name], W, None, cfg, decoder, factors[id(g)].G)
        if not cfg.calibration.sequential:  # the factorization reads the factors (a sequential one walks again)
            grams.put({name: factors[id(g)] for name, g in block_grams.items()})
        result.timings["profiles"] += time.perf_counter() - t0
        return False

    run_blocks(model, batches, targets, keep, f"calibrate + {cfg.allocation.strategy} profiles" if profile
               else "calibrate", progress)
    result.calibration = check_token_count(batches, targets, counts)
    return [profiles[t.name] for t in targets] if profile else None


def _factorize(model, batches: list[dict], targets: list[Target], records: dict[str, LayerRecord],
               grams: "GramStore", cfg: CompressConfig, result: Compressed, progress: bool,  # noqa: F821
               work: "ResumeState | None" = None) -> None:  # noqa: F821
    """Store each target as its record: on the Cholesky factors of the walk before's Grams (`grams`; one layer
    at a time, each block read into memory while its layers are factored; with `work`, each finished block
    saved there, and blocks saved by an earlier run read back), or, with --sequential, on Grams of a new walk
    through the blocks compressed so far."""
    from .calibrate.runner import run_blocks
    from .progress import bar
    from .streaming import resident

    f, stats = cfg.factorize, result.stats
    with result.stage("factorize"):
        if cfg.calibration.sequential:
            def step(_i, block_grams):
                for name, g in block_grams.items():
                    stats[name] = factor_layer(model, name, records[name], g, f)
                return True

            run_blocks(model, batches, targets, step, f"factorize ({f.method}, sequential)", progress)
        else:
            with bar(total=len(targets), desc=f"factorize ({f.method})", unit="layer", progress=progress) as b:
                for i in sorted({t.block for t in targets}):
                    names = [t.name for t in targets if t.block == i]
                    if work is not None and work.has_block(i):
                        work.restore_block(model, i, names, records, stats)
                        result.resumed = result.resumed or {"allocation": False, "blocks": []}
                        result.resumed["blocks"].append(i)
                        b.update(len(names))
                        continue
                    with resident(model, *reversed(block_module(model, i))):
                        factors = {}  # the damped Cholesky factors the walk stored, read once (q/k/v share one)
                        for name in names:  # independent of each other
                            if grams.key(name) not in factors:
                                factors[grams.key(name)] = grams.get(name).G
                            stats[name] = factor_layer(model, name, records[name], None, f, factors[grams.key(name)])
                            b.update()
                        del factors
                        if work is not None:  # on disk as it will be saved, out of memory
                            work.save_block(model, i, names, stats, f.dtype)
        round_other_params(model, {n for n, r in records.items() if r.factored}, f.dtype)


def build_joint(model, prof: "JointProfile", budget: float, cfg: CompressConfig, progress: bool = True,  # noqa: F821
                methods: tuple[str, ...] | None = None, result: Compressed | None = None) -> Compressed:
    """Build `model` in place from its joint profile within `budget` bytes of the linears: with cfg.prune.blocks,
    depth first (joint.with_depth; the budget stays the unpruned model's, so removed blocks free their bytes), then
    one candidate per layer (joint.build, only of `methods` when given). Stages are timed into `result`."""
    from .allocate import joint

    result = result or Compressed(prof.targets, {}, {})
    if cfg.prune.blocks:
        with result.stage("prune"):
            prof, result.pruned, result.depth = joint.with_depth(model, prof, budget, cfg, progress)
    result.targets, result.calibration = prof.targets, prof.calibration
    with result.stage("factorize"):
        result.records, result.stats, result.table_choice = joint.build(model, prof, budget, cfg, progress, methods)
    return result


def _budget_after_pruning(cfg: CompressConfig, targets: list[Target], pruned) -> CompressConfig | None:
    """cfg with the fraction removed from the kept linears that makes the original's linears lose `--ratio` in
    all, the pruned blocks' linears counted as removed; None when pruning alone removed that much (or within 1 %)."""
    vb = value_bytes(cfg.factorize.dtype)
    kept = linears_dense_bytes(targets, vb)
    r = removed_after_pruning(cfg.allocation.budget.removed, kept + linears_dense_bytes(pruned.removed_targets, vb),
                              kept)
    if r < 0.01:
        return None
    alloc = cfg.allocation.model_copy(update={"budget": cfg.allocation.budget.model_copy(update={"removed": r})})
    return cfg.model_copy(update={"allocation": alloc})


def compress(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: CompressConfig, overwrite: bool = False,
             progress: bool = True, stream: bool = True) -> dict:
    """Load `model_dir`, compress it by `cfg`, write the compact model to `out` atomically; return the report.
    stream: the ratio allocators read the blocks from the checkpoint one at a time (streaming.py) where the
    model allows; False loads it whole first (same files, more memory)."""
    t_start = time.perf_counter()
    check_output_dir(out, overwrite, [model_dir])  # fail before the slow stages
    # the ratio allocators walk block by block: the blocks stay in the checkpoint until the walk reads them, and
    # what is finished is kept beside OUT for a run that resumes a killed one
    ratio = cfg.allocation.strategy != "joint" and not cfg.prune.blocks
    model, tokenizer = load_model(model_dir, lazy=stream and ratio)
    loaded, load_peak = time.perf_counter() - t_start, peak_rss_mib()
    work = None
    if ratio and not cfg.calibration.sequential:
        from .gguf import resolve_model_dir
        from .resume import ResumeState, checkpoint_identity, resume_folder
        from .version import __version__

        src = resolve_model_dir(model_dir)
        work = ResumeState(resume_folder(out), {"config": cfg.model_dump(mode="json"), "model": str(src.resolve()),
                                                "files": checkpoint_identity(src), "version": __version__})
    dense_model = dense_model_bytes(model, value_bytes(cfg.factorize.dtype))
    try:
        result = compress_model(model, tokenizer, cfg, progress, work)
        result.timings = {"load": loaded, **result.timings}
        result.peak_rss_mib = {"load": load_peak, **result.peak_rss_mib}
        rep = save(model, tokenizer, out, result, cfg.model_dump(mode="json"), cfg.factorize.dtype, dense_model,
                   model_dir, str(model_dir), t_start, overwrite, keep_model=False, work=work,
                   max_shard_bytes=cfg.max_shard_bytes)
    except CompotError:  # bad input: nothing half-written stays
        if work is not None:
            work.remove()
        raise
    if work is not None:
        work.remove()
    return rep


def quantize_dir(model_dir: str | os.PathLike, out: str | os.PathLike, q: QuantizeConfig,
                 calib: CalibrationConfig | None = None, dtype: str | None = None, overwrite: bool = False,
                 progress: bool = True, embeddings: EmbeddingConfig | None = None) -> dict:
    """GPTQ/RTN a folder written by `compress` (its factors) or a plain HF model (its block linears: the dense
    baseline) into `out`; with `embeddings.bits`, its token embedding table too."""
    from .calibrate.data import calibration_batches
    from .models import load_tokenizer, read_hf_config
    from .storage.artifact import layer_records
    from .storage.artifact import load as load_compressed

    t_start = time.perf_counter()
    check_output_dir(out, overwrite, [model_dir])  # fail before the slow stages
    section = read_hf_config(model_dir).get("compot")
    if section:
        records = layer_records(section)
        if any(r.quant is not None for r in records.values()):
            raise CompotError(f"{model_dir} is already quantized")
        model, tokenizer = load_compressed(model_dir), load_tokenizer(model_dir)
        dtype = dtype or section["storage_dtype"]
        targets = targets_named(model, records)
        stats = _earlier_stats(Path(model_dir))
        dense_model = section.get("dense_model_bytes", 0)
        config = {**section.get("config", {}), "quantize": q.model_dump(mode="json")}
        source = section.get("source_model", str(model_dir))
        packed_table = section.get("embeddings")
    else:
        model, tokenizer = load_model(model_dir)
        dtype = dtype or "float16"
        dense_model = dense_model_bytes(model, value_bytes(dtype))
        targets = find_targets(model)
        records = {t.name: dense_record(t.d_in, t.d_out, t.bias, dtype) for t in targets}
        stats = {}
        round_other_params(model, {t.name for t in targets}, dtype)
        config = {"quantize": q.model_dump(mode="json")}
        source = str(model_dir)
        packed_table = None
    result = Compressed(targets, records, stats, embeddings=packed_table)
    from .quantize.embeddings import quantize_embeddings, resolve_bits

    e = embeddings or EmbeddingConfig()
    bits = resolve_bits(model, e.bits, e.group)  # fails before any work
    with result.stage("quantize"):
        batches = calibration_batches(tokenizer, calib or CalibrationConfig(), model, progress)
        quantize_model(model, targets, batches, records, stats, q, FactorizeConfig(dtype=dtype), progress)
    if bits:
        with result.stage("embeddings"):
            result.embeddings = quantize_embeddings(model, bits, e.group, dtype, e.method, batches, progress)
    return save(model, tokenizer, out, result, config, dtype, dense_model, model_dir, source, t_start, overwrite,
                keep_model=False)


def _earlier_stats(folder: Path) -> dict[str, LayerStats]:
    """The factorization measurements a compressed folder's report holds (none when it has no report)."""
    path = folder / REPORT
    if not path.is_file():
        return {}
    layers = json.loads(path.read_text()).get("layers", [])
    return {x["name"]: LayerStats(rel_error=x.get("rel_error"), seconds=x.get("seconds", 0.0)) for x in layers}


def save(model, tokenizer, out, result: Compressed, config: dict, dtype: str, dense_model: int, model_dir,
         source: str, t_start: float, overwrite: bool, keep_model: bool = True, work=None,
         max_shard_bytes: int = 5 * 10**9) -> dict:
    """Write the compressed folder atomically and return its report. model_dir: the input folder; source: the
    original (uncompressed) model directory. keep_model=False: the model is not used after, so its parameters are
    cast to the storage dtype in place (no second copy while writing). work: the ResumeState whose finished
    blocks are copied from their files (those still as they were saved)."""
    from .storage.artifact import FORMAT_VERSION, atomic_dir, save_compressed, write_json_atomic
    from .streaming import detached, load_rest
    from .version import __version__

    names = [t.name for t in result.targets]
    section = {
        "format_version": FORMAT_VERSION,
        "producer": f"compot-deploy {__version__}",
        "storage_dtype": dtype,
        "dense_model_bytes": dense_model,
        "source_model": str(Path(source).resolve()),
        "config": config,
        "layers": {n: result.records[n].to_json() for n in names},
    }
    if result.embeddings:
        section["embeddings"] = result.embeddings
    with atomic_dir(out, overwrite) as tmp:
        with result.stage("save"):
            with detached(model, work.finished(model) if work is not None else {}) as blocks:
                load_rest(model, dtype)  # what a lazily loaded model left in its checkpoint, read as stored
                save_compressed(model, tokenizer, tmp, section, dtype, keep_model, blocks, max_shard_bytes)
        rep = report(model_dir, tmp, section, result)
        rep["seconds"] = time.perf_counter() - t_start
        write_json_atomic(tmp / REPORT, rep)
    return rep


def report(model_dir, folder: Path, section: dict, result: Compressed) -> dict:
    """The compression report of the folder written: each layer's spec, planned and file bytes and
    measurements; totals; timings."""
    from .allocate.joint import families
    from .config import AllocationConfig
    from .storage.artifact import layer_file_bytes
    from .storage.shards import weights_bytes

    names = [t.name for t in result.targets]
    file_bytes = layer_file_bytes(folder, names)
    layers = []
    for name in names:
        rec, st = result.records[name], result.stats.get(name, LayerStats())
        layers.append({"name": name, **rec.to_json(), "planned_bytes": rec.bytes, "file_bytes": file_bytes[name],
                       "ratio": removed_fraction(file_bytes[name], rec.dense_bytes),
                       "paper_ratio": removed_fraction(rec.paper_params, rec.d_in * rec.d_out), **st.to_json()})
    dense_lin = sum(x["dense_bytes"] for x in layers)
    planned = sum(x["planned_bytes"] for x in layers)
    stored = sum(x["file_bytes"] for x in layers)
    paper_kept = sum(result.records[n].paper_params for n in names)
    paper_dense = sum(t.d_in * t.d_out for t in result.targets)
    model_file = weights_bytes(folder)
    dense_model = section["dense_model_bytes"]
    extra = {}
    if result.pruned is not None:  # the removed blocks' linears count as removed bytes of the original's
        vb = value_bytes(section["storage_dtype"])
        gone = linears_dense_bytes(result.pruned.removed_targets, vb)
        dense_lin += gone
        paper_dense += sum(t.d_in * t.d_out for t in result.pruned.removed_targets)
        extra["prune"] = {**result.pruned.to_json(), "removed_linear_bytes": gone,
                          "removed_other_bytes": result.pruned.removed_other_params * vb}
    if any(s.joint for s in result.stats.values()):
        budget = AllocationConfig.model_validate(section["config"]["allocation"]).budget
        extra["joint"] = {"budget": budget.model_dump(), "budget_text": budget.describe,
                          "fits": fits(budget, stored, dense_lin, model_file),
                          "estimated_error": sum(s.joint["estimated_error"] for s in result.stats.values())
                          + (result.table_choice.error if result.table_choice else 0.0),
                          "choices": families(result.stats),
                          **({"depth": result.depth} if result.depth else {})}
        if result.table_choice is not None:
            c = result.table_choice
            extra["joint"]["table"] = {"choice": c.record.label, "estimated_error": c.error, "bytes": c.bytes}
    return {
        "model_dir": str(model_dir),
        "linears": {
            "count": len(layers),
            "dense_bytes": dense_lin,
            "planned_bytes": planned,
            "file_bytes": stored,
            "planned_ratio": removed_fraction(planned, dense_lin),
            "file_ratio": removed_fraction(stored, dense_lin),
            # the papers' count (values only: no positions, scales or bits), for reading published tables
            "paper_ratio": removed_fraction(paper_kept, paper_dense),
        },
        "model_file": {"bytes": model_file, "dense_bytes": dense_model, "ratio": removed_fraction(model_file, dense_model)},
        "timings": result.timings,
        "peak_rss_mib": result.peak_rss_mib,
        "calibration": result.calibration,
        **({"resumed": result.resumed} if result.resumed else {}),
        **extra,
        **({"embeddings": section["embeddings"]} if section.get("embeddings") else {}),
        "layers": layers,
    }

