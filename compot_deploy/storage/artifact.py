"""The compressed-model directory: config.json (HF config + `compot` section), model.safetensors, tokenizer.

Writes are atomic: everything goes to a hidden sibling folder that is renamed into place at the end, so a
failure never leaves a half-written OUT.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from ..errors import CompotError
from .shards import safetensors_header  # noqa: F401  (read by the tests and the exporter)

WEIGHTS = "model.safetensors"
REPORT = "compression_report.json"
# 2: layer entries are LayerRecord specs (storage/record.py); measurements live in compression_report.json
FORMAT_VERSION = 2

_TORCH_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "bfloat16"}


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs=()) -> None:
    """The output-folder policy, checked before any work:

    - OUT is never an input (a model folder, a .gguf file), inside one, or a folder holding one, --overwrite or not:
      the user's model is never written into or replaced;
    - OUT that is a file is refused; a non-empty OUT only with `overwrite` (which then replaces it whole);
    - OUT's location must be writable (probed with a temporary file in its nearest existing folder)."""
    out = Path(out)
    where = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if where == src or src in where.parents or where in src.parents:
            rel = "is" if where == src else ("is inside" if src in where.parents else "holds")
            raise CompotError(f"output {out} {rel} the input {src}: choose another output folder")
    if out.exists() and not out.is_dir():
        raise CompotError(f"output path exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CompotError(f"output directory {out} is not empty (use --overwrite)")
    probe_writable(out)


def probe_writable(out: Path) -> None:
    """Raise CompotError unless a file can be created in `out` or, if it does not exist yet, its nearest
    existing parent folder."""
    import tempfile

    base = Path(out).resolve()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise CompotError(f"cannot create {out}: {base} is not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=base, prefix=".compot-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise CompotError(f"cannot write to {base}: {e.strerror or e}") from None


def write_error(out: Path, e: OSError) -> CompotError:
    """One line for an OSError met while writing `out` (disk full, read-only, permission)."""
    return CompotError(f"could not write {out}: {e.strerror or e}" + (" (disk full)" if e.errno == errno.ENOSPC else ""))


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error it is removed (an
    OSError while writing, such as a full disk, becomes one CompotError line)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise write_error(out, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_compressed(model, tokenizer, folder: Path, compot_section: dict, storage_dtype: str,
                    restore: bool = True, blocks: list[Path] = (), max_shard_bytes: int = 5 * 10**9) -> None:
    """Write model weights (floating parameters cast to `storage_dtype`) with the tensors of the safetensors
    files `blocks` (blocks saved as they were finished, not in `model` any more), config.json and tokenizer
    files. The weights are one model.safetensors, or shards of at most `max_shard_bytes` with an index (shards.py).
    restore=False leaves the parameters cast (one copy of each in memory at a time, not two)."""
    import torch
    from safetensors.torch import save_model

    from .shards import write_shards

    dt = getattr(torch, _TORCH_DTYPES[storage_dtype])
    originals = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if p.is_floating_point() and p.dtype != dt:
            if restore:
                originals[name] = p.data
            p.data = p.data.to(dt)
    rest = folder / ".rest.safetensors"
    try:
        save_model(model, str(rest))
        write_shards([rest, *blocks], folder, max_shard_bytes, {"format": "pt", "producer": "compot-deploy"})
    finally:
        rest.unlink(missing_ok=True)
        for name, data in originals.items():
            model.get_parameter(name).data = data
    model.config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["compot"] = compot_section
    write_json_atomic(folder / "config.json", cfg)
    tokenizer.save_pretrained(folder)


def layer_file_bytes(folder: str | os.PathLike, layer_names: list[str]) -> dict[str, int]:
    """Stored bytes of each layer's tensors (`name.*`), read from the weights files of `folder`."""
    from .shards import tensor_bytes

    sizes = tensor_bytes(folder)
    out = {}
    for name in layer_names:
        pre = name + "."
        out[name] = sum(v for k, v in sizes.items() if k.startswith(pre))
    return out


def layer_records(section: dict) -> dict:
    """name → LayerRecord of a `compot` config section (format 1 entries, which mixed measurements in, too)."""
    from .record import LayerRecord

    if section.get("format_version", 0) > FORMAT_VERSION:
        raise CompotError(f"written by a newer compot-deploy (format {section['format_version']})")
    out = {}
    for name, e in section["layers"].items():
        if section.get("format_version", 1) < 2:
            e = _entry_from_v1(e, section["storage_dtype"])
        try:
            out[name] = LayerRecord.from_json(e)
        except ValueError as err:
            raise CompotError(f"layer {name}: invalid entry in config.json: {str(err).splitlines()[0]}") from None
    return out


def _entry_from_v1(e: dict, dtype: str) -> dict:
    spec = {k: e[k] for k in ("method", "d_in", "d_out", "bias", "k", "s", "r", "position") if e.get(k)}
    spec["bias"], spec["dtype"] = e["bias"], dtype
    if "quant" in e:
        q = e["quant"]
        spec["quant"] = {"method": q["method"], "bits": q["bits"], "sym": q["sym"],
                         "groups": {slot: g[0] for slot, g in q["slots"].items()}}
    return spec


def load(path: str | os.PathLike):
    """Rebuild a compressed model (float32, eval mode) from a directory written by `compress`. No remote code."""
    import torch
    import transformers

    from ..models import model_class, read_hf_config, set_module

    path = Path(path)
    raw = read_hf_config(path)
    section = raw.get("compot")
    if not section:
        raise CompotError(f"{path} is not a compot-deploy model (config.json has no 'compot' section)")
    try:
        records = layer_records(section)
    except CompotError as e:
        raise CompotError(f"{path}: {e}") from None
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model = model_class(config)(config).to(torch.float32)
    for name, rec in records.items():
        new = rec.empty_module()
        if new is not None:
            set_module(model, name, new)
    if section.get("embeddings"):
        from ..quantize.embeddings import empty_embeddings

        empty_embeddings(model, section["embeddings"])
    _load_weights(model, path)
    model.eval()
    return model


def _load_weights(model, path: Path) -> None:
    """Every parameter and buffer of `model` from the weights files of `path` (one file or shards), strictly:
    a name missing from all of them or one the model lacks is an error (tied weights are handled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .shards import weight_files

    files = sorted(set((weight_files(path) or {}).values()))
    if not files:
        raise CompotError(f"{path} has no {WEIGHTS} (nor a sharded index)")
    missing, unexpected = None, set()
    for f in files:
        try:
            m, u = load_model(model, str(f), strict=len(files) == 1)  # tied weights (e.g. an LM head) are handled
        except SafetensorError as e:
            raise CompotError(f"cannot read {f}: {e}") from None
        except (RuntimeError, FileNotFoundError) as e:
            raise CompotError(f"{f} does not match its config: {str(e).splitlines()[-1].strip()}") from None
        missing = set(m) if missing is None else missing & set(m)
        unexpected |= set(u)
    if missing or unexpected:
        what = "; ".join(f"{k}: {', '.join(sorted(v)[:3])}" for k, v in (("missing", missing), ("unexpected", unexpected))
                         if v)
        raise CompotError(f"the weights of {path} do not match its config ({what})")
