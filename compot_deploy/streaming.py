"""A model whose transformer blocks stay in their checkpoint until the block-by-block walk needs them.

`load_lazy` builds the model with every parameter on the meta device (no memory). The walk
(calibrate/runner.py) reads what lies outside the blocks (embeddings, norms; float32 tables memory-mapped, so
only the rows looked up count; an untied LM head never) for the forward passes that capture how blocks are
called (`outside_blocks`), then brings one block at a time into float32 memory (`resident`) and hands it back
when done with it: a release drops what was read from the checkpoint, so a compressed module the walk put in its
place stays. `load_rest` reads everything still on meta, for the stages that need the whole model (saving reads
it straight into the storage dtype).

Buffers (rotary frequencies, embedding scales) are built as usual: only parameters go to meta.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path

from .errors import CompotError
from .storage.shards import read_header
from .storage.shards import weight_files as checkpoint_files

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def check_sizes(files: dict[str, Path]) -> None:
    """Fail now, not blocks later, when a checkpoint file is shorter than its header says."""
    for path in set(files.values()):
        start, header = read_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if start + end > path.stat().st_size:
            raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated "
                              f"({path.stat().st_size:,} of {start + end:,} bytes)")


def read_tensor(path: Path, key: str, headers: dict, dtype: str = "float32", round_dtype: str | None = None,
                mmap: bool = False, check: bool = True):
    """Tensor `key` of the safetensors file `path` as `dtype` (through `round_dtype` first, when given; layers.round_to).

    Read a chunk at a time into the result (no full-size temporary, no memory map: a mapped file's touched pages
    count as resident), its values checked finite on the way; mmap: a float32 tensor wanted as float32 is mapped
    copy-on-write instead, so only the pages used count (an embedding table: the rows looked up). check=False
    skips the finiteness check (a tensor read before)."""
    import numpy as np
    import torch

    if path not in headers:
        headers[path] = read_header(path)
    start, header = headers[path]
    info = header[key]
    if info["dtype"] not in _DTYPES:
        raise CompotError(f"{key}: tensors of dtype {info['dtype']} cannot be read block by block")
    lo, hi = info["data_offsets"]
    if start + hi > path.stat().st_size:
        raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated at {key}")
    stored = getattr(torch, _DTYPES[info["dtype"]])
    direct = mmap and info["dtype"] == "F32" and dtype == "float32" and round_dtype is None and hi > lo
    out = None if direct else torch.empty(info["shape"], dtype=getattr(torch, dtype))
    flat = None if direct else out.view(-1)
    done, step = 0, 1 << 26  # bytes per chunk
    if direct and not check:  # mapped, and found finite before: nothing to read
        done = hi - lo
    with open(path, "rb") as f:
        f.seek(start + lo)
        while done < hi - lo:
            raw = torch.empty(min(step, hi - lo - done), dtype=torch.uint8)
            if f.readinto(raw.numpy()) != raw.numel():
                raise CompotError(f"cannot load a transformer from {path.parent}: {path.name} is truncated at {key}")
            chunk = raw.view(stored)
            if check and not torch.isfinite(chunk).all():
                raise CompotError(f"weight {key} contains NaN/Inf")
            if flat is not None:
                n = chunk.numel()
                if round_dtype is not None:
                    chunk = chunk.to(getattr(torch, round_dtype))
                at = done // stored.itemsize
                flat[at : at + n].copy_(chunk)
            done += raw.numel()
    if direct:
        mapped = np.memmap(path, dtype=np.float32, mode="c", offset=start + lo, shape=tuple(info["shape"]))
        return torch.from_numpy(mapped)
    return out


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


def _qualified(*parts: str) -> str:
    """A parameter's checkpoint name from its module's prefix, the submodule's name in it and its own."""
    return ".".join(x for x in parts if x)


class BlockWeights:
    """Reads a lazily built model's parameters from its checkpoint, one module at a time, in float32."""

    def __init__(self, model, files: dict[str, Path], alias: dict[str, str] | None = None):
        self.model = model
        self.files = files
        self.alias = alias or {}  # a tied parameter's other names → the name the checkpoint holds it under
        self._headers: dict[Path, tuple] = {}
        self._checked: set[str] = set()  # tensors already found finite
        self._read: dict[int, object] = {}  # id → weak reference of each parameter read from the checkpoint
        self.round_dtype: str | None = None  # round what is read through this storage dtype (layers.round_to)

    def load(self, module, prefix: str, recurse: bool = True, dtype: str = "float32", mmap: bool = False,
             skip=()) -> int:
        """Read every parameter of `module` (named `prefix`.…; its submodules' too unless `recurse` is False) that
        is still on meta, as `dtype` (read_tensor; mmap there), but those of the modules in `skip`; returns how
        many. A parameter that several modules share (tied) is read once and set in each."""
        from torch import nn

        done: dict[int, nn.Parameter] = {}
        skipped = {id(m) for s in skip for m in s.modules()}
        for name, sub in module.named_modules() if recurse else [("", module)]:
            if id(sub) in skipped:
                continue
            for pname, p in list(sub._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                if id(p) not in done:
                    key = _qualified(prefix, name, pname)
                    key = self.alias.get(key, key)
                    if key not in self.files:
                        raise CompotError(f"{key} is not in the checkpoint")
                    t = read_tensor(self.files[key], key, self._headers, dtype, self.round_dtype, mmap,
                                    check=key not in self._checked)
                    self._checked.add(key)
                    done[id(p)] = nn.Parameter(t, requires_grad=False)
                    self._read[id(done[id(p)])] = weakref.ref(done[id(p)])
                sub._parameters[pname] = done[id(p)]
        return len(done)

    def release(self, module, skip=()) -> None:
        """Put back on meta every parameter of `module` (but of the modules in `skip`) that was read from the
        checkpoint and is still there (in every module sharing it)."""
        from torch import nn

        done: dict[int, nn.Parameter] = {}
        skipped = {id(m) for s in skip for m in s.modules()}
        for sub in module.modules():
            if id(sub) in skipped:
                continue
            for pname, p in list(sub._parameters.items()):
                if p is not None and (id(p) in done or self._was_read(p)):
                    if id(p) not in done:
                        del self._read[id(p)]
                        done[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
                    sub._parameters[pname] = done[id(p)]

    def _was_read(self, p) -> bool:
        ref = self._read.get(id(p))  # an id alone could be a freed parameter's, reused
        return ref is not None and ref() is p

    def store(self, module, prefix: str, path: Path) -> None:
        """`module`'s parameters (named `prefix`.…) are now held by the safetensors file `path` (written from
        them): put them on meta, to be read from there if needed again. Buffers stay."""
        from torch import nn

        for name, sub in module.named_modules():
            for pname, p in list(sub._parameters.items()):
                if p is None:
                    continue
                key = _qualified(prefix, name, pname)
                self.files[key] = Path(path)
                self.alias.pop(key, None)
                self._checked.add(key)  # written from finite values, or as they were
                self._read.pop(id(p), None)
                sub._parameters[pname] = nn.Parameter(p.detach().to("meta"), requires_grad=False)

    def load_rest(self, dtype: str = "float32") -> None:
        """Read every parameter of the model still on meta, as `dtype` (the storage dtype when saving: read
        straight into it, no float32 copy)."""
        self.load(self.model, "", dtype=dtype)


def weights_of(model) -> BlockWeights | None:
    """The BlockWeights of a lazily loaded model; None for a model that is all in memory."""
    return getattr(model, "_compot_weights", None)


def weights_for(model) -> BlockWeights:
    """The BlockWeights of `model`, an empty one for a model all in memory (then only what `store` hands to a
    file is read back from there)."""
    if weights_of(model) is None:
        model._compot_weights = BlockWeights(model, {})
    return weights_of(model)


@contextlib.contextmanager
def detached(model, modules: dict[str, Path]):
    """Yield the files of those `modules` (qualified name → the safetensors file `store` wrote them to) whose
    parameters are all still only there, those modules taken out of the model for the duration (so saving or
    reading the rest of the model leaves them alone)."""
    from torch import nn

    from .models import set_module

    w, out = weights_of(model), {}
    for name, path in modules.items():
        mod = model.get_submodule(name)
        if w is not None and all(p.device.type == "meta" and w.files.get(n) == Path(path)
                                 for n, p in mod.named_parameters(prefix=name)):
            out[name] = mod
    for name in out:
        set_module(model, name, nn.Module())
    try:
        yield [modules[name] for name in out]
    finally:
        for name, mod in out.items():
            set_module(model, name, mod)


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
        trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op): a freed block's
    float32 weights and its solves' temporaries would otherwise stay resident until reused."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_rest(model, dtype: str = "float32") -> None:
    """Make a lazily loaded model whole in memory, what is read as `dtype` (a no-op for a model all in memory)."""
    w = weights_of(model)
    if w is not None:
        trim_heap()
        w.load_rest(dtype)


@contextlib.contextmanager
def outside_blocks(model, blocks):
    """The parameters of a lazily loaded model outside `blocks` (embeddings, norms: what a forward pass reads
    before them) in memory for the duration, an untied LM head left out; float32 tables are memory-mapped, so only
    the rows looked up count. A no-op for a model all in memory."""
    w = weights_of(model)
    if w is None:
        yield
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    untied = [head] if head is not None and (emb is None or head.weight is not emb.weight) else []
    w.load(model, "", mmap=True, skip=list(blocks) + untied)
    try:
        yield
    finally:
        w.release(model, skip=blocks)


def load_lazy(model_dir: str | os.PathLike, config, model_cls):
    """`model_cls` built from `config` with its blocks left in the checkpoint of `model_dir` (see the module
    doc); None where that cannot be done exactly (no safetensors, an encoder-decoder, checkpoint names that do
    not match the model's): the caller loads the model whole."""
    import torch

    from .models import encoder_decoder

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
    model._compot_weights = BlockWeights(model, files, alias)
    return model

