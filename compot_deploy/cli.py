"""`compot-deploy` command line. Imports stay light here; stages import torch/transformers when they run."""

from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import CompotError


def _fail_cleanly(fn):
    """Bad input → one `error: …` line on stderr and exit code 2; nothing half-written (stages write atomically)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
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


def compress_options(fn):
    opts = [
        click.argument("model_dir", required=False, type=click.Path(file_okay=False)),
        click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (must be empty or new)."),
        click.option("--ratio", type=float, default=0.3, show_default=True,
                     help="Fraction of the target linears' stored bytes to remove, in (0, 1)."),
        click.option("--method", type=click.Choice(["compot", "svd-llm", "cospadi"]), default="compot",
                     show_default=True, help="Factorization: COMPOT, the SVD-LLM baseline, or CoSpaDi (K-SVD + OMP)."),
        click.option("--allocation", type=click.Choice(["uniform", "dynamic", "mckp"]), default="dynamic",
                     show_default=True,
                     help="How the byte budget is split across layers: the same ratio everywhere, COMPOT's one-shot "
                          "spectral split, or a knapsack over measured per-layer error profiles."),
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
        click.option("--sequential", is_flag=True,
                     help="Calibrate block i on the outputs of the already-compressed blocks before it."),
        click.option("--k-over-s", type=float, default=2.0, show_default=True,
                     help="Dictionary atoms per non-zero code of a column (COMPOT, CoSpaDi)."),
        click.option("--iters", type=int, default=10, show_default=True, help="COMPOT alternations per layer."),
        click.option("--dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
                     show_default=True, help="Storage dtype of saved floating tensors; budgets count these bytes."),
        click.option("--include", multiple=True, help="Only compress linears whose name matches this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Never compress linears whose name matches this glob (repeatable)."),
        click.option("--min-layer-ratio", type=float, default=0.0, show_default=True,
                     help="Smallest per-layer ratio the dynamic/mckp allocators may choose."),
        click.option("--max-layer-ratio", type=float, default=None,
                     help="Largest per-layer ratio the dynamic/mckp allocators may choose [default: ratio + 0.1]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and K-SVD."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars and no closing table."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _config_from_options(o: dict):
    from .config import AllocationConfig, CalibrationConfig, CompressConfig, FactorizeConfig, build_config

    return build_config(
        CompressConfig,
        calibration=build_config(CalibrationConfig, source=o["calib"], samples=o["samples"], seq_len=o["seq_len"],
                                 batch_size=o["batch_size"], packing=o["packing"], sequential=o["sequential"],
                                 seed=o["seed"]),
        allocation=build_config(AllocationConfig, strategy=o["allocation"], ratio=o["ratio"],
                                min_layer_ratio=o["min_layer_ratio"], max_layer_ratio=o["max_layer_ratio"]),
        factorize=build_config(FactorizeConfig, method=o["method"], k_over_s=o["k_over_s"], iters=o["iters"],
                               dtype=o["dtype"], seed=o["seed"]),
        include=tuple(o["include"]),
        exclude=tuple(o["exclude"]),
    )


def _print_report(report: dict) -> None:
    rows = [("layer", "method", "shape", "ratio", "rel.err", "sec")]
    for lay in report["layers"]:
        shape = {"svd-llm": f"r={lay['r']}", "dense": "-"}.get(lay["method"], f"k={lay['k']} s={lay['s']}")
        rows.append((lay["name"], lay["method"], shape, f"{lay['ratio']:.3f}", f"{lay['rel_error']:.4f}",
                     f"{lay['seconds']:.2f}"))
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


@main.command()
@compress_options
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


@main.command()
@compress_options
@_fail_cleanly
def build(model_dir, out, quiet, overwrite, **opts) -> None:
    """Build a deployable model from MODEL_DIR (default: the packaged all-MiniLM-L6-v2) into OUT.

    Stages available in this release: calibrate → allocate → factorize → save, written to OUT/model.
    """
    from pathlib import Path

    from .models import default_model_dir
    from .pipeline import compress as run

    cfg = _config_from_options(opts)
    target = Path(out) / "model"
    report = run(model_dir or default_model_dir(), target, cfg, overwrite=overwrite, progress=not quiet)
    if not quiet:
        _print_report(report)
    click.echo(f"built {target}")


if __name__ == "__main__":  # pragma: no cover
    main()
