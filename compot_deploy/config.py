"""Typed configuration of each stage (pydantic). Validation errors become one-line CompotErrors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CompotError
from .storage.budget import Budget
from .storage.record import STORAGE

Method = Literal["compot", "svd-llm", "cospadi", "rocket"]
Allocation = Literal["uniform", "spectral", "dynamic", "mckp", "joint"]
JointMethod = Literal["dense", "compot", "svd-llm"]
StorageDtype = Literal["float16", "float32", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    """Where calibration text comes from and how it is cut into samples."""

    source: str | None = Field(None, description="text file, .jsonl, folder of .txt, saved dataset; None = built-in")
    samples: int | None = Field(None, ge=1, description="calibration samples; None = 128 documents, 32 packed chunks")
    seq_len: int = Field(128, ge=4, description="tokens per sample, special tokens included")
    batch_size: int = Field(8, ge=1)
    packing: bool | None = Field(
        None, description="concatenate documents into full-length chunks; None = yes for decoders, no for encoders")
    sequential: bool = Field(False, description="Grams of block i on the outputs of compressed blocks < i")
    seed: int = 0


class JointConfig(_Strict):
    """The candidates of the joint allocator: for every layer, each family below with its exact stored bytes and
    its measured whitened error; a multiple-choice knapsack then picks one per layer."""

    methods: tuple[JointMethod, ...] = Field(
        ("dense", "compot", "svd-llm"), min_length=1,
        description="families: dense (float16 or GPTQ), COMPOT and SVD-LLM factors (float16 or GPTQ)")
    dense_quant: tuple[tuple[Literal[2, 3, 4, 8], int], ...] = Field(
        ((2, 32), (2, 128), (3, 32), (3, 128), (4, 32), (4, 128), (8, 128), (8, 0)),
        description="(bits, group) of the dense GPTQ candidates; group 0 = one grid per column")
    factor_ratios: tuple[float, ...] = Field(
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8), min_length=1, description="byte ratios removed by the float16 factorizations")
    factor_bits: tuple[Literal[2, 3, 4, 8, 16], ...] = Field(
        (16, 8, 4), min_length=1, description="bits of the factors (16 = stored at the storage dtype, else GPTQ)")
    factor_group: int = Field(128, ge=0, description="quantization group of the dictionaries / low-rank factors")
    quant_method: Literal["gptq", "rtn"] = "gptq"
    sensitivity: bool = Field(True, description="weight each layer's errors by how much a probe error in it moves "
                                                "the final hidden states (off: every layer counts the same)")
    sensitivity_batches: int = Field(4, ge=1, description="calibration batches the sensitivities are measured on")
    sensitivity_method: Literal["gradient", "probe"] = Field(
        "gradient", description="gradient: first order, all layers from a few backward passes "
                                "(joint.gradient_sensitivities); probe: one noisy forward pass per layer")

    @model_validator(mode="after")
    def _ratios(self):
        if not all(0.0 < r < 1.0 for r in self.factor_ratios):
            raise ValueError("factor_ratios must lie in (0, 1)")
        return self


DECODER_LAYER_CAP = 0.9  # the default --max-layer-ratio of decoders (AllocationConfig.layer_ratio_cap)


class AllocationConfig(_Strict):
    """How the byte budget of the target linears is split across layers. The budget (storage/budget.py) is a
    fraction removed for uniform / spectral / dynamic / mckp, and a fraction kept or the file's bytes for joint."""

    strategy: Allocation = "dynamic"
    budget: Budget = Budget(removed=0.3)
    joint: JointConfig = JointConfig()
    min_layer_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="smallest fraction removed from one layer")
    max_layer_ratio: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="largest fraction removed from one layer; None = 0.9 for decoders, the budget's + 0.1 for "
                    "encoders (each best measured: Gemma-3-270M, all-MiniLM-L6-v2)")
    mckp_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    mckp_k_over_s: tuple[float, ...] = (1.5, 2.0, 3.0)
    mckp_profile_iters: int = Field(3, ge=0)
    max_layer_error: float | None = Field(
        None, gt=0.0, description="dynamic/mckp: drop a layer's candidates whose estimated relative squared whitened "
                                  "error exceeds this (ROCKET's per-layer error cap; the least-error one is always "
                                  "kept); None = no cap")

    def layer_ratio_cap(self, decoder: bool = False) -> float:
        """The largest fraction removed from one layer. A decoder tolerates heavy compression of some layers
        (Gemma-3-270M at 0.3 removed: perplexity 167 with the encoder's cap, 111 with 0.9); an encoder's knapsack
        over-spends on a few layers unless held near the budget (MiniLM at 0.3: cosine 0.921 capped, 0.880 at 0.9)."""
        if self.max_layer_ratio is not None:
            return self.max_layer_ratio
        near = min(0.99, self.budget.removed + 0.1)
        return max(DECODER_LAYER_CAP, near) if decoder else near

    @model_validator(mode="after")
    def _range(self):
        if self.strategy == "joint":
            if self.budget.removed is not None:
                raise ValueError("the joint allocator takes a fraction kept (--target-ratio) or the bytes of the "
                                 "file (--target-bytes), not a fraction removed (--ratio)")
            return self
        if self.budget.removed is None:
            raise ValueError(f"a fraction kept (--target-ratio) or a file size (--target-bytes) needs the joint "
                             f"allocator, not {self.strategy!r}")
        if not self.min_layer_ratio <= self.budget.removed <= self.layer_ratio_cap():
            raise ValueError(f"need --min-layer-ratio <= --ratio <= --max-layer-ratio (got {self.min_layer_ratio}, "
                             f"{self.budget.removed}, {self.layer_ratio_cap()})")
        return self


class FactorizeConfig(_Strict):
    """Per-layer factorization method and its knobs."""

    method: Method = "compot"
    k_over_s: float = Field(2.0, ge=1.0, description="atoms per non-zero of a code column (COMPOT, CoSpaDi, "
                                                      "ROCKET)")
    iters: int = Field(8, ge=0, description="COMPOT alternations (8 + refit: below 20 alternations' error on MiniLM "
                                            "and Gemma-3-270M layers, in less time; benchmarks/results/iterations_*)")
    tol: float = Field(1e-4, ge=0.0)
    refit: bool = Field(True, description="close COMPOT with a least-squares refit of the dictionary, then of each "
                                           "column's values on its support (ROCKET)")
    cospadi_iters: int = Field(60, ge=1, description="K-SVD iterations for CoSpaDi (60: its paper's T, accuracy "
                                                     "stable after about 50; fewer is a documented departure)")
    eps: float = Field(1e-6, gt=0.0, description="initial Gram damping, as a fraction of mean(diag G)")
    dtype: StorageDtype = Field("float16", description="storage dtype of every saved floating tensor")
    seed: int = 0


class QuantizeConfig(_Strict):
    """GPTQ (or round-to-nearest) on the factors of a compressed model, or on a dense model's linears."""

    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8]
    group: int = Field(128, ge=0, description="rows (input dims) per quantization group of a dense matrix; 0 = all rows "
                                              "(one grid per column)")
    sym: bool = Field(False, description="symmetric grid (no stored zero points)")
    act_order: bool = Field(False, description="quantize rows by decreasing Hessian diagonal (static groups)")
    damp: float = Field(0.01, gt=0.0, description="initial damping as a fraction of mean(diag H)")


class PruneConfig(_Strict):
    """ReplaceMe's depth pruning before compression (prune/): which blocks go and the map that replaces them."""

    blocks: int = Field(0, ge=0, description="transformer blocks removed (0 = no pruning)")
    windows: int = Field(1, ge=1, description="separate windows of consecutive blocks they are removed in")
    tokens: Literal["all", "last"] = Field(
        "all", description="tokens the angular distance averages over: every real token, or each sample's last")
    map: Literal["auto", "diagonal", "none"] = Field(
        "auto", description="auto: a full map where it folds (MLP straight into the residual), else diagonal; "
                            "none: the blocks are simply dropped")
    ridge: float = Field(1e-4, ge=0.0, description="ridge of the full map's least squares, times mean(diag MᵀM)")


class EmbeddingConfig(_Strict):
    """The token embedding table stored quantized (symmetric, in blocks of `group` along the hidden size; rounded to
    nearest, or by GPTQ as the LM head where it is tied to one): looked up in ONNX Runtime by
    com.microsoft::GatherBlockQuantized, which reads the packed table."""

    bits: Literal[4, 8, "auto", "joint"] | None = Field(
        None, description="bits per value (None = the storage dtype, unquantized; auto = 4 where the table is not "
                          "tied to an LM head and its rows split into groups, else unquantized: the build's default; "
                          "joint = the joint allocator picks 4, 8 or unquantized with the linears, within a file "
                          "budget)")
    group: int = Field(32, description="values per scale along the hidden size: a power of two, at least 16")
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="rounding of a table tied to an LM head: gptq weighs its errors by the head's inputs (the "
                            "final hidden states on the calibration text), rtn rounds to nearest; a table only looked "
                            "up is always rounded to nearest")

    @model_validator(mode="after")
    def _group(self):
        if self.group < 16 or self.group & (self.group - 1):
            raise ValueError(f"the embedding group must be a power of two of at least 16, got {self.group}")
        return self


class CompressConfig(_Strict):
    """Everything `compress` needs besides the model directory and the output path."""

    calibration: CalibrationConfig = CalibrationConfig()
    allocation: AllocationConfig = AllocationConfig()
    factorize: FactorizeConfig = FactorizeConfig()
    quantize: QuantizeConfig | None = None
    prune: PruneConfig = PruneConfig()
    embeddings: EmbeddingConfig = EmbeddingConfig()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_shard_bytes: int = Field(5 * 10**9, ge=1, description="largest weights file: a bigger model is "
                                 "written as shards with model.safetensors.index.json, as hub checkpoints are")

    @model_validator(mode="before")
    @classmethod
    def _quantize_needs_bits(cls, data):
        q = data.get("quantize") if isinstance(data, dict) else None
        if isinstance(q, dict) and "bits" not in q:
            raise ValueError("the quantization settings (--gptq-group, --gptq-sym, --gptq-act-order, --quant-method) "
                             "need --gptq-bits")
        return data

    @model_validator(mode="after")
    def _combinations(self):
        if self.allocation.strategy == "joint" and self.quantize is not None:
            raise ValueError("a byte target (--target-ratio/--target-bytes) lets the joint allocator pick every "
                             "layer's bits itself: drop --gptq-bits, or use --ratio")
        if self.embeddings.bits == "joint" and (self.allocation.strategy != "joint"
                                                 or self.allocation.budget.file_bytes is None):
            raise ValueError("--embedding-bits joint lets the joint allocator store the table with the linears "
                             "within the whole file's bytes: give --target-bytes")
        if self.allocation.strategy == "joint" and not STORAGE[self.factorize.method].joint_candidate:
            raise ValueError(f"--method {self.factorize.method} cannot take a byte target: it is too slow to measure "
                             f"at every candidate size; use --method compot or svd-llm")
        return self


class ExportConfig(_Strict):
    """How a compressed model is written as ONNX."""

    opset: int = Field(18, ge=18, le=20, description="default-domain opset (18: ORT >= 1.14; 20: the exporter's max)")
    sparse_body: Literal["folded", "dense", "gather"] = Field(
        "folded", description="body of ai.compot::SparseCodesMatMul (exporters/ops.py); folded measured fastest")


class ValidateConfig(_Strict):
    """The parity gate between the compressed PyTorch model and the ONNX Runtime session."""

    device: Literal["cpu", "cuda"] = "cpu"
    max_abs: float = Field(1e-3, gt=0.0, description="largest |ORT − PyTorch| allowed on any output element")
    min_cosine: float = Field(0.99999, gt=0.0, le=1.0, description="smallest cosine of ORT vs PyTorch outputs")
    decode_steps: int = Field(8, ge=0, description="greedy decode calls through the KV cache after the prefill")
    max_token_mismatches: int = Field(0, ge=0, description="greedy tokens allowed to differ (decoders)")
    encoder_shapes: tuple[tuple[int, int], ...] = ((1, 8), (2, 37), (4, 128))
    decoder_prompts: tuple[tuple[int, int], ...] = ((1, 12), (2, 20))
    eval_texts: int = Field(64, ge=0, description="held-out texts for the task-level comparison (0 = skip)")


class BenchConfig(_Strict):
    """Latency and memory measurement (`bench`, and the build's check of its export against the original's):
    each (target, backend, device) in its own worker process."""

    enabled: bool = Field(True, description="build only: run the benchmark stage")
    shapes: tuple[tuple[int, int], ...] = Field(((1, 16), (1, 128), (8, 128)), min_length=1,
                                                description="(batch, sequence length) of each timed input")
    warmup: int = Field(5, ge=0, description="untimed runs before timing each shape")
    repeat: int = Field(20, ge=1, description="timed runs per shape")
    rounds: int = Field(1, ge=1, description="every measurement repeated, interleaved, to state the spread")
    threads: int | None = Field(None, ge=1, description="intra-op threads; None = each library's default")
    decode_steps: int = Field(16, ge=0, description="decoders: timed one-token decode calls after each prefill")
    backends: tuple[Literal["torch", "ort"], ...] | None = Field(
        None, description="only these backends; None = each target's own (torch: model folder, ort: export)")
    devices: tuple[Literal["cpu", "cuda"], ...] = Field(("cpu",), min_length=1)
    peers: tuple[Literal["int8", "int4-b32", "int4-b128"], ...] = Field(
        ("int8", "int4-b32", "int4-b128"),
        description="build only: ONNX Runtime's one-line quantizers of the original measured beside the package "
                    "(quality, file bytes, session memory, latency; compot_deploy/peers.py); () = none")

    @model_validator(mode="after")
    def _shapes(self):
        if not all(len(s) == 2 and min(s) >= 1 for s in self.shapes):
            raise ValueError("shapes must be positive (batch, sequence length) pairs")
        return self


# What `build` compresses with when the command line and the config file leave it open (README, "The default
# build"): on all-MiniLM-L6-v2 the table at 4 bits ("auto": tied tables are left alone, their head would dequantize
# the whole table on every PyTorch step) and COMPOT taking 10 % of the linears' bytes gave 26.3 MB at
# embedding cosine 0.978, where ORT's quantize_dynamic one-liner gives 22.8 MB at 0.966 and the earlier default
# (COMPOT 0.3, float16 table) 38.9 MB at 0.921. `compress` keeps its own defaults (--ratio 0.3, table untouched).
BUILD_COMPRESS_DEFAULTS = {"allocation": {"budget": {"removed": 0.1}}, "embeddings": {"bits": "auto"}}


def with_build_defaults(given: dict) -> dict:
    """`given` (a partial CompressConfig dict) over BUILD_COMPRESS_DEFAULTS; a budget given in any form replaces
    the default budget whole."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BUILD_COMPRESS_DEFAULTS.items()}
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = {**out[key], **value}
            if key == "allocation" and "budget" in value:
                merged["budget"] = value["budget"]
            out[key] = merged
        else:
            out[key] = value
    return out


class BuildConfig(_Strict):
    """Everything `build` runs: one file (`--save-config`) reproduces a build."""

    model: str | None = Field(None, description="model folder; None = the packaged all-MiniLM-L6-v2")
    target: Literal["cpu", "cuda", "mobile"] = Field(
        "cpu", description="cpu / cuda: the execution provider of the gate and the benchmark; mobile: cpu plus an "
                           ".ort model and its required-operators config for ORT Mobile")
    compress: CompressConfig = CompressConfig.model_validate(BUILD_COMPRESS_DEFAULTS)
    export: ExportConfig = ExportConfig()
    gate: ValidateConfig = ValidateConfig()
    bench: BenchConfig = BenchConfig()


def load_config_file(path) -> dict:
    """A YAML (or JSON) file as a dict, with one-line errors."""
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise CompotError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise CompotError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CompotError(f"{p} must hold a mapping of build settings")
    return data


def build_config(cls, names: dict[str, str] | None = None, **values):
    """Instantiate `cls`, turning a ValidationError into one clear line. names: setting path → the command-line
    option that sets it, named in the message instead of the path."""
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        names = names or {}
        loc = names.get(loc) or names.get(loc.rpartition(".")[0]) or loc  # an item of a list: the list's option
        if "--" in msg or not loc:  # a check across options names them itself, better than a section's path
            raise CompotError(f"invalid options: {msg}") from None
        raise CompotError(f"invalid {loc}: {msg}") from None
