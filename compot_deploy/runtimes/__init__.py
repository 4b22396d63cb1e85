"""One small interface over the runtimes a model is measured on: load, run, describe.

Backends: "torch" (PyTorch eager, float32: a plain HF folder = the dense original, or a folder written by
compress/quantize) and "ort" (an export folder in ONNX Runtime). `device` is "cpu" or "cuda".
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

from ..errors import CompotError
from ..models import encoder_inputs

def target_kind(path: str | os.PathLike) -> str:
    """'ort' for a folder written by `export`, 'torch' for a model folder."""
    p = Path(path)
    if (p / "export.json").is_file():
        return "ort"
    if (p / "config.json").is_file():
        return "torch"
    raise CompotError(f"{p} is neither an export folder (export.json) nor a model folder (config.json)")


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weights a runtime loads: the .onnx graphs (+data) for exports, *.safetensors for model
    folders."""
    p = Path(path)
    files = list(p.glob("*.onnx*")) if target_kind(p) == "ort" else list(p.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


class Runtime(abc.ABC):
    """load() once, run(feed) many times (feed: name → int64 numpy), describe() for the report."""

    kind = ""

    def __init__(self, path, device: str = "cpu", threads: int | None = None):
        self.path, self.device, self.threads = Path(path), device, threads

    @abc.abstractmethod
    def load(self) -> None:
        """Build the model or session on self.device."""

    @abc.abstractmethod
    def run(self, feed: dict):
        """One forward pass, finished (synchronized) when it returns."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """Backend, versions, device, threads and settings, for the report."""

    @abc.abstractmethod
    def decoder_step(self, feed: dict):
        """An encoder-decoder's decoder call for runtimes.loader.greedy, after the encoder ran on `feed`."""


class TorchRuntime(Runtime):
    kind = "torch"

    def load(self) -> None:
        import torch

        from ..storage.artifact import load as load_compressed
        from ..models import load_model, read_hf_config

        if self.device == "cuda" and not torch.cuda.is_available():
            raise CompotError("device cuda: this torch sees no CUDA device")
        if self.threads:
            torch.set_num_threads(self.threads)
        compressed = "compot" in read_hf_config(self.path)
        self.model = (load_compressed(self.path) if compressed else load_model(self.path)[0]).to(self.device)
        self.compressed = compressed

    def run(self, feed: dict):
        import torch

        with torch.no_grad():
            out = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in feed.items()})
            t = out.logits if hasattr(out, "logits") else out.last_hidden_state
            if self.device == "cuda":
                torch.cuda.synchronize()
        return t

    def decoder_step(self, feed: dict):
        return torch_seq2seq_step(self.model, encoder_inputs(feed), self.device)[0]

    def describe(self) -> dict:
        import torch

        return {"backend": "torch", "device": self.device, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "dtype": "float32", "compressed": self.compressed,
                "attention": self.model.config._attn_implementation,
                "gpu": torch.cuda.get_device_name() if self.device == "cuda" else None}


class OrtRuntime(Runtime):
    kind = "ort"

    def __init__(self, path, device: str = "cpu", threads: int | None = None, opt_level: str = "all"):
        super().__init__(path, device, threads)
        self.opt_level = opt_level

    def load(self) -> None:
        from .loader import OrtSeq2Seq
        from .ort import export_session

        loaded = export_session(self.path, self.device, self.threads, self.opt_level)
        self.s2s = loaded if isinstance(loaded, OrtSeq2Seq) else None
        self.sess = loaded.decoder if self.s2s else loaded
        self.outputs = [o.name for o in self.sess.get_outputs()][:1]
        self.io_binding = self.device == "cuda"  # outputs stay on the GPU, as a serving loop keeps them

    def decoder_step(self, feed: dict):
        return self.s2s.stepper(self.s2s.encode(encoder_inputs(feed)), feed.get("attention_mask"))

    def run(self, feed: dict):
        if self.s2s is not None:  # the encoder, then the decoder's first call (numpy in and out, also on cuda)
            step = self.decoder_step(feed)
            return step(feed["decoder_input_ids"], None, None, None)[0]
        if not self.io_binding:
            return self.sess.run(self.outputs, feed)
        b = self.sess.io_binding()
        for k, v in feed.items():
            b.bind_cpu_input(k, v)
        for o in self.outputs:
            b.bind_output(o, "cuda")
        self.sess.run_with_iobinding(b)
        return b

    def describe(self) -> dict:
        import onnxruntime as ort

        so = self.sess.get_session_options()
        return {"backend": "ort", "device": self.device, "onnxruntime": ort.__version__,
                "providers": self.sess.get_providers(), "threads": so.intra_op_num_threads or "default (cores)",
                "graph_optimization": self.opt_level, "io_binding": self.io_binding}


def torch_step(model, device: str = "cpu"):
    """A decode step for runtimes.loader.greedy over a PyTorch causal LM and its DynamicCache."""
    import torch
    from transformers import DynamicCache

    from ..models import cache_kwargs

    def step(ids, attention_mask, position_ids, past):
        past = DynamicCache(config=model.config) if past is None else past
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).to(device),
                        attention_mask=torch.from_numpy(attention_mask).to(device),
                        position_ids=torch.from_numpy(position_ids).to(device), use_cache=True,
                        **cache_kwargs(model, past))
        return out.logits.float().cpu().numpy(), past

    return step


def runtime(path, backend: str | None = None, device: str = "cpu", threads: int | None = None) -> Runtime:
    backend = backend or target_kind(path)
    if backend != target_kind(path):
        raise CompotError(f"{path} is a {target_kind(path)} target, not {backend}")
    return (TorchRuntime if backend == "torch" else OrtRuntime)(path, device, threads)


def torch_seq2seq_step(model, feed: dict, device: str = "cpu"):
    """Run an encoder-decoder's encoder on `feed` (its inputs as int64/float32 numpy: input_ids and attention_mask,
    or Whisper's input_features); return (a decoder step for runtimes.loader.greedy — the model's
    EncoderDecoderCache keeps the cross-attention keys after the first call —, the encoder's output (B, S, H)
    numpy)."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    from ..models import cache_kwargs

    kw = {k: torch.from_numpy(v).to(device) for k, v in feed.items()}
    mask = kw.get("attention_mask")
    with torch.no_grad():
        hidden = model.get_encoder()(**kw).last_hidden_state

    def step(dec_ids, _mask, _positions, past):
        past = EncoderDecoderCache(DynamicCache(), DynamicCache()) if past is None else past
        with torch.no_grad():
            out = model(decoder_input_ids=torch.from_numpy(dec_ids).to(device), attention_mask=mask,
                        encoder_outputs=(hidden,), use_cache=True, **cache_kwargs(model, past))
        return out.logits.float().cpu().numpy(), past

    return step, hidden.float().cpu().numpy()


def torch_seq2seq(model, feed: dict, steps: int):
    """PyTorch's greedy decoding of an encoder-decoder, the loop OrtSeq2Seq runs (runtimes.loader.greedy from the
    decoder's start token) on the encoder inputs `feed` (numpy). Returns (tokens (B, steps + 1), every call's
    logits, the encoder's output)."""
    import numpy as np

    from .loader import greedy, start_token

    step, hidden = torch_seq2seq_step(model, feed)
    start = np.full((hidden.shape[0], 1), start_token(model.config.to_dict()), np.int64)
    tokens, logits = greedy(step, start, steps)
    return tokens, logits, hidden
