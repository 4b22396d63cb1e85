"""A model whose transformer blocks stay in their checkpoint until the block-by-block walk needs them.

`load_lazy` builds the model with every parameter on the meta device (no memory), then reads from the
checkpoint's safetensors (memory-mapped) only what lies outside the blocks and is used before them (embeddings,
norms); an LM head that is not tied stays on meta too. The walk (calibrate/runner.py) brings one block at a
time into float32 memory (`BlockWeights.load`) and hands it back (`release`) when done with it: a release drops
what was read from the checkpoint, so a compressed module the walk put in its place stays. `load_rest` reads
everything still on meta, for the stages that need the whole model (saving, the joint allocator).

Buffers (rotary frequencies, embedding scales) are built as usual: only parameters go to meta.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from pathlib import Path

from .errors import CompotError

INDEX = "model.safetensors.index.json"


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def checkpoint_files(model_dir: Path) -> dict[str, Path] | None:
    """Tensor name → the safetensors file holding it (one model.safetensors, or the shards of an index); None
    when the folder has neither."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return None
    return {k: single for k in read_header(single)[1] if k != "__metadata__"}


def check_sizes(files: dict[str, Path]) -> None:
    """Fail now, not blocks later, when a checkpoint file is shorter than its header says."""
    for path in set(files.values()):
        start, header = read_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if start + end > path.stat().st_size:
            raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated "
                              f"({path.stat().st_size:,} of {start + end:,} bytes)")


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file; a clear error for one that is not."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return 8 + n, json.loads(f.read(n))
    except (struct.error, ValueError, OSError) as e:
        raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is not a safetensors file "
                          f"({str(e).splitlines()[0]})") from None


def read_tensor(path: Path, key: str, headers: dict):
    """Tensor `key` of the safetensors file `path`, read straight into memory (no memory map: a mapped file's
    touched pages would count in the process's resident memory on top of the copy), in float32."""

    import torch

    if path not in headers:
        headers[path] = read_header(path)
    start, header = headers[path]
    info = header[key]
    if start + info["data_offsets"][1] > path.stat().st_size:
        raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated at {key}")
    if info["dtype"] not in _DTYPES:
        raise CompotError(f"{key}: tensors of dtype {info['dtype']} cannot be read block by block")
    lo, hi = info["data_offsets"]
    raw = torch.empty(hi - lo, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start + lo)
        if f.readinto(raw.numpy()) != hi - lo:
            raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated at {key}")
    return raw.view(getattr(torch, _DTYPES[info["dtype"]])).reshape(info["shape"]).to(torch.float32)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside the block is moved to the meta device as it is registered (its
    initialisation then touches no memory); buffers are built as usual."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class BlockWeights:
    """Reads a lazily built model's parameters from its checkpoint, one module at a time, in float32."""

    def __init__(self, model, files: dict[str, Path], alias: dict[str, str] | None = None):
        self.model = model
        self.files = files
        self.alias = alias or {}  # a tied parameter's other names → the name the checkpoint holds it under
        self._headers: dict[Path, tuple] = {}
        self._read: dict[int, object] = {}  # id → weak reference of each parameter read from the checkpoint
        self.round_dtype: str | None = None  # round what is read through this storage dtype (layers.round_to)

    def _tensor(self, key: str):
        import torch

        t = read_tensor(self.files[key], key, self._headers)
        if not all(torch.isfinite(c).all() for c in t.view(-1).split(1 << 22)):  # in chunks: no full-size temporary
            raise CompotError(f"weight {key} contains NaN/Inf")
        if self.round_dtype is not None:
            from .layers import round_to

            t = round_to(t, self.round_dtype)
        return t

    def load(self, module, prefix: str, recurse: bool = True) -> int:
        """Read every parameter of `module` (named `prefix`.…; its submodules' too unless `recurse` is False) that
        is still on meta; returns how many."""
        from torch import nn

        count = 0
        for name, sub in module.named_modules() if recurse else [("", module)]:
            for pname, p in list(sub._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                key = ".".join(x for x in (prefix, name, pname) if x)
                key = self.alias.get(key, key)
                if key not in self.files:
                    raise CompotError(f"{key} is not in the checkpoint")
                new = nn.Parameter(self._tensor(key), requires_grad=False)
                sub._parameters[pname] = new
                self._read[id(new)] = weakref.ref(new)
                count += 1
        return count

    def release(self, module) -> None:
        """Put back on meta every parameter of `module` that was read from the checkpoint and is still there."""
        from torch import nn

        for sub in module.modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and self._was_read(p):
                    del self._read[id(p)]
                    sub._parameters[pname] = nn.Parameter(p.detach().to("meta"), requires_grad=False)

    def _was_read(self, p) -> bool:
        ref = self._read.get(id(p))  # an id alone could be a freed parameter's, reused
        return ref is not None and ref() is p

    def load_rest(self) -> None:
        """Read every parameter of the model still on meta (tied ones once, through the module that owns them)."""
        if self.load(self.model, ""):
            self.model.tie_weights()


def weights_of(model) -> BlockWeights | None:
    """The BlockWeights of a lazily loaded model; None for a model that is all in memory."""
    return getattr(model, "_compot_weights", None)


@contextlib.contextmanager
def resident(model, block, prefix: str):
    """`block` (named `prefix`) of a lazily loaded model read into memory for the duration; what was read from
    the checkpoint goes back to meta after (what replaced it stays). A no-op for a model all in memory."""
    w = weights_of(model)
    if w is None:
        yield
        return
    w.load(block, prefix)
    try:
        yield
    finally:
        w.release(block)


def load_rest(model) -> None:
    """Make a lazily loaded model whole in memory (a no-op for one that is)."""
    w = weights_of(model)
    if w is not None:
        w.load_rest()


def load_lazy(model_dir: str | os.PathLike, config, model_cls):
    """`model_cls` built from `config` with its blocks left in the checkpoint of `model_dir` (see the module
    doc); None where that cannot be done exactly (no safetensors, an encoder-decoder, checkpoint names that do
    not match the model's): the caller loads the model whole."""
    import torch

    from .models import encoder_decoder, find_stacks

    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    if files is None:
        return None
    check_sizes(files)
    with _parameters_on_meta():
        model = model_cls._from_config(config, dtype=torch.float32)
    model.eval()
    if encoder_decoder(model) is not None:
        return None
    names: dict[int, list[str]] = {}  # each parameter object's names (tied ones have several)
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    alias = {}
    for group in names.values():
        stored = [n for n in group if n in files]
        if not stored:
            return None
        alias.update({n: stored[0] for n in group if n not in files})
    stack = find_stacks(model)[0]
    weights = BlockWeights(model, files, alias)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(m) for m in stack.blocks.modules()} | ({id(m) for m in head.modules()} if head is not None else set())
    for name, mod in model.named_modules():
        if id(mod) not in skip:
            weights.load(mod, name, recurse=False)
    model.tie_weights()
    model._compot_weights = weights
    return model

