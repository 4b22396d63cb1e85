"""The prune step: ReplaceMe's training-free depth pruning on the block-by-block walk (maths in depth.py).

One walk measures every window's angular distance; the windows with the smallest go (greedy, never touching);
for each, in block order on the model already pruned before it, a second walk up to the window's end fits the
map that stands in for it, the map folds into the last kept block's MLP branch, and the window's blocks leave the
block list (config, per-layer config lists and the attention modules' layer indices follow). The result is a
normal transformers model with fewer layers.

Where the map folds: a pre-norm block whose MLP adds straight to the residual (Llama, Qwen, Mistral, Phi-3,
GPT-2, GPT-NeoX, ModernBERT) takes a full T into its output projection (W ← W·T). A norm after the MLP branch
(Gemma2/3's post-feedforward norm; the post-LN output norm of BERT and DistilBERT) takes a diagonal T (and for a
LayerNorm a shift) into its weight and bias; a full T would need a linear of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import PruneConfig
from ..errors import CompotError
from ..models import Target, find_blocks, find_targets, is_dense_linear, set_module
from .depth import MapStats, angular_distance_sum, choose_windows, diagonal_map, full_map, residual_fraction


@dataclass
class PruneResult:
    """What pruning removed. removed: original indices of the removed blocks; windows: per window its start (original
    index), size, distance, map and fit residuals; distances: every candidate start → mean distance;
    removed_targets / removed_other_params: the removed blocks' linears and their other parameters (norms)."""

    removed: list[int]
    windows: list[dict]
    distances: dict[int, float]
    removed_targets: list[Target] = field(default_factory=list)
    removed_other_params: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"removed_blocks": self.removed, "windows": self.windows,
                "distances": {str(a): d for a, d in self.distances.items()}, "seconds": self.seconds}


def _rows(h, mask, tokens: str):
    """Rows of h: (b, t, d) at real tokens ("all") or at each sample's last real token ("last") → (n, d)."""
    import torch

    if tokens == "all":
        return h[mask]
    last = (mask.long() * torch.arange(mask.shape[1])).argmax(1)  # right or left padding alike
    return h[torch.arange(h.shape[0]), last]


def window_distances(model, batches: list[dict], n: int, tokens: str = "all",
                     progress: bool = True) -> dict[int, float]:
    """start a → mean angular distance between the hidden states entering block a and leaving block a + n − 1,
    for every a ≥ 1 (block a − 1 must stay to hold the map)."""
    from ..calibrate.runner import run_blocks

    _, blocks = find_blocks(model)
    L = len(blocks)
    kept: dict[int, list] = {}
    sums: dict[int, float] = {}
    count = 0

    def observe(i, hidden, masks):
        nonlocal count
        rows = [_rows(h, m, tokens).float() for h, m in zip(hidden, masks, strict=True)]
        if i == 0:
            count = sum(r.shape[0] for r in rows)
        kept[i] = rows
        a = i - n
        if a >= 1:
            sums[a] = sum(angular_distance_sum(x, y) for x, y in zip(kept[a], rows, strict=True))
        kept.pop(a, None)

    run_blocks(model, batches, [], lambda *_: False, f"prune (distances, windows of {n})", progress,
               observe=observe, last=L - 1)
    return {a: s / max(count, 1) for a, s in sorted(sums.items())}


def mlp_branch(block):
    """(module, kind) making the MLP branch M of a block's output Y + M: kind "norm" when a norm closes the branch
    (its output is M), "mlp" when the MLP adds to the residual directly."""
    for attr in ("post_feedforward_layernorm", "output_layer_norm"):  # Gemma2/3; DistilBERT (post-LN)
        mod = getattr(block, attr, None)
        if mod is not None and hasattr(mod, "weight"):
            return mod, "norm"
    out = getattr(block, "output", None)
    if out is not None and hasattr(out, "LayerNorm"):  # BERT, RoBERTa, MiniLM (post-LN)
        return out.LayerNorm, "norm"
    for attr in ("mlp", "feed_forward", "ffn"):
        mod = getattr(block, attr, None)
        if mod is not None and any(is_dense_linear(m) for m in mod.modules()):
            return mod, "mlp"
    raise CompotError(f"cannot prune {type(block).__name__} blocks: no MLP branch found to hold the map")


def _fit_stats(model, batches: list[dict], a: int, n: int, progress: bool) -> MapStats:
    """Statistics of R = x_{a+n} − Y against M, block a − 1's MLP branch, over real tokens."""
    from ..calibrate.runner import run_blocks

    _, blocks = find_blocks(model)
    branch, _ = mlp_branch(blocks[a - 1])
    Ms: list = []
    hook = branch.register_forward_hook(lambda _m, _args, out: Ms.append(out[0] if isinstance(out, tuple) else out))
    Ys: list = []
    stats: MapStats | None = None

    def observe(i, hidden, masks):
        nonlocal stats
        if i == a - 1:  # the hook also saw the forward passes that captured the block calls
            Ms.clear()
        elif i == a:
            Ys.extend(h - M for h, M in zip(hidden, Ms, strict=True))
        elif i == a + n:
            stats = MapStats.zeros(hidden[0].shape[-1])
            for h, M, Y, m in zip(hidden, Ms, Ys, masks, strict=True):
                stats.add(M[m], (h - Y)[m])

    try:
        run_blocks(model, batches, [], lambda *_: False, f"prune (map of blocks {a}-{a + n - 1})", progress,
                   observe=observe, last=a + n - 1)
    finally:
        hook.remove()
    return stats


def _norm_offset(norm) -> float:
    """1.0 for norms that scale by (1 + weight) (Gemma), 0.0 for those that scale by weight."""
    import torch

    w = norm.weight.data.clone()
    b = norm.bias.data.clone() if getattr(norm, "bias", None) is not None else None
    try:
        norm.weight.data.zero_()
        if b is not None:
            norm.bias.data.zero_()
        with torch.no_grad():
            y = norm(torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)))
    finally:
        norm.weight.data.copy_(w)
        if b is not None:
            norm.bias.data.copy_(b)
    return 0.0 if float(y.abs().max()) < 1e-6 else 1.0


def fold_diagonal(norm, t, b) -> None:
    """norm's output y ← y·diag(t) + b, in its weight (and bias)."""
    import torch

    with torch.no_grad():
        off = _norm_offset(norm)
        w = norm.weight
        w.copy_(((off + w.double()) * t - off).to(w.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.double() * t + b).to(norm.bias.dtype))


def fold_full(mlp, T) -> None:
    """The MLP's output y ← y·T, in its last linear (the output projection). T: (d, d)."""
    import torch
    from torch import nn

    out = [m for m in mlp.modules() if is_dense_linear(m)][-1]
    with torch.no_grad():
        if isinstance(out, nn.Linear):  # weight is Wᵀ: (d_out, d_in)
            out.weight.copy_((T.T @ out.weight.double()).to(out.weight.dtype))
        else:  # Conv1D: weight is W
            out.weight.copy_((out.weight.double() @ T).to(out.weight.dtype))
        if out.bias is not None:
            out.bias.copy_((out.bias.double() @ T).to(out.bias.dtype))


def drop_blocks(model, start: int, n: int) -> None:
    """Remove blocks [start, start + n) from the model, its config's layer count and per-layer lists, and renumber
    the layer indices the attention modules use for the KV cache."""
    from torch import nn

    prefix, blocks = find_blocks(model)
    L = len(blocks)
    gone = range(start, start + n)
    kept = [b for i, b in enumerate(blocks) if i not in gone]
    set_module(model, prefix, nn.ModuleList(kept))
    cfg = model.config
    for key, val in list(vars(cfg).items()):
        if isinstance(val, list) and len(val) == L:  # per-layer settings (Gemma's layer_types, …)
            setattr(cfg, key, [v for i, v in enumerate(val) if i not in gone])
    cfg.num_hidden_layers = len(kept)
    for i, b in enumerate(kept):
        for m in b.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i


def replace_window(model, batches: list[dict], a: int, n: int, map_: str = "auto", ridge: float = 1e-4,
                   progress: bool = True) -> dict:
    """Remove blocks [a, a + n) of `model` in place, the map `map_` (PruneConfig.map) fitted on `batches` and
    folded into block a − 1's MLP branch; return the map's kind and the fit's unexplained fractions."""
    import torch

    branch, kind = mlp_branch(find_blocks(model)[1][a - 1])
    s = _fit_stats(model, batches, a, n, progress)
    entry = {"blocks": n, "residual_without_map": residual_fraction(s), "map": "none"}
    if map_ == "none":
        pass
    elif kind == "mlp" and map_ == "auto":
        T = full_map(s, ridge)
        fold_full(branch, T)
        entry.update(map="full", residual=residual_fraction(s, T=T))
    else:
        t, b = diagonal_map(s, bias=kind == "norm" and getattr(branch, "bias", None) is not None)
        if kind == "norm":
            fold_diagonal(branch, t, b)
        else:
            fold_full(branch, torch.diag(t))
        entry.update(map="diagonal", residual=residual_fraction(s, t=t, b=b))
    drop_blocks(model, a, n)
    return entry


def prune_model(model, batches: list[dict], cfg: PruneConfig, progress: bool = True) -> PruneResult:
    """Remove cfg.blocks blocks in cfg.windows windows from `model` in place (see the module docstring)."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    L, k = len(blocks), cfg.windows
    n = cfg.blocks // k
    if cfg.blocks % k or k * (n + 1) > L:
        raise CompotError(f"cannot remove {cfg.blocks} of {L} blocks in {k} separate windows of equal size "
                          f"(each window needs a kept block before it)")
    distances = window_distances(model, batches, n, cfg.tokens, progress)
    starts = choose_windows(distances, n, k)
    pre = f"{prefix}." if prefix else ""
    removed_targets = [t for t in find_targets(model) if any(a <= t.block < a + n for a in starts)]
    linear_params = sum(t.d_in * t.d_out + (t.d_out if t.bias else 0) for t in removed_targets)
    other = sum(p.numel() for a in starts for i in range(a, a + n) for p in blocks[i].parameters()
                if p.is_floating_point()) - linear_params
    result = PruneResult(removed=[i for a in starts for i in range(a, a + n)], windows=[], distances=distances,
                         removed_targets=removed_targets, removed_other_params=other)
    for j, a0 in enumerate(starts):
        entry = replace_window(model, batches, a0 - j * n, n, cfg.map, cfg.ridge, progress)  # earlier ones went
        entry.update(start=a0, distance=distances[a0], branch=f"{pre}{a0 - 1}")
        result.windows.append(entry)
    result.seconds = time.perf_counter() - t0
    return result
