"""Calibration: text → token batches → per-linear input Grams XᵀX (float64, padding excluded), block by block.

Only one block's input activations (and its outputs) are held at a time: the inputs of block 0 are captured
once, then each block is run on them, its linears' Grams accumulated by forward hooks, and its outputs become
the inputs of the next block.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .errors import CompotError
from .models import Target, find_blocks

log = logging.getLogger(__name__)

BUILTIN = "builtin"


def builtin_text() -> str:
    return resources.files("compot_deploy").joinpath("data/calibration_en.txt").read_text(encoding="utf-8")


def heldout_texts() -> list[str]:
    """119 English sentences never used for calibration: the evaluation text of `validate` and the benchmarks."""
    text = resources.files("compot_deploy").joinpath("data/heldout_en.txt").read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip()]


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CompotError(f"{path} looks like a saved `datasets` dataset but `datasets` is not installed") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise CompotError(f"dataset at {path} has no text column")
    col = "text" if "text" in cols else cols[0]
    return [t for t in ds[col] if t and t.strip()]


def load_texts(source: str | None) -> list[str]:
    """Documents from `source`: None/'builtin' (the packaged English corpus), a .txt file (one document per
    non-empty line), a .jsonl file (its "text" fields), a folder of .txt files, or a `datasets` dataset saved
    with save_to_disk."""
    if source in (None, BUILTIN):
        return [ln for ln in builtin_text().splitlines() if ln.strip()]
    p = Path(source)
    if not p.exists():
        raise CompotError(f"calibration source not found: {p}")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _dataset_texts(p)
        files = sorted(p.glob("*.txt"))
        if not files:
            raise CompotError(f"calibration folder {p} holds no .txt files and is not a saved dataset")
        return [ln for f in files for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        try:
            return [json.loads(ln)["text"] for ln in text.splitlines() if ln.strip()]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CompotError(f"{p}: every line of a .jsonl calibration file must be an object with a 'text' field")
    return [ln for ln in text.splitlines() if ln.strip()]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] … [SEP] for BERT, <bos> for Llama)."""
    bare = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def make_samples(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int, packing: bool = True) -> list[list[int]]:
    """Token-id samples of at most `seq_len` tokens, special tokens included.

    packing=True: all documents joined, cut into chunks of exactly seq_len tokens, `samples` of them picked
    at random (seeded). packing=False: one document per sample, truncated (padding is then excluded later).
    Raises CompotError when the text holds fewer tokens (or documents) than asked for.
    """
    prefix, suffix = special_tokens_around(tokenizer)
    n_special = len(prefix) + len(suffix)
    body = seq_len - n_special
    if body < 1:
        raise CompotError(f"seq_len {seq_len} leaves no room for the tokenizer's {n_special} special tokens")
    rng = random.Random(seed)
    if packing:
        ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
        n_chunks = len(ids) // body
        if n_chunks < samples:
            raise CompotError(
                f"calibration text has {len(ids)} tokens; {samples} samples x {seq_len} tokens need "
                f"{samples * body} (lower --samples/--seq-len or give more text)"
            )
        picks = sorted(rng.sample(range(n_chunks), samples))
        return [prefix + ids[i * body : (i + 1) * body] + suffix for i in picks]
    if len(texts) < samples:
        raise CompotError(f"calibration text has {len(texts)} documents; {samples} samples asked for")
    docs = rng.sample(texts, samples)
    out = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"][:body]
        out.append(prefix + ids + suffix)
    return out


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches {input_ids, attention_mask} of shape (b, t_max)."""
    import torch

    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        t = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@dataclass
class Gram:
    """G = XᵀX: (d_in, d_in) float64 over n real tokens."""

    G: Any
    n: int


@dataclass
class _BlockCall:
    args: tuple
    kwargs: dict
    mask: Any  # (b, t) bool


class _Captured(Exception):
    pass


def _capture_block_inputs(model, block0, batches) -> list[_BlockCall]:
    import inspect

    import torch

    calls: list[_BlockCall] = []

    def hook(_mod, args, kwargs):
        calls.append(_BlockCall(args=tuple(args), kwargs=dict(kwargs), mask=None))
        raise _Captured

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    model(**b, **extra)
                except _Captured:
                    pass
                calls[-1].mask = b["attention_mask"].bool()
    finally:
        h.remove()
    if len(calls) != len(batches):
        raise CompotError("could not capture the inputs of the first transformer block")
    return calls


def _hidden_of(call: _BlockCall):
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _run_block(block, call: _BlockCall, hidden):
    if call.args:
        out = block(hidden, *call.args[1:], **call.kwargs)
    else:
        out = block(**{**call.kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def _token_rows(x, mask):
    """Rows of x: (b, t, d) at real (unpadded) positions → (n, d)."""
    if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@dataclass
class _GramHooks:
    block: Any
    prefix: str
    targets: list[Target]
    grams: dict = field(default_factory=dict)
    mask: Any = None

    def __enter__(self):
        import torch

        self._handles = []
        for t in self.targets:
            mod = self.block.get_submodule(t.name[len(self.prefix) + 1 :])
            self.grams[t.name] = Gram(G=torch.zeros(t.d_in, t.d_in, dtype=torch.float64), n=0)

            def hook(_m, args, name=t.name):
                x = _token_rows(args[0].detach(), self.mask).to(torch.float64)
                g = self.grams[name]
                g.G.addmm_(x.T, x)
                g.n += x.shape[0]

            self._handles.append(mod.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def calibrate(
    model,
    batches: list[dict],
    targets: list[Target],
    on_block: Callable[[int, dict[str, Gram]], bool] | None = None,
    progress: bool = True,
) -> dict[str, Gram]:
    """Grams of every target's inputs, computed block by block.

    on_block(i, grams_of_block_i) runs after block i's Grams are known and before its outputs feed block i+1;
    if it returns True (it replaced modules of block i: sequential calibration), the outputs are recomputed
    with the new block. Returns all Grams (those handed to on_block included).
    """
    import torch
    from tqdm.auto import tqdm

    prefix, blocks = find_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    last = max(by_block)
    calls = _capture_block_inputs(model, blocks[0], batches)
    hidden = [_hidden_of(c) for c in calls]
    grams: dict[str, Gram] = {}
    bar = tqdm(range(last + 1), desc="calibrate", unit="block", disable=None if progress else True, leave=False)
    with torch.no_grad():
        for i in bar:
            block = blocks[i]
            with _GramHooks(block, f"{prefix}.{i}" if prefix else str(i), by_block.get(i, [])) as hooks:
                outs = []
                for c, h in zip(calls, hidden):
                    hooks.mask = c.mask
                    outs.append(_run_block(block, c, h))
            grams.update(hooks.grams)
            if on_block is not None and hooks.grams and on_block(i, hooks.grams) and i < last:
                outs = [_run_block(block, c, h) for c, h in zip(calls, hidden)]
            hidden = outs
    return grams
