"""ONNX Runtime sessions over an exported folder, and the decoder loop through its KV cache."""

from __future__ import annotations

import os

from ..errors import CompotError
from .loader import OrtDecoder  # noqa: F401 - re-exported

# TF32 off: float32 graphs compute in float32 on the GPU, as PyTorch's default matmul does.
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]}


def session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None, opt_level: str = "all"):
    """An InferenceSession on `device`; refuses cuda when this onnxruntime has no CUDA EP."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise CompotError(f"device must be one of {sorted(PROVIDERS)}, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise CompotError("device cuda needs onnxruntime-gpu with the CUDA execution provider "
                          f"(this onnxruntime {ort.__version__} has {ort.get_available_providers()})")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), so, providers=PROVIDERS[device])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception classes
        raise CompotError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
    release_free_heap()
    return sess


def export_session(folder: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                   opt_level: str = "all"):
    """The session on an export or package folder's model.onnx, or for an encoder-decoder's two graphs an
    OrtSeq2Seq over both."""
    from pathlib import Path

    from .loader import is_seq2seq, seq2seq

    if not is_seq2seq(folder):
        return session(Path(folder) / "model.onnx", device, threads, opt_level)
    return seq2seq(folder, opener=lambda path: session(path, device, threads, opt_level))


def release_free_heap() -> bool:
    """Hand the heap that session start freed back to the OS (glibc's malloc_trim). ORT's constant folding frees
    its intermediates only when it ends, and glibc keeps those pages: without this an ORT session's RSS after load
    stays at its load peak (benchmarks/fold_peak.py). Returns False where the C library has no malloc_trim."""
    import ctypes

    try:  # the symbols already loaded into this process: no library search on every session
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
