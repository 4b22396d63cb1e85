"""Typed configuration of each stage (pydantic). Validation errors become one-line CompotErrors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CompotError

Method = Literal["compot", "svd-llm", "cospadi"]
Allocation = Literal["uniform", "dynamic", "mckp", "joint"]
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
    sensitivity_batches: int = Field(4, ge=1, description="calibration batches the sensitivity probes run on")

    @model_validator(mode="after")
    def _ratios(self):
        if not all(0.0 < r < 1.0 for r in self.factor_ratios):
            raise ValueError("factor_ratios must lie in (0, 1)")
        return self


class AllocationConfig(_Strict):
    """How the global byte budget of the target linears is split across layers."""

    strategy: Allocation = "dynamic"
    ratio: float = Field(0.3, gt=0.0, lt=1.0, description="fraction of the target linears' bytes to remove")
    target_ratio: float | None = Field(
        None, gt=0.0, le=1.0,
        description="joint: stored bytes of the target linears as a fraction of their dense bytes at the storage dtype")
    target_bytes: int | None = Field(None, gt=0, description="joint: bytes of the whole saved weights file")
    joint: JointConfig = JointConfig()
    min_layer_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    max_layer_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="largest per-layer ratio; None = ratio + 0.1 (best measured on MiniLM)")
    mckp_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    mckp_k_over_s: tuple[float, ...] = (1.5, 2.0, 3.0)
    mckp_profile_iters: int = Field(3, ge=0)

    @property
    def layer_ratio_cap(self) -> float:
        return self.max_layer_ratio if self.max_layer_ratio is not None else min(0.99, self.ratio + 0.1)

    @model_validator(mode="after")
    def _range(self):
        targets = (self.target_ratio is not None) + (self.target_bytes is not None)
        if self.strategy == "joint" and targets != 1:
            raise ValueError("the joint allocator needs exactly one of target_ratio / target_bytes")
        if self.strategy != "joint" and targets:
            raise ValueError("target_ratio / target_bytes need strategy 'joint'")
        if not self.min_layer_ratio <= self.ratio <= self.layer_ratio_cap:
            raise ValueError(f"need min_layer_ratio <= ratio <= max_layer_ratio (got {self.min_layer_ratio}, "
                             f"{self.ratio}, {self.layer_ratio_cap})")
        return self


class FactorizeConfig(_Strict):
    """Per-layer factorization method and its knobs."""

    method: Method = "compot"
    k_over_s: float = Field(2.0, ge=1.0, description="atoms per non-zero of a code column (COMPOT, CoSpaDi)")
    iters: int = Field(8, ge=0, description="COMPOT alternations (8: within 0.001 cosine of 10 on MiniLM, 20 % faster)")
    tol: float = Field(1e-4, ge=0.0)
    cospadi_iters: int = Field(3, ge=1, description="K-SVD iterations for CoSpaDi")
    eps: float = Field(1e-6, gt=0.0, description="initial Gram damping, as a fraction of mean(diag G)")
    dtype: StorageDtype = Field("float16", description="storage dtype of every saved floating tensor")
    seed: int = 0


class QuantizeConfig(_Strict):
    """GPTQ (or round-to-nearest) on the factors of a compressed model, or on a dense model's linears."""

    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group: int = Field(128, ge=0, description="rows (input dims) per quantization group of a dense matrix; 0 = all rows "
                                              "(one grid per column)")
    sym: bool = Field(False, description="symmetric grid (no stored zero points)")
    act_order: bool = Field(False, description="quantize rows by decreasing Hessian diagonal (static groups)")
    damp: float = Field(0.01, gt=0.0, description="initial damping as a fraction of mean(diag H)")


class CompressConfig(_Strict):
    """Everything `compress` needs besides the model directory and the output path."""

    calibration: CalibrationConfig = CalibrationConfig()
    allocation: AllocationConfig = AllocationConfig()
    factorize: FactorizeConfig = FactorizeConfig()
    quantize: QuantizeConfig | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


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
    """The build's latency check: the compressed export against the original's, in ONNX Runtime."""

    enabled: bool = True
    shapes: tuple[tuple[int, int], ...] = ((1, 16), (1, 128))
    warmup: int = Field(5, ge=0)
    repeat: int = Field(20, ge=1)


class BuildConfig(_Strict):
    """Everything `build` runs: one file (`--save-config`) reproduces a build."""

    model: str | None = Field(None, description="model folder; None = the packaged all-MiniLM-L6-v2")
    target: Literal["cpu", "cuda", "mobile"] = Field(
        "cpu", description="cpu / cuda: the execution provider of the gate and the benchmark; mobile: cpu plus an "
                           ".ort model and its required-operators config for ORT Mobile")
    compress: CompressConfig = CompressConfig()
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


def build_config(cls, **values):
    """Instantiate `cls`, turning a ValidationError into one clear line."""
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or cls.__name__
        raise CompotError(f"invalid {loc}: {err['msg']}") from None
