"""GGUF model files (llama.cpp's format) as model folders: transformers dequantizes them, we save the HF folder.

Every command that takes MODEL_DIR also takes a `.gguf` file, or a folder holding exactly one `.gguf` and no
config.json: `resolve_model_dir` turns it into a Hugging Face folder (config.json without the GGUF
`quantization_config`, float32 model.safetensors, tokenizer) once, cached under COMPOT_DEPLOY_CACHE (default
~/.cache/compot-deploy) by the file's sha256, and every stage reads that folder. `compot-deploy from-gguf` writes
the folder where you want it. Reading GGUF needs the `gguf` and `accelerate` packages (the `[gemma]` extra).

The weights are the GGUF's dequantized values: a model that went through a 4-bit GGUF format (Q4_K_M, …) carries
that rounding into every later step, which slightly flatters any later 4-bit quantization of the same weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CompotError

SUFFIX = ".gguf"
SOURCE = "gguf_source.json"


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file that `path` names (the file itself, or the one .gguf of a folder without config.json), else
    None for an ordinary model folder."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == SUFFIX else None
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() == SUFFIX and q.is_file())
        if len(found) > 1:
            raise CompotError(f"{p} holds {len(found)} .gguf files ({', '.join(q.name for q in found)}): name one")
        return found[0] if found else None
    return None


def cache_root() -> Path:
    return Path(os.environ.get("COMPOT_DEPLOY_CACHE") or Path.home() / ".cache" / "compot-deploy")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """`path` itself for a model folder; for a GGUF file, its HF folder in the cache (written on first use)."""
    g = gguf_file(path)
    if g is None:
        return Path(path)
    from .storage.artifact import sha256_file

    digest = sha256_file(g)
    out = cache_root() / "gguf" / f"{g.stem}-{digest[:16]}"
    if (out / SOURCE).is_file():
        return out
    return materialize(g, out, overwrite=True, digest=digest)


def materialize(gguf: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                digest: str | None = None) -> Path:
    """Write the HF folder of the causal LM in `gguf` into `out` (atomically): config.json without
    quantization_config, model.safetensors in float32, tokenizer files, and gguf_source.json (file, sha256)."""
    from .storage.artifact import atomic_dir, check_output_dir, sha256_file, write_json_atomic

    g = Path(gguf)
    if not g.is_file() or g.suffix.lower() != SUFFIX:
        raise CompotError(f"not a .gguf file: {g}")
    check_output_dir(out, overwrite, [g])  # before the slow read
    model, tokenizer = _read(g)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / SOURCE, {"file": str(g.resolve()), "sha256": digest or sha256_file(g)})
    return Path(out)


def _read(g: Path):
    """The dequantized float32 model and the tokenizer of a GGUF file, ready for save_pretrained."""
    import torch

    try:
        import accelerate  # noqa: F401 - transformers' GGUF loader needs both
        import gguf  # noqa: F401
    except ImportError as e:
        raise CompotError(f"reading {g.name} needs the gguf and accelerate packages: "
                          "pip install 'compot-deploy[gemma]'") from e
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CompotError(f"cannot read {g} as a causal LM: {str(e).splitlines()[0]}") from None
    # the weights are dequantized already: saving the GGUF quantization_config would make loaders look for it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.eval()
    return model, tokenizer


def source_of(model_dir: str | os.PathLike) -> dict | None:
    """The GGUF file a folder was materialized from, if any."""
    p = Path(model_dir) / SOURCE
    return json.loads(p.read_text()) if p.is_file() else None
