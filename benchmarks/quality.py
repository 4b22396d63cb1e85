"""Quality vs bytes on all-MiniLM-L6-v2: every method × allocation at several ratios, in one run.

    python benchmarks/quality.py [--ratios 0.2,0.3,0.4,0.5] [--methods compot,svd-llm,rocket[,cospadi]]
                                 [--allocations uniform,dynamic,spectral,mckp] [--sections factorize,quantize]
                                 [--cospadi-iters N] [--out benchmarks/results]

Section `factorize`: COMPOT, SVD-LLM and ROCKET × every allocation at every ratio; CoSpaDi (K-SVD + OMP, when
--methods names it) with the dynamic allocation only (its mckp profile would be COMPOT's anyway): at its published T = 60 more than 31 min per
configuration on 2 cores (T = 3: 95–170 s), so `--cospadi-iters 3` rows (labelled T=3) stand in for it.
Section `iters` (not in the default run): COMPOT with 8 / 20 alternations, each with and without the closing
least-squares refit, dynamic allocation.
Section `allocation` (not in the default run): --methods (COMPOT and SVD-LLM) with --allocations spectral (COMPOT
paper) and dynamic (whitened-SVD knapsack), each with every per-layer cap of --caps: `default` (ratio + 0.1), `+x`
(ratio + x) or an absolute fraction.
Section `errorcap` (not in the default run): --methods with the knapsack allocations of --allocations (dynamic,
mckp) and each ROCKET-style per-layer error cap of --error-caps (--max-layer-error).
Section `quantize`: RTN vs GPTQ at 4 and 8 bits on the dense model and on COMPOT factors (ratio 0.3, dynamic), and
COMPOT at every ratio + GPTQ-4bit. Section `lowbit` (not in the default run): dense GPTQ at 2 bits, groups 32/128.

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
    ap.add_argument("--methods", default="compot,svd-llm,rocket",
                    help="factorizations; add cospadi (with --cospadi-iters: its published 60 takes hours here)")
    ap.add_argument("--allocations", default="uniform,dynamic,spectral,mckp")
    ap.add_argument("--cospadi-iters", type=int, default=None,
                    help="K-SVD iterations of the CoSpaDi rows [default: CoSpaDi's published 60]; rows say T=N")
    ap.add_argument("--sections", default="factorize,quantize")
    ap.add_argument("--caps", default="default,0.9", help="per-layer caps of the allocation section")
    ap.add_argument("--error-caps", default="0.02,0.05",
                    help="--max-layer-error values of the errorcap section (relative squared whitened error)")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--heldout", default=None, help="held-out text file [default: the packaged held-out sentences]")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import torch

    import compot_deploy
    from compot_deploy.storage.budget import Budget
    from compot_deploy.config import AllocationConfig, CompressConfig, FactorizeConfig, QuantizeConfig
    from compot_deploy.compression import quantize_dir
    from compot_deploy.errors import CompotError
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import default_model_dir, load_model

    torch.manual_seed(0)
    model_dir = args.model or str(default_model_dir())
    if args.heldout:
        texts = [ln for ln in Path(args.heldout).read_text().splitlines() if ln.strip()]
    else:
        from compot_deploy.calibrate.data import heldout_texts

        texts = heldout_texts()
    orig, tok = load_model(model_dir)
    ref = mean_pooled_embeddings(orig, tok, texts)
    del orig

    rows = []
    sections = args.sections.split(",")
    ratios = [float(x) for x in args.ratios.split(",")]

    def measure(row: dict, run) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m"
            t0 = time.perf_counter()
            rep = run(out)
            wall = time.perf_counter() - t0
            q = embedding_agreement(ref, mean_pooled_embeddings(compot_deploy.load(out), tok, texts))
        row.update({"file_ratio": rep["linears"]["file_ratio"], "planned_ratio": rep["linears"]["planned_ratio"],
                    "fp16_fraction": 1.0 - rep["linears"]["file_ratio"], "model_file_ratio": rep["model_file"]["ratio"],
                    **q, "wall_s": wall, **{f"{k}_s": v for k, v in rep["timings"].items()}})
        rows.append(row)
        print(f"{row['section']:9s} {row['label']:32s} file_ratio {row['file_ratio']:.4f} "
              f"cos {q['mean_cosine']:.4f} (min {q['min_cosine']:.4f}) rho {q['pairwise_spearman']:.4f} "
              f"{wall:6.1f}s", flush=True)

    if "factorize" in sections:
        for r in ratios:
            for alloc in args.allocations.split(","):
                for method in args.methods.split(","):
                    if method == "cospadi" and alloc != "dynamic":
                        continue
                    short = method == "cospadi" and args.cospadi_iters  # a departure from CoSpaDi's T = 60
                    fc = FactorizeConfig(method=method, **({"cospadi_iters": args.cospadi_iters} if short else {}))
                    label = f"{f'cospadi T={args.cospadi_iters}' if short else method} {alloc} {r}"
                    cfg = CompressConfig(allocation=AllocationConfig(strategy=alloc, budget=Budget(removed=r)),
                                         factorize=fc)
                    measure({"section": "factorize", "label": label, "ratio": r, "allocation": alloc,
                             "method": method, "cospadi_iters": fc.cospadi_iters if method == "cospadi" else None},
                            lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    if "iters" in sections:  # COMPOT's alternations and closing refit (issue 17), dynamic allocation
        for r in ratios:
            for iters, refit in ((8, False), (20, False), (8, True), (20, True)):
                cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=r)),
                                     factorize=FactorizeConfig(iters=iters, refit=refit))
                measure({"section": "iters", "label": f"compot {r} iters {iters}{' + refit' if refit else ''}",
                         "ratio": r, "allocation": "dynamic", "method": "compot", "iters": iters, "refit": refit},
                        lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    if "allocation" in sections:  # spectral vs dynamic, default vs wide per-layer cap (issue 17)
        for r in ratios:
            for alloc in args.allocations.split(","):
                for cap in (cap_at(c, r) for c in args.caps.split(",")):
                    for method in args.methods.split(","):
                        cfg = CompressConfig(allocation=AllocationConfig(strategy=alloc, budget=Budget(removed=r),
                                                                         max_layer_ratio=cap),
                                             factorize=FactorizeConfig(method=method))
                        measure({"section": "allocation", "ratio": r, "allocation": alloc, "method": method,
                                 "max_layer_ratio": cap,
                                 "label": f"{method} {alloc} {r} cap {cap or f'{r + 0.1:.1f}'}"},
                                lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    if "errorcap" in sections:  # ROCKET's per-layer error cap on the knapsack allocators (issue 17)
        for r in ratios:
            for alloc in (a for a in args.allocations.split(",") if a in ("dynamic", "mckp")):
                for cap in map(float, args.error_caps.split(",")):
                    for method in args.methods.split(","):
                        cfg = CompressConfig(allocation=AllocationConfig(strategy=alloc, budget=Budget(removed=r),
                                                                         max_layer_error=cap),
                                             factorize=FactorizeConfig(method=method))
                        row = {"section": "errorcap", "ratio": r, "allocation": alloc, "method": method,
                               "max_layer_error": cap, "label": f"{method} {alloc} {r} error cap {cap:g}"}
                        try:
                            measure(row, lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg,
                                                                                     progress=False))
                        except CompotError as e:  # a cap below what the budget allows: recorded, not fatal
                            print(f"errorcap  {row['label']}: {e}", flush=True)
                            rows.append({**row, "infeasible": str(e)})
    if "quantize" in sections:
        for bits in (4, 8):
            for qm in ("rtn", "gptq"):
                qc = QuantizeConfig(bits=bits, method=qm)
                measure({"section": "quantize", "label": f"dense {qm} {bits}-bit g128", "method": "dense",
                         "quant": qm, "bits": bits, "ratio": 0.0},
                        lambda out, qc=qc: quantize_dir(model_dir, out, qc, progress=False))
                for r in ratios if (qm, bits) == ("gptq", 4) else [0.3]:
                    cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=r)), quantize=qc)
                    measure({"section": "quantize", "label": f"compot {r} dynamic + {qm} {bits}-bit",
                             "method": "compot", "quant": qm, "bits": bits, "ratio": r},
                            lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    if "lowbit" in sections:  # dense neighbours of COMPOT+GPTQ-4bit's byte sizes (4-bit cannot go below ~0.25x)
        for group in (32, 128):
            qc = QuantizeConfig(bits=2, group=group)
            measure({"section": "lowbit", "label": f"dense gptq 2-bit g{group}", "method": "dense", "quant": "gptq",
                     "bits": 2, "ratio": 0.0},
                    lambda out, qc=qc: quantize_dir(model_dir, out, qc, progress=False))

    result = {
        "model": model_dir,
        "heldout": args.heldout or "compot_deploy/data/heldout_en.txt",
        "heldout_sentences": len(texts),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "compot_deploy": compot_deploy.__version__, "cpu": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads()},
        "rows": rows,
        "comparisons": comparisons(rows),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = out_dir / "quality.json"
    if old.exists():  # keep the rows not rerun now (a row is its section and label)
        new = {(r["section"], r["label"]) for r in rows}
        kept = [r for r in json.loads(old.read_text())["rows"] if (r.get("section"), r.get("label")) not in new]
        result["rows"] = kept + rows
        result["comparisons"] = comparisons(result["rows"])
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "quality.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def cap_at(cap: str, ratio: float) -> float | None:
    """--caps entry → AllocationConfig.max_layer_ratio: `default` → None, `+x` → ratio + x, else the number."""
    return None if cap == "default" else round(ratio + float(cap), 4) if cap.startswith("+") else float(cap)


def row_method(r: dict) -> str:
    """The method of a factorize row as its label names it ("cospadi T=3" for a CoSpaDi run short of T = 60)."""
    return r["label"].rsplit(" ", 2)[0]


def comparisons(rows: list[dict]) -> list[dict]:
    """COMPOT against SVD-LLM at equal bytes (same ratio and allocation): cosine gap and time ratio; and every other
    method (CoSpaDi, ROCKET) against both: its cosine, its time over SVD-LLM's, whether it beats COMPOT."""
    by = {(r["ratio"], r["allocation"], row_method(r)): r for r in rows if r.get("section") == "factorize"}
    out = []
    for (ratio, alloc, method), c in sorted(by.items()):
        s = by.get((ratio, alloc, "svd-llm"))
        if method != "compot" or s is None:
            continue
        others = {m: {"mean_cosine": o["mean_cosine"], "time_ratio_vs_svd_llm": o["wall_s"] / s["wall_s"],
                      "beats_compot": o["mean_cosine"] > c["mean_cosine"]}
                  for (ra, al, m), o in sorted(by.items())
                  if (ra, al) == (ratio, alloc) and m not in ("compot", "svd-llm")}
        out.append({"ratio": ratio, "allocation": alloc, "compot_cosine": c["mean_cosine"],
                    "svd_llm_cosine": s["mean_cosine"],
                    "cosine_gain_vs_svd_llm": c["mean_cosine"] - s["mean_cosine"],
                    "time_ratio_vs_svd_llm": c["wall_s"] / s["wall_s"], "others": others})
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
        if r.get("section") != "factorize":
            continue
        lines.append(f"| {r['ratio']:.2f} | {r['allocation']} | {row_method(r)} | {r['file_ratio']:.4f} | "
                     f"{r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['pairwise_spearman']:.4f} | "
                     f"{r['wall_s']:.1f} | {r['factorize_s']:.1f} |")
    quant = [r for r in res["rows"] if r.get("section") in ("quantize", "lowbit")]
    if quant:
        lines += ["", "## Quantization (RTN vs GPTQ) on the dense model and on COMPOT factors", "",
                  "Bytes of the compressed linears as a fraction of their float16 dense bytes, read from the files "
                  "(packed codes, float16 scales, packed zero points, code indices, biases).", "",
                  "| configuration | × fp16 bytes | mean cos | min cos | pairwise ρ | wall s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(quant, key=lambda r: r["fp16_fraction"]):
            lines.append(f"| {r['label']} | {r['fp16_fraction']:.3f} | {r['mean_cosine']:.4f} | "
                         f"{r['min_cosine']:.4f} | {r['pairwise_spearman']:.4f} | {r['wall_s']:.1f} |")
    its = [r for r in res["rows"] if r.get("section") == "iters"]
    if its:
        lines += ["", "## COMPOT alternations and the closing refit (dynamic allocation)", "",
                  "| configuration | file ratio | mean cos | min cos | pairwise ρ | wall s | factorize s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in its:
            lines.append(f"| {r['label']} | {r['file_ratio']:.4f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
                         f"{r['pairwise_spearman']:.4f} | {r['wall_s']:.1f} | {r['factorize_s']:.1f} |")
    al = [r for r in res["rows"] if r.get("section") == "allocation"]
    if al:
        lines += ["", "## Allocation: spectral (COMPOT paper) vs dynamic (whitened-SVD knapsack), per-layer cap", "",
                  "| ratio | allocation | cap | method | file ratio | mean cos | min cos | pairwise ρ | wall s | "
                  "allocate s |", "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(al, key=lambda r: (r["ratio"], r["method"], r["allocation"], r["max_layer_ratio"] or 0)):
            cap = r["max_layer_ratio"] or r["ratio"] + 0.1
            lines.append(f"| {r['ratio']:.2f} | {r['allocation']} | {cap:.1f} | {r['method']} | {r['file_ratio']:.4f} | "
                         f"{r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['pairwise_spearman']:.4f} | "
                         f"{r['wall_s']:.1f} | {r['allocate_s']:.1f} |")
    ec = [r for r in res["rows"] if r.get("section") == "errorcap"]
    if ec:
        lines += ["", "## ROCKET's per-layer error cap on the knapsack (--max-layer-error)", "",
                  "Beside each row, the same method and allocation without a cap (section factorize, where measured).",
                  "", "| ratio | allocation | method | error cap | file ratio | mean cos | uncapped mean cos | wall s |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        base = {(r["ratio"], r["allocation"], r["method"]): r for r in res["rows"] if r.get("section") == "factorize"}
        for r in sorted(ec, key=lambda r: (r["ratio"], r["allocation"], r["method"], r["max_layer_error"])):
            b = base.get((r["ratio"], r["allocation"], r["method"]))
            if "infeasible" in r:
                lines.append(f"| {r['ratio']:.2f} | {r['allocation']} | {r['method']} | {r['max_layer_error']:g} | "
                             "infeasible: no candidates fit the budget under the cap | | | |")
                continue
            lines.append(f"| {r['ratio']:.2f} | {r['allocation']} | {r['method']} | {r['max_layer_error']:g} | "
                         f"{r['file_ratio']:.4f} | {r['mean_cosine']:.4f} | "
                         f"{'—' if b is None else format(b['mean_cosine'], '.4f')} | {r['wall_s']:.1f} |")
    lines += ["", "## COMPOT vs SVD-LLM (and the other methods) at equal bytes", "",
              "Other methods: mean cosine, wall time over SVD-LLM's; **bold** where it beats COMPOT at the same bytes "
              "and allocation. `cospadi` is CoSpaDi at its published T = 60 K-SVD iterations, `cospadi T=3` three.",
              "", "| ratio | allocation | COMPOT − SVD-LLM mean cos | COMPOT / SVD-LLM wall time | others |",
              "|---:|---|---:|---:|---|"]
    for c in res["comparisons"]:
        verdict = "" if c["cosine_gain_vs_svd_llm"] > 0 else " (SVD-LLM better)"
        others = "; ".join((f"**{m} {o['mean_cosine']:.4f}, {o['time_ratio_vs_svd_llm']:.1f}× time**" if
                            o["beats_compot"] else f"{m} {o['mean_cosine']:.4f}, {o['time_ratio_vs_svd_llm']:.1f}× time")
                           for m, o in c.get("others", {}).items()) or "—"
        lines.append(f"| {c['ratio']:.2f} | {c['allocation']} | {c['cosine_gain_vs_svd_llm']:+.4f}{verdict} | "
                     f"{c['time_ratio_vs_svd_llm']:.2f} | {others} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
