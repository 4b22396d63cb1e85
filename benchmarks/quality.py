"""Quality vs bytes on all-MiniLM-L6-v2: every method × allocation at several ratios, in one run.

    python benchmarks/quality.py [--ratios 0.2,0.3,0.4,0.5] [--methods compot,svd-llm,cospadi]
                                 [--allocations uniform,dynamic,mckp] [--out benchmarks/results]

Each configuration runs the full `compress` (load, calibrate, allocate, factorize, save) and is timed end to end;
the saved folder is then loaded back and evaluated on held-out sentences (never the calibration text):
mean / min cosine of mean-pooled embeddings against the uncompressed model, Spearman correlation of pairwise
similarities, and the byte ratio read from the saved safetensors file. Writes quality.json and quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--methods", default="compot,svd-llm,cospadi")
    ap.add_argument("--allocations", default="uniform,dynamic,mckp")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--heldout", default=str(HERE / "data" / "heldout_en.txt"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import torch

    import compot_deploy
    from compot_deploy.config import AllocationConfig, CompressConfig, FactorizeConfig
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import default_model_dir, load_model

    torch.manual_seed(0)
    model_dir = args.model or str(default_model_dir())
    texts = [ln for ln in Path(args.heldout).read_text().splitlines() if ln.strip()]
    orig, tok = load_model(model_dir)
    ref = mean_pooled_embeddings(orig, tok, texts)
    del orig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in [float(x) for x in args.ratios.split(",")]:
            for alloc in args.allocations.split(","):
                for method in args.methods.split(","):
                    cfg = CompressConfig(allocation=AllocationConfig(strategy=alloc, ratio=r),
                                         factorize=FactorizeConfig(method=method))
                    out = Path(tmp) / f"{method}-{alloc}-{r}"
                    t0 = time.perf_counter()
                    rep = compot_deploy.compress(model_dir, out, cfg, progress=False)
                    wall = time.perf_counter() - t0
                    q = embedding_agreement(ref, mean_pooled_embeddings(compot_deploy.load(out), tok, texts))
                    row = {"ratio": r, "allocation": alloc, "method": method,
                           "file_ratio": rep["linears"]["file_ratio"], "planned_ratio": rep["linears"]["planned_ratio"],
                           "model_file_ratio": rep["model_file"]["ratio"], **q, "wall_s": wall,
                           "factorize_s": rep["timings"]["factorize"], "calibrate_s": rep["timings"]["calibrate"],
                           "allocate_s": rep["timings"]["allocate"]}
                    rows.append(row)
                    print(f"ratio {r:.2f} {alloc:8s} {method:8s} file_ratio {row['file_ratio']:.4f} "
                          f"cos {q['mean_cosine']:.4f} (min {q['min_cosine']:.4f}) rho {q['pairwise_spearman']:.4f} "
                          f"{wall:6.1f}s", flush=True)

    result = {
        "model": model_dir,
        "heldout": args.heldout,
        "heldout_sentences": len(texts),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "compot_deploy": compot_deploy.__version__, "cpu": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads()},
        "rows": rows,
        "comparisons": comparisons(rows),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "quality.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def comparisons(rows: list[dict]) -> list[dict]:
    """COMPOT against SVD-LLM at equal bytes (same ratio and allocation): cosine gap and time ratio."""
    by = {(r["ratio"], r["allocation"], r["method"]): r for r in rows}
    out = []
    for (ratio, alloc, method), c in sorted(by.items()):
        s = by.get((ratio, alloc, "svd-llm"))
        if method != "compot" or s is None:
            continue
        d = by.get((ratio, alloc, "cospadi"))
        out.append({"ratio": ratio, "allocation": alloc,
                    "cosine_gain_vs_svd_llm": c["mean_cosine"] - s["mean_cosine"],
                    "time_ratio_vs_svd_llm": c["wall_s"] / s["wall_s"],
                    "cospadi_time_ratio_vs_svd_llm": d["wall_s"] / s["wall_s"] if d else None,
                    "cospadi_cosine": d["mean_cosine"] if d else None})
    return out


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# Quality vs bytes — all-MiniLM-L6-v2",
        "",
        f"Held-out: {res['heldout_sentences']} sentences. Mean-pooled embeddings vs the uncompressed model. "
        f"Byte ratios read from the saved files (float16 storage, bytes removed from the compressed linears). "
        f"torch {env['torch']}, {env['threads']} threads, compot-deploy {env['compot_deploy']}.",
        "",
        "| ratio | allocation | method | file ratio | mean cos | min cos | pairwise ρ | wall s | factorize s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['ratio']:.2f} | {r['allocation']} | {r['method']} | {r['file_ratio']:.4f} | "
                     f"{r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['pairwise_spearman']:.4f} | "
                     f"{r['wall_s']:.1f} | {r['factorize_s']:.1f} |")
    lines += ["", "## COMPOT vs SVD-LLM at equal bytes", "",
              "| ratio | allocation | COMPOT − SVD-LLM mean cos | COMPOT / SVD-LLM wall time | CoSpaDi / SVD-LLM wall time "
              "| CoSpaDi mean cos |", "|---:|---|---:|---:|---:|---:|"]
    for c in res["comparisons"]:
        cd = "—" if c["cospadi_time_ratio_vs_svd_llm"] is None else f"{c['cospadi_time_ratio_vs_svd_llm']:.2f}"
        cc = "—" if c["cospadi_cosine"] is None else f"{c['cospadi_cosine']:.4f}"
        verdict = "" if c["cosine_gain_vs_svd_llm"] > 0 else " (SVD-LLM better)"
        lines.append(f"| {c['ratio']:.2f} | {c['allocation']} | {c['cosine_gain_vs_svd_llm']:+.4f}{verdict} | "
                     f"{c['time_ratio_vs_svd_llm']:.2f} | {cd} | {cc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
