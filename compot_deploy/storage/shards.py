"""Weights files laid out as hub checkpoints are: one model.safetensors, or shards of at most a given size
with model.safetensors.index.json. They are assembled by copying each tensor's bytes from other safetensors
files (a saved block, the rest of the model), so no tensor is read into memory and the same tensors always give
the same bytes, whichever files they came from.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import CompotError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# bytes per element of the safetensors dtypes we write (alignment: bigger elements first)
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file: tensor name → {dtype, shape, data_offsets}, and
    `__metadata__` when it has one. A clear error for a file that is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return 8 + n, json.loads(f.read(n))
    except (struct.error, ValueError, OSError) as e:
        raise CompotError(f"{path.name} in {path.parent} is not a safetensors file ({str(e).splitlines()[0]})") from None


def safetensors_header(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file's header: name → {dtype, shape, data_offsets}."""
    header = read_header(path)[1]
    header.pop("__metadata__", None)
    return header


def weight_files(folder: str | os.PathLike) -> dict[str, Path] | None:
    """Tensor name → the safetensors file of `folder` holding it (model.safetensors, or the shards its index
    names); None when the folder has neither."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CompotError(f"{folder / INDEX} is not a safetensors index ({e})") from None
        return {k: folder / v for k, v in weight_map.items()}
    if not (folder / SINGLE).is_file():
        return None
    return {k: folder / SINGLE for k in read_header(folder / SINGLE)[1] if k != "__metadata__"}


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weights files of `folder` (every shard; the index not counted)."""
    return sum(p.stat().st_size for p in set((weight_files(folder) or {}).values()))


def tensor_bytes(folder: str | os.PathLike) -> dict[str, int]:
    """Tensor name → its stored bytes, over every weights file of `folder`."""
    out, headers = {}, {}
    for name, path in (weight_files(folder) or {}).items():
        if path not in headers:
            headers[path] = read_header(path)[1]
        lo, hi = headers[path][name]["data_offsets"]
        out[name] = hi - lo
    return out


def write_shards(sources: list[Path], folder: Path, max_bytes: int, metadata: dict[str, str]) -> list[Path]:
    """Copy every tensor of the safetensors files `sources` (a name in two of them is an error) into `folder` as
    model.safetensors, or, when they hold more than `max_bytes`, as model-0000i-of-0000n.safetensors (tensors
    in name order, each shard at most `max_bytes` unless one tensor alone is bigger) with model.safetensors.index.json.
    Returns the files written."""
    entries = {}  # name → (source, data start, header entry)
    for src in sources:
        start, header = read_header(src)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in entries:
                raise ValueError(f"tensor {name} is in both {entries[name][0]} and {src}")
            entries[name] = (src, start, info)
    groups, size = [[]], 0
    for name in sorted(entries):
        n = _nbytes(entries[name][2])
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    paths = [folder / (SINGLE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
             for i in range(len(groups))]
    for path, names in zip(paths, groups, strict=True):
        _write_file(path, [(n, *entries[n]) for n in names], metadata)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(e[2]) for e in entries.values())},
                 "weight_map": {n: p.name for p, names in zip(paths, groups, strict=True) for n in names}}
        tmp = folder / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / INDEX)
    return paths


def _nbytes(info: dict) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


def _write_file(path: Path, tensors: list[tuple], metadata: dict[str, str]) -> None:
    """One safetensors file of `tensors` ((name, source file, source data start, header entry)), laid out as
    the safetensors writer does: bigger elements first (so every tensor is aligned), then by name; the header
    padded with spaces to 8 bytes."""
    tensors = sorted(tensors, key=lambda t: (-_ITEMSIZE.get(t[3]["dtype"], 1), t[0]))
    header, at = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for name, _src, _start, info in tensors:
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [at, at + _nbytes(info)]}
        at += _nbytes(info)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    sources: dict[Path, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for _name, src, start, info in tensors:
                f = sources.get(src) or sources.setdefault(src, open(src, "rb"))  # noqa: SIM115
                f.seek(start + info["data_offsets"][0])
                left = _nbytes(info)
                while left:
                    chunk = f.read(min(left, 1 << 26))
                    if not chunk:
                        raise CompotError(f"{src} is truncated")
                    out.write(chunk)
                    left -= len(chunk)
    finally:
        for f in sources.values():
            f.close()
