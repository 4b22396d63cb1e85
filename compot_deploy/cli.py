"""`compot-deploy` command line. Imports stay light here; stages import torch/transformers when they run."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .errors import CheckFailed, CompotError


GATE_FAILED_EXIT = 3


def _fail_cleanly(fn):
    """Bad input → one `error: …` line on stderr and exit code 2; nothing half-written (stages write atomically).
    A failed check (parity gate, package verification) → exit code 3 (the artifact stays, marked invalid)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckFailed as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(GATE_FAILED_EXIT)
        except CompotError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compot-deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log every stage's details (damping steps, timings).")
def main(verbose: bool) -> None:
    """Compress Hugging Face transformers with COMPOT (orthogonal dictionary + sparse codes) under byte budgets.

    Everything runs offline on local model directories.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("compot_deploy").setLevel(logging.INFO if verbose else logging.WARNING)


def _apply(fn, opts):
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def output_options(fn):
    return _apply(fn, [
        click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (must be empty or new)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars and no closing table."),
    ])


def calibration_options(fn):
    return _apply(fn, [
        click.option("--calib", "calib", default=None,
                     help="Calibration text: a .txt/.jsonl file, a folder of .txt, or a `datasets` folder saved with "
                          "save_to_disk. Default: the built-in English corpus."),
        click.option("--samples", type=int, default=None,
                     help="Calibration samples [default: 128 documents for encoders, 32 packed chunks for decoders]."),
        click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per calibration sample."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration batch size."),
        click.option("--packing/--no-packing", default=None,
                     help="Pack documents into full-length chunks, or one document per sample (padding excluded) "
                          "[default: packing for decoders, documents for encoders]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and K-SVD."),
        click.option("--dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default=None,
                     help="Storage dtype of saved floating tensors; budgets count these bytes [default: float16, or "
                          "the compressed model's own]."),
    ])


def compress_options(fn):
    return _apply(fn, [
        click.argument("model_dir", required=False, type=click.Path(file_okay=False)),
        click.option("--ratio", type=float, default=0.3, show_default=True,
                     help="Fraction of the target linears' stored bytes to remove, in (0, 1)."),
        click.option("--target-ratio", type=float, default=None,
                     help="Byte budget for the joint allocator: the target linears may keep this fraction of their "
                          "dense bytes at the storage dtype (0.2 = a fifth of float16). Each layer then gets the "
                          "best of dense GPTQ 2/3/4/8-bit, COMPOT and SVD-LLM factors (float16 or GPTQ) that fits."),
        click.option("--target-bytes", default=None,
                     help="Byte budget for the joint allocator as the size of the whole weights file, e.g. 26MB, "
                          "25MiB or 26000000 (the weights outside the linears count at the storage dtype)."),
        click.option("--method", type=click.Choice(["compot", "svd-llm", "cospadi"]), default=None,
                     help="Factorization: COMPOT, the SVD-LLM baseline, or CoSpaDi (K-SVD + OMP) [default: compot]. "
                          "With a --target-*: only this family's candidates (compot or svd-llm), in every layer."),
        click.option("--allocation", type=click.Choice(["uniform", "dynamic", "mckp"]), default="dynamic",
                     show_default=True,
                     help="How the --ratio budget is split across layers: the same ratio everywhere, COMPOT's "
                          "one-shot spectral split, or a knapsack over measured per-layer error profiles (a "
                          "--target-* uses the joint allocator instead)."),
        click.option("--sequential", is_flag=True,
                     help="Calibrate block i on the outputs of the already-compressed blocks before it."),
        click.option("--k-over-s", type=float, default=2.0, show_default=True,
                     help="Dictionary atoms per non-zero code of a column (COMPOT, CoSpaDi)."),
        click.option("--iters", type=int, default=8, show_default=True, help="COMPOT alternations per layer."),
        click.option("--include", multiple=True, help="Only compress linears whose name matches this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Never compress linears whose name matches this glob (repeatable)."),
        click.option("--min-layer-ratio", type=float, default=0.0, show_default=True,
                     help="Smallest per-layer ratio the dynamic/mckp allocators may choose."),
        click.option("--max-layer-ratio", type=float, default=None,
                     help="Largest per-layer ratio the dynamic/mckp allocators may choose [default: ratio + 0.1]."),
        click.option("--gptq-bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
                     help="Quantize the factors after compression with GPTQ at this many bits [default: no]."),
        click.option("--gptq-group", type=int, default=128, show_default=True,
                     help="Rows per quantization group of the dictionaries (code values use one grid per column)."),
        click.option("--gptq-sym", is_flag=True, help="Symmetric quantization grid (no stored zero points)."),
        click.option("--gptq-act-order", is_flag=True, help="GPTQ in decreasing Hessian-diagonal order."),
        click.option("--quant-method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
                     help="GPTQ, or plain round-to-nearest for comparison."),
    ])


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: str) -> int:
    """A byte count: an integer, optionally with a unit (kB, MB, GB: powers of 1000; KiB, MiB, GiB: of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m and _BYTE_UNITS.get(m.group(2).lower())
    if not unit:
        raise CompotError(f"--target-bytes: {value!r} is not a byte size (e.g. 26000000, 26MB, 25MiB)")
    return int(float(m.group(1)) * unit)


def _joint_settings(o: dict, method_given: bool) -> dict:
    """Allocation settings a --target-ratio / --target-bytes implies (empty without one)."""
    if o.get("target_ratio") is None and o.get("target_bytes") is None:
        return {}
    tb = o.get("target_bytes")
    out = {"strategy": "joint", "target_ratio": o.get("target_ratio"), "target_bytes": None if tb is None else
           parse_bytes(tb)}
    if method_given:
        if o["method"] == "cospadi":
            raise CompotError("--method cospadi cannot take a byte target: its K-SVD is too slow to measure at every "
                              "candidate size; use --method compot or svd-llm")
        out["joint"] = {"methods": [o["method"]]}
    return out


def _quant_config(bits, group, sym, act_order, method):
    from .config import QuantizeConfig, build_config

    return build_config(QuantizeConfig, bits=int(bits), group=group, sym=sym, act_order=act_order, method=method)


def _calib_config(o: dict):
    from .config import CalibrationConfig, build_config

    return build_config(CalibrationConfig, source=o["calib"], samples=o["samples"], seq_len=o["seq_len"],
                        batch_size=o["batch_size"], packing=o["packing"], sequential=o.get("sequential", False),
                        seed=o["seed"])


def _config_from_options(o: dict):
    from .config import AllocationConfig, CompressConfig, FactorizeConfig, build_config

    quant = None
    if o["gptq_bits"]:
        quant = _quant_config(o["gptq_bits"], o["gptq_group"], o["gptq_sym"], o["gptq_act_order"], o["quant_method"])
    return build_config(
        CompressConfig,
        calibration=_calib_config(o),
        allocation=build_config(AllocationConfig, **{
            "strategy": o["allocation"], "ratio": o["ratio"], "min_layer_ratio": o["min_layer_ratio"],
            "max_layer_ratio": o["max_layer_ratio"], **_joint_settings(o, o["method"] is not None)}),
        factorize=build_config(FactorizeConfig, method=o["method"] or "compot", k_over_s=o["k_over_s"], iters=o["iters"],
                               dtype=o["dtype"] or "float16", seed=o["seed"]),
        quantize=quant,
        include=tuple(o["include"]),
        exclude=tuple(o["exclude"]),
    )


def _print_report(report: dict) -> None:
    rows = [("layer", "method", "shape", "ratio", "rel.err", "sec")]
    for lay in report["layers"]:
        shape = {"svd-llm": f"r={lay['r']}", "dense": "-"}.get(lay["method"], f"k={lay['k']} s={lay['s']}")
        q = lay.get("quant")
        method = lay["method"] + (f"+{q['method']}{q['bits']}" if q else "")
        err = q["rel_error"] if q and "rel_error" not in lay else lay["rel_error"]
        sec = lay.get("seconds", 0.0) + (q["seconds"] if q else 0.0)
        rows.append((lay["name"], method, shape, f"{lay['ratio']:.3f}", f"{err:.4f}", f"{sec:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))
    lin, mf = report["linears"], report["model_file"]
    click.echo(f"\ncompressed linears: {lin['file_bytes']:,} of {lin['dense_bytes']:,} dense bytes "
               f"-> ratio {lin['file_ratio']:.4f} (planned {lin['planned_ratio']:.4f}), read from the saved file")
    click.echo(f"model file: {mf['bytes']:,} bytes vs {mf['dense_bytes']:,} dense at the same dtype "
               f"-> ratio {mf['ratio']:.4f}; total {report['seconds']:.1f}s")
    if report.get("joint"):
        j = report["joint"]
        target = (f"{j['target_bytes']:,} bytes for the file" if j.get("target_bytes")
                  else f"{j['target_ratio']} of the linears' dense bytes")
        click.echo(f"joint allocation within {target} ({'fits' if j['fits'] else 'DOES NOT FIT'}), per layer: "
                   f"{_choices_line(j)}")


@main.command()
@compress_options
@calibration_options
@output_options
@_fail_cleanly
def compress(model_dir, out, quiet, overwrite, **opts) -> None:
    """Compress MODEL_DIR (a local Hugging Face model folder; default: the packaged all-MiniLM-L6-v2) into OUT.

    OUT holds config.json (the HF config plus a `compot` section), model.safetensors with the compact factors,
    the tokenizer files and compression_report.json. Load it back with `compot_deploy.load(OUT)`.
    """
    from .models import default_model_dir
    from .pipeline import compress as run

    cfg = _config_from_options(opts)
    report = run(model_dir or default_model_dir(), out, cfg, overwrite=overwrite, progress=not quiet)
    if not quiet:
        _print_report(report)
    click.echo(f"saved {out}")


# build option → where it lives in BuildConfig (applied only when given on the command line)
_BUILD_PATHS = {
    "model_dir": "model", "target": "target", "ratio": "compress.allocation.ratio",
    "allocation": "compress.allocation.strategy", "min_layer_ratio": "compress.allocation.min_layer_ratio",
    "max_layer_ratio": "compress.allocation.max_layer_ratio", "method": "compress.factorize.method",
    "k_over_s": "compress.factorize.k_over_s", "iters": "compress.factorize.iters", "dtype": "compress.factorize.dtype",
    "include": "compress.include", "exclude": "compress.exclude", "calib": "compress.calibration.source",
    "samples": "compress.calibration.samples", "seq_len": "compress.calibration.seq_len",
    "batch_size": "compress.calibration.batch_size", "packing": "compress.calibration.packing",
    "sequential": "compress.calibration.sequential", "seed": "compress.calibration.seed",
    "gptq_bits": "compress.quantize.bits", "gptq_group": "compress.quantize.group", "gptq_sym": "compress.quantize.sym",
    "gptq_act_order": "compress.quantize.act_order", "quant_method": "compress.quantize.method",
    "sparse_body": "export.sparse_body", "opset": "export.opset",
    "target_ratio": "compress.allocation.target_ratio", "target_bytes": "compress.allocation.target_bytes",
}


def _set_path(d: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[leaf] = value


def _build_config(ctx, opts: dict):
    from click.core import ParameterSource

    from .config import BuildConfig, build_config, load_config_file

    data = load_config_file(opts["config"]) if opts["config"] else {}
    for name, path in _BUILD_PATHS.items():
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        value = opts[name]
        if name == "gptq_bits":
            value = int(value)
        elif name in ("include", "exclude"):
            value = list(value)
        _set_path(data, path, value)
        if name == "seed":
            _set_path(data, "compress.factorize.seed", value)
    given = {n for n in opts if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
    for key, value in _joint_settings({n: opts[n] if n in given else None for n in ("target_ratio", "target_bytes")}
                                      | {"method": opts["method"]}, "method" in given).items():
        _set_path(data, f"compress.allocation.{key}", value)
    if ctx.get_parameter_source("no_bench") == ParameterSource.COMMANDLINE:
        _set_path(data, "bench.enabled", not opts["no_bench"])
    q = (data.get("compress") or {}).get("quantize")
    if isinstance(q, dict) and "bits" not in q:
        raise CompotError("--gptq-group/--gptq-sym/--gptq-act-order/--quant-method need --gptq-bits")
    return build_config(BuildConfig, **data)


def _task_line(task: dict | None) -> str | None:
    """The task-level change against the original model, as one line (None when it was not measured)."""
    task = task or {}
    if "mean_cosine" in task:
        return f"embedding cosine {task['mean_cosine']:.4f} (min {task['min_cosine']:.4f})"
    if "next_token_agreement" in task:
        return (f"next-token agreement {task['next_token_agreement']:.4f}, perplexity {task['perplexity']:.2f} "
                f"(original {task['perplexity_original']:.2f})")
    return None


def _choices_line(joint: dict) -> str:
    return ", ".join(f"{n}× {c}" for c, n in joint["choices"].items())


def _print_build_summary(s: dict) -> None:
    click.echo(f"byte ratio of the compressed linears: {s['byte_ratio']:.4f} (model file {s['model_file_ratio']:.4f})")
    if s.get("joint"):
        click.echo(f"joint allocation, per layer: {_choices_line(s['joint'])}")
    if _task_line(s.get("task")):
        click.echo(f"quality vs original: {_task_line(s.get('task'))}")
    click.echo(f"ORT vs PyTorch: max abs {s['ort_vs_pytorch_max_abs']:.2e} (gate passed)")
    for r in s.get("latency", []):
        click.echo(f"ORT latency {r['batch']}x{r['seq']}: {r['compressed_ms']:.2f} ms vs dense {r['dense_ms']:.2f} ms "
                   f"({r['ratio']:.2f}x); peak RSS {r['compressed_rss_mib']:.0f} vs {r['dense_rss_mib']:.0f} MiB")
    if s["reused"]:
        click.echo(f"reused stages: {', '.join(s['reused'])}")


@main.command()
@compress_options
@calibration_options
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON build config (see --save-config); options given here override it.")
@click.option("--save-config", type=click.Path(dir_okay=False), default=None,
              help="Write the fully resolved config to this YAML file (the same file reproduces the build).")
@click.option("--target", type=click.Choice(["cpu", "cuda", "mobile"]), default="cpu", show_default=True,
              help="cpu/cuda: execution provider of the gate and benchmark; mobile: cpu plus model.ort and its "
                   "required-operators config for ORT Mobile.")
@click.option("--sparse-body", type=click.Choice(["folded", "dense", "gather"]), default="folded", show_default=True,
              help="Body of ai.compot::SparseCodesMatMul in the exported model (see `export --help`).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the exported model (18-20).")
@click.option("--no-bench", is_flag=True, help="Skip the latency comparison against the original in ONNX Runtime.")
@click.option("--force", is_flag=True, help="Rerun every stage even when its cached output exists.")
@output_options
@click.pass_context
@_fail_cleanly
def build(ctx, out, quiet, overwrite, force, save_config, **opts) -> None:
    """Build a verified edge package from MODEL_DIR (default: the packaged all-MiniLM-L6-v2) into OUT.

    Stages: compress (calibrate → allocate → factorize) → quantize (with --gptq-bits) → export → validate (the
    parity gate) → bench (ORT, against the original) → package. Each stage's output is cached in OUT/.cache under a
    hash of its config, inputs and tool versions: a rerun (also after a crash or kill) reuses finished stages and
    says so. OUT/package holds model.onnx, tokenizer, config, reports, loader.py, README.md and manifest.json
    (sha256 of every file); OUT/package.tar.gz is the same folder; OUT/reports the benchmark; OUT/build.log.jsonl
    every event. Check a package with `compot-deploy verify OUT/package`.
    """
    from pathlib import Path

    import yaml

    from .build import LOG, Build

    cfg = _build_config(ctx, opts)
    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise CompotError(f"output path exists and is not a directory: {outp}")
    if outp.is_dir() and any(outp.iterdir()) and not (outp / LOG).exists() and not overwrite:
        raise CompotError(f"output directory {outp} is not empty and holds no earlier build (use --overwrite)")
    if save_config:
        Path(save_config).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary = Build(cfg, outp, force=force, echo=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True))).run()
    if not quiet:
        _print_build_summary(summary)
    click.echo(f"built {summary['package']}")


@main.command()
@click.argument("package", type=click.Path(file_okay=False))
@_fail_cleanly
def verify(package) -> None:
    """Check every file of PACKAGE against its manifest.json (sha256, size, nothing extra), then run one inference
    and compare it with the stored sample. Exit 3 on any mismatch."""
    from .build import verify as run

    res = run(package)
    click.echo(f"verified {package}: {res['files']} files, inference {json.dumps(res['inference'])}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True, help="Bits per weight.")
@click.option("--group", type=int, default=128, show_default=True,
              help="Rows (input dims) per quantization group; code values use one grid per column.")
@click.option("--sym", is_flag=True, help="Symmetric grid (no stored zero points).")
@click.option("--act-order", is_flag=True, help="GPTQ in decreasing Hessian-diagonal order (static groups).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="GPTQ, or plain round-to-nearest for comparison.")
@calibration_options
@output_options
@_fail_cleanly
def quantize(model_dir, out, quiet, overwrite, bits, group, sym, act_order, method, **opts) -> None:
    """Quantize MODEL_DIR into OUT with GPTQ, block by block on calibration text.

    MODEL_DIR written by `compress`: its COMPOT dictionaries (H ∝ XᵀX) and code values (per-column sub-Hessians of
    ÂᵀXᵀXÂ, sparsity unchanged), and the layers it kept dense. A plain Hugging Face folder: the linears of its
    blocks (the dense GPTQ baseline). Packed 4/8-bit storage; scales and zeros count in the byte ratio.
    """
    from .pipeline import quantize_dir

    q = _quant_config(bits, group, sym, act_order, method)
    report = quantize_dir(model_dir, out, q, _calib_config(opts), opts["dtype"], overwrite=overwrite,
                          progress=not quiet)
    if not quiet:
        _print_report(report)
    click.echo(f"saved {out}")


def gate_options(fn):
    return _apply(fn, [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="ONNX Runtime execution provider the gate runs on (cuda needs onnxruntime-gpu)."),
        click.option("--max-abs", type=float, default=1e-3, show_default=True,
                     help="Largest |ORT - PyTorch| allowed on any output element."),
        click.option("--min-cosine", type=float, default=0.99999, show_default=True,
                     help="Smallest cosine between ORT and PyTorch outputs, all cases together."),
        click.option("--decode-steps", type=int, default=8, show_default=True,
                     help="Decoders: greedy decode calls through the KV cache after the prefill; tokens must match."),
        click.option("--eval-texts", type=int, default=64, show_default=True,
                     help="Held-out texts for the task-level comparison with the original model (0 = skip)."),
    ])


def _validate_config(o: dict):
    from .config import ValidateConfig, build_config

    return build_config(ValidateConfig, device=o["device"], max_abs=o["max_abs"], min_cosine=o["min_cosine"],
                        decode_steps=o["decode_steps"], eval_texts=o["eval_texts"])


def _print_validation(rep: dict) -> None:
    ov = rep["parity"].get("overall")
    if ov:
        click.echo(f"parity ({rep['device']}): max abs {ov['max_abs']:.2e}, mean abs {ov['mean_abs']:.2e}, "
                   f">1e-3: {ov['over_1e-3']}, cosine {ov['cosine']:.8f}"
                   + (f", tokens differing {rep['parity']['tokens']['mismatches']}/{rep['parity']['tokens']['total']}"
                      if rep["parity"].get("tokens") else ""))
    if _task_line(rep.get("task")):
        click.echo(f"vs original: {_task_line(rep.get('task'))}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset of the default domain, 18-20; checked against the installed onnxruntime.")
@click.option("--sparse-body", type=click.Choice(["folded", "dense", "gather"]), default="folded", show_default=True,
              help="Body of ai.compot::SparseCodesMatMul: folded (dense C built once at session start; fastest "
                   "measured), dense (C rebuilt per call, never held), or gather (gather-multiply-reduce).")
@click.option("--no-validate", is_flag=True, help="Skip the parity gate (the export is then marked unvalidated).")
@gate_options
@output_options
@_fail_cleanly
def export(model_dir, out, quiet, overwrite, opset, sparse_body, no_validate, **opts) -> None:
    """Export MODEL_DIR (written by compress/quantize, or a plain HF model) to ONNX in OUT, then run the gate.

    COMPOT layers become ai.compot ops defined as ONNX functions inside the model, quantized dictionaries
    com.microsoft::MatMulNBits, so stock onnxruntime runs OUT/model.onnx with no extra library. Inputs and outputs
    follow Optimum's names. Exit 3 when the gate fails (OUT stays, marked invalid in export.json).
    """
    from .config import ExportConfig, build_config
    from .exporters.onnx_export import export_dir
    from .exporters.validate import validate_export

    cfg = build_config(ExportConfig, opset=opset, sparse_body=sparse_body)
    vcfg = _validate_config(opts)
    man = export_dir(model_dir, out, cfg, overwrite=overwrite)
    b = man["bytes"]
    if not quiet:
        click.echo(f"wrote {out}/model.onnx: {b['onnx']:,} bytes"
                   + (f" ({b['onnx_over_safetensors']:.3f} x model.safetensors)" if b["safetensors"] else ""))
    if not no_validate:
        rep = validate_export(out, vcfg)
        if not quiet:
            _print_validation(rep)
    click.echo(f"exported {out}")


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="The PyTorch model folder to compare with [default: the one export.json names].")
@click.option("--reference", type=click.Path(file_okay=False), default=None,
              help="The original model for the task-level comparison [default: the one the compressed model names].")
@gate_options
@_fail_cleanly
def validate(export_dir, source, reference, **opts) -> None:
    """Check EXPORT_DIR against its PyTorch model: several batch/sequence shapes, and for decoders a prefill plus
    greedy decode steps through the KV cache. Writes validation.json/.md; exit 3 and marks it invalid on failure."""
    from .exporters.validate import validate_export

    rep = validate_export(export_dir, _validate_config(opts), source=source, reference=reference)
    _print_validation(rep)
    click.echo(f"validation passed: {export_dir}")


def _int_list(value: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{what} must be positive integers, got {value!r}")
    return out


@main.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "ort"]),
              help="Only these backends (repeatable) [default: each target's own: torch for model folders, ort for "
                   "export folders].")
@click.option("--device", "devices", default="cpu", show_default=True,
              help="Comma-separated devices: cpu, cuda (PyTorch CUDA / ORT CUDA EP).")
@click.option("--batch", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--seq", default="16,128", show_default=True, help="Comma-separated sequence lengths.")
@click.option("--shapes", default=None,
              help="Explicit BxL list instead of the batch × seq product, e.g. 1x16,1x128,8x128.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs before timing each shape.")
@click.option("--repeat", type=int, default=50, show_default=True, help="Timed runs per shape.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Repeat every measurement this many times, interleaved, to state run-to-run spread.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every backend [default: each "
                                                         "library's own default].")
@click.option("--decode-steps", type=int, default=16, show_default=True,
              help="Decoders: timed single-token decode calls through the KV cache after each prefill.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Folder for bench.json, bench.md and bench.png.")
@_fail_cleanly
def bench(targets, backends, devices, batch, seq, shapes, warmup, repeat, rounds, threads, decode_steps, out) -> None:
    """Measure latency and memory of TARGETS side by side, each backend in its own process.

    A TARGET is a model folder (PyTorch eager: the original, or one written by compress/quantize) or an export
    folder (ONNX Runtime), optionally labelled NAME=PATH. Reports p50/p90/p99/mean latency, tokens/s, peak RSS
    (sampled with psutil from this process, and the worker's own VmHWM peak), peak CUDA memory, load time and
    artifact bytes; decoders also per-token decode latency. Writes JSON, Markdown and a PNG chart.
    """
    from pathlib import Path

    from .bench import bench as run_bench
    from .bench import write_reports

    if shapes:
        try:
            shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")]
            assert all(len(s) == 2 and min(s) >= 1 for s in shape_list)
        except (ValueError, AssertionError):
            raise click.BadParameter(f"--shapes must look like 1x16,8x128, got {shapes!r}") from None
    else:
        shape_list = [(b, L) for b in _int_list(batch, "--batch") for L in _int_list(seq, "--seq")]
    devs = [d.strip() for d in devices.split(",")]
    if any(d not in ("cpu", "cuda") for d in devs):
        raise click.BadParameter(f"--device must list cpu and/or cuda, got {devices!r}")
    labelled = []
    for t in targets:
        name, _, path = t.rpartition("=") if "=" in t else (Path(t).name, "", t)
        if not Path(path).is_dir():
            raise CompotError(f"target not found: {path}")
        labelled.append((name or Path(path).name, path))
    report = run_bench(labelled, list(backends) or None, devs, shape_list, warmup, repeat, rounds, threads,
                       decode_steps, progress=lambda m: click.echo(m, err=True))
    for p in write_reports(report, Path(out)):
        click.echo(f"wrote {p}")


if __name__ == "__main__":  # pragma: no cover
    main()
