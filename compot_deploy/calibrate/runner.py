"""The one block-by-block walk over a transformer: per-linear input Grams XᵀX (float64, padding excluded), and a
step run on each block once its Grams are known.

Only one block's input activations (and its outputs) are held at a time: the inputs of block 0, and how the
stack calls every block (masks, position embeddings and biases, which may differ per block), are captured once
in forward passes that stop at the last block needed (a lazily loaded model's blocks stay in its checkpoint
meanwhile and are read one at a time as the walk reaches them, see streaming.py); then each block is run on its inputs, its linears' Grams
accumulated by forward hooks, the step runs, and the block's outputs (recomputed when the step replaced its
modules) become the inputs of the next block. An encoder-decoder's walk goes through its encoder's blocks, then
its decoder's, whose first block's inputs and cross-attention inputs are the captured ones: a sequential walk
(steps that replace modules) calibrates the decoder on the original encoder's outputs. Every tensor lives where
the model does (the CPU today); Grams are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import CompotError
from ..models import Target, encoder_decoder, find_stacks, output_mask

@dataclass
class Gram:
    """G = XᵀX: (d_in, d_in) float64 over n real tokens."""

    G: Any
    n: int


class GramStore:
    """Square float64 matrices per target — Grams, or what a later stage needs of them (their Cholesky factors) —
    kept on disk (raw files in `folder`) from the walk that makes them to the stage that reads them, so none
    outlives its block in memory. Targets that share one object (q/k/v) share a file."""

    def __init__(self, folder):
        from pathlib import Path

        self.folder = Path(folder)
        self.files: dict[str, tuple] = {}  # name → (path, d_in, n)
        self._by_object: dict[int, tuple] = {}

    def put(self, block_grams: dict[str, Gram]) -> None:
        """Write one block's Grams (name → Gram)."""
        self._by_object.clear()  # ids are only unique among live objects: one block at a time
        for name, g in block_grams.items():
            if id(g) not in self._by_object:
                path = self.folder / f"{len(self.files):05d}.f64"
                g.G.contiguous().numpy().tofile(path)
                self._by_object[id(g)] = (path, g.G.shape[0], g.n)
            self.files[name] = self._by_object[id(g)]

    def get(self, name: str) -> Gram:
        """Read target `name`'s Gram back (no memory map: its pages would count as resident on top of the copy)."""
        import numpy as np
        import torch

        path, d, n = self.files[name]
        return Gram(G=torch.from_numpy(np.fromfile(path, dtype=np.float64).reshape(d, d)), n=n)

    def key(self, name: str):
        """What identifies target `name`'s Gram: targets that share one share it."""
        return self.files[name][0]

    @property
    def rows(self) -> dict[str, int]:
        """name → tokens its Gram summed over."""
        return {name: n for name, (_, _, n) in self.files.items()}


@dataclass
class _BlockCall:
    args: tuple
    kwargs: dict


class _Captured(Exception):
    pass


def _passthrough(*args, **kwargs):
    """A block's forward during the capture of a lazily loaded model: its hidden states, unchanged."""
    return args[0] if args else kwargs["hidden_states"]


def _capture_block_calls(model, blocks: list, names: list[str], firsts: set[int], batches,
                         encoder=None) -> tuple[list, list]:
    """calls[i][j]: how its stack calls blocks[i] on batch j, hooked in forward passes of the model that stop at
    the last of `blocks`. What a stack passes besides the hidden states may differ per block (Gemma2/3 give sliding
    and global blocks different masks; T5's first block computes the relative position bias that the others reuse;
    a decoder's blocks get the encoder's outputs), so each block gets its own call; the tensors blocks share stay
    shared. Only the first block of each stack (`firsts`) keeps its hidden states: the walk computes the others.
    Also returns, per batch, the output of the module `encoder` when given (the tensor cross-attention reads).

    A lazily loaded model (streaming.py) keeps its blocks (named `names`) in the checkpoint meanwhile when its first
    block returns bare hidden states: then every block passes its inputs through unchanged, the stack computing
    nothing else from them; otherwise (blocks that hand the next one more than hidden states) the blocks walked are
    read for the capture."""
    import contextlib

    import torch

    from ..streaming import outside_blocks, resident, weights_of

    last = len(blocks) - 1
    calls: list[list[_BlockCall]] = [[] for _ in blocks]

    def hook_of(i):
        def hook(_mod, args, kwargs):
            args, kwargs = tuple(args), dict(kwargs)
            if i not in firsts:  # drop the hidden states (the walk recomputes them), keep the position of the argument
                args, kwargs = ((None,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": None})
            calls[i].append(_BlockCall(args=args, kwargs=kwargs))
            if i == last:
                raise _Captured

        return hook

    encoded: list = []

    def keep_encoded(_mod, _args, out):
        encoded.append(out[0])

    lazy = weights_of(model) is not None
    with contextlib.ExitStack() as resident_blocks:
        resident_blocks.enter_context(outside_blocks(model, [s.blocks for s in find_stacks(model)]))
        stand_in = lazy and _returns_bare_hidden(model, blocks[0], names[0], batches[0])
        for block, name in zip(blocks, names, strict=True):
            if stand_in:
                block.forward = _passthrough
            elif lazy:
                resident_blocks.enter_context(resident(model, block, name))
        handles = [blocks[i].register_forward_pre_hook(hook_of(i), with_kwargs=True) for i in range(last + 1)]
        if encoder is not None:
            handles.append(encoder.register_forward_hook(keep_encoded))
        try:
            with torch.no_grad():
                for b in batches:
                    _forward_until_captured(model, b)
        finally:
            for h in handles:
                h.remove()
            if stand_in:
                for block in blocks:
                    del block.forward
    if any(len(c) != len(batches) for c in calls):
        raise CompotError("could not capture the inputs of every transformer block")
    return calls, encoded


def _returns_bare_hidden(model, block, name: str, batch: dict) -> bool:
    """Whether `block` (read into memory for the probe) returns a bare tensor, in a forward pass on `batch` that
    stops after it."""
    import torch

    from ..streaming import resident

    kinds = []

    def hook(_mod, _args, out):
        kinds.append(isinstance(out, torch.Tensor))
        raise _Captured

    with resident(model, block, name), torch.no_grad():
        handle = block.register_forward_hook(hook)
        try:
            _forward_until_captured(model, batch)
        finally:
            handle.remove()
    return bool(kinds) and kinds[0]


def _forward_until_captured(model, batch: dict) -> None:
    """model(**batch) without a KV cache, stopped by a hook that raises _Captured (or run to the end)."""
    import inspect

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        model(**batch, **extra)
    except _Captured:
        pass


def _hidden_of(call: _BlockCall):
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _run_block(block, call: _BlockCall, hidden):
    if call.args:
        out = block(hidden, *call.args[1:], **call.kwargs)
    else:
        out = block(**{**call.kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def token_rows(x, mask):
    """Rows of x: (b, t, d) at real (unpadded) positions (mask: (b, t); None: every position) → (n, d)."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _accumulate(gram: Gram, x, mask) -> None:
    """gram += the Gram of x: (b, t, d) at its real tokens (mask: (b, t)), in float64."""
    import torch

    rows = token_rows(x.detach(), mask).to(torch.float64)
    gram.G.addmm_(rows.T, rows)
    gram.n += rows.shape[0]


@dataclass
class _GramHooks:
    """Forward pre-hooks accumulating the Gram of each target's inputs over the block's calls. Targets fed the very
    same tensor (q/k/v; gate/up) share one Gram object, accumulated once: set new_call() before each call."""

    block: Any
    prefix: str
    targets: list[Target]
    grams: dict = field(default_factory=dict)
    mask: Any = None
    encoded: Any = None  # the encoder's output: cross-attention's keys and values read it, at its own tokens
    encoded_mask: Any = None

    def __enter__(self):
        self._handles, self._seen, self._calls, self._alias = [], [], 0, {}
        for t in self.targets:
            mod = self.block.get_submodule(t.name[len(self.prefix) + 1 :])
            self._handles.append(mod.register_forward_pre_hook(lambda _m, args, t=t: self._hook(t, args[0])))
        return self

    def new_call(self, mask) -> None:
        self.mask, self._seen = mask, []
        self._calls += 1

    def _hook(self, t: Target, x) -> None:
        import torch

        owner = next((name for seen, name in self._seen if seen is x), None)
        if t.name in self._alias:  # its owner accumulated this very input already
            if owner != self._alias[t.name]:
                raise CompotError(f"{t.name} read {self._alias[t.name]}'s input on the first call, not on a later one")
            return
        if owner is not None and self._calls == 1 and t.name not in self.grams:
            self._alias[t.name] = owner  # first call: the owner's Gram is this target's from now on
            self.grams[t.name] = self.grams[owner]
            return
        if t.name not in self.grams:
            self.grams[t.name] = Gram(G=torch.zeros(t.d_in, t.d_in, dtype=torch.float64), n=0)
        self._seen.append((x, t.name))
        cross = self.encoded is not None and x is self.encoded
        _accumulate(self.grams[t.name], x, self.encoded_mask if cross else self.mask)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc):
        self.close()


BlockStep = Callable[[int, dict[str, "Gram"]], bool]
Observer = Callable[[int, list, list], None]


def run_blocks(model, batches: list[dict], targets: list[Target], step: BlockStep, desc: str,
               progress: bool = True, observe: Observer | None = None, last: int | None = None) -> None:
    """Walk the blocks of `model` on `batches` up to the last block holding a target (or up to block `last`).

    step(i, grams) runs on each block i that holds targets, with the Grams of their inputs (name → Gram), before
    the block's outputs feed block i+1; when it returns True (it replaced modules of block i) the outputs are
    recomputed with the new block. observe(i, hidden, masks), when given, sees the inputs of every block i walked
    (one (b, t, d) tensor per batch, and the (b, t) masks of their real tokens), and at i = last + 1 the outputs of
    the last. One progress bar, `desc`, counts the blocks.
    """
    import torch

    from ..progress import bar as progress_bar
    from ..streaming import resident

    stacks = find_stacks(model)
    if observe is not None and len(stacks) > 1:
        raise CompotError("observing the hidden states between blocks works on one-stack models")
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    last = max(by_block) if last is None else last
    walk = [(s, j) for s in stacks for j in range(len(s.blocks))][: last + 1]  # (stack, index in it), in order
    ed = encoder_decoder(model)
    block_calls, encoded = _capture_block_calls(model, [s.blocks[j] for s, j in walk],
                                                [f"{s.prefix}.{j}" if s.prefix else str(j) for s, j in walk],
                                                {s.offset for s in stacks}, batches, ed[0] if ed and last >= stacks[1].offset else None)
    enc_masks = [b["attention_mask"].bool() if "attention_mask" in b else None for b in batches] if ed else None
    with torch.no_grad(), progress_bar(total=last + 1, desc=desc, unit="block", progress=progress) as bar:
        for i, (stack, j) in enumerate(walk):
            if j == 0:  # a stack's first block: its inputs as captured, its tokens' mask (b, t), the same in every block
                hidden = [_hidden_of(c) for c in block_calls[i]]
                masks = [_stack_mask(b, stack.mask_key, h) for b, h in zip(batches, hidden, strict=True)]
            if observe is not None:
                observe(i, hidden, masks)
            block, calls = stack.blocks[j], block_calls[i]
            prefix = f"{stack.prefix}.{j}" if stack.prefix else str(j)
            with resident(model, block, prefix), _GramHooks(block, prefix, by_block.get(i, [])) as hooks:
                outs = []
                for k, (c, h, m) in enumerate(zip(calls, hidden, masks)):
                    hooks.new_call(m)
                    if stack.offset:  # a decoder's block
                        hooks.encoded, hooks.encoded_mask = encoded[k], enc_masks[k]
                    outs.append(_run_block(block, c, h))
                hooks.close()
                if hooks.grams and step(i, hooks.grams) and i < last:
                    outs = [_run_block(block, c, h) for c, h in zip(calls, hidden)]
            hidden = outs
            bar.update()
    if observe is not None:
        observe(last + 1, hidden, masks)


def _stack_mask(batch: dict, key: str, hidden):
    """The (b, t) bool mask of a stack's real tokens: batch[key], else every position of `hidden`: (b, t, d)."""
    import torch

    m = batch.get(key)
    return m.bool() if m is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)


def calibrate(model, batches: list[dict], targets: list[Target], progress: bool = True) -> dict[str, "Gram"]:
    """The Grams of every target's inputs on the unchanged model (a walk whose step only keeps them)."""
    grams: dict[str, Gram] = {}

    def keep(_i, block_grams):
        grams.update(block_grams)
        return False

    run_blocks(model, batches, targets, keep, "calibrate", progress)
    return grams


def input_gram(model, module, batches: list[dict], desc: str = "head Gram", progress: bool = True) -> Gram:
    """The Gram of `module`'s inputs (real tokens only) over forward passes of `model` on `batches`, each stopped
    as soon as `module` is reached (an LM head's own product over the vocabulary is never computed)."""
    import torch

    from ..progress import bar as progress_bar

    d_in = module.weight.shape[1]
    gram = Gram(G=torch.zeros(d_in, d_in, dtype=torch.float64), n=0)
    mask = None

    def hook(_m, args):
        _accumulate(gram, args[0], mask)
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), progress_bar(total=len(batches), desc=desc, unit="batch", progress=progress) as bar:
            for b in batches:
                mask = output_mask(b)
                _forward_until_captured(model, b)
                bar.update()
    finally:
        handle.remove()
    if gram.n == 0:
        raise CompotError(f"{desc}: the model never called the module")
    return gram
