"""Latency and memory of MiniLM across PyTorch and ONNX Runtime, side by side in one run (issue 6), and the
choice of SparseCodesMatMul's body (issue 5).

    python benchmarks/latency.py                      # CPU; writes benchmarks/results/latency.{json,md,png}
    python benchmarks/latency.py --device cpu,cuda --tag h100   # on a GPU machine

Builds what it needs under --work (kept between runs): COMPOT 0.3, COMPOT 0.3 + GPTQ-4, and their exports, the
original exported as is (float32) and at float16 storage. Every measurement runs in its own process (bench.py);
--rounds repeats them all, interleaved, and each ratio is given with the spread of its per-round values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_artifacts(model: Path, work: Path, log) -> dict[str, Path]:
    import torch

    import compot_deploy
    from compot_deploy.config import CompressConfig, ExportConfig, QuantizeConfig
    from compot_deploy.exporters.onnx_export import export_dir
    from compot_deploy.models import load_model
    from compot_deploy.compression import quantize_dir

    work.mkdir(parents=True, exist_ok=True)
    a = {"c03": work / "c03", "c03q4": work / "c03q4", "dense16": work / "dense16"}
    if not a["c03"].exists():
        log("compress 0.3")
        compot_deploy.compress(model, a["c03"], CompressConfig(), progress=False)
    if not a["c03q4"].exists():
        log("GPTQ-4")
        quantize_dir(a["c03"], a["c03q4"], QuantizeConfig(bits=4), progress=False)
    if not a["dense16"].exists():
        log("original at float16 storage")
        m, tok = load_model(model)
        m.to(torch.float16).save_pretrained(a["dense16"])
        tok.save_pretrained(a["dense16"])
    exports = {"ort_dense": (model, "folded"), "ort_dense16": (a["dense16"], "folded"), "ort_c03": (a["c03"], "folded"),
               "ort_c03q4": (a["c03q4"], "folded"), "ort_c03_dense": (a["c03"], "dense"),
               "ort_c03_gather": (a["c03"], "gather")}
    for name, (src, body) in exports.items():
        a[name] = work / name
        if not a[name].exists():
            log(f"export {name}")
            export_dir(src, a[name], ExportConfig(sparse_body=body))
    return a


def ratio_lines(report: dict, pairs, device: str) -> list[str]:
    from compot_deploy.bench import ratio_with_spread

    out = []
    for num, den, shapes in pairs:
        for b, L in shapes:
            r = ratio_with_spread(report, num, den, b, L, device)
            if r:
                out.append(f"| {num} / {den} | {device} | {b}×{L} | {r['ratio']:.3f} | {r['min']:.3f}–{r['max']:.3f} |")
    return out


def rss_lines(report: dict, names, device: str) -> list[str]:
    out = []
    for res in report["results"]:
        if res["label"] in names and res["device"] == device:
            peaks = [r["peak_rss_bytes"] / 2**20 for r in res["rounds"]]
            sampled = [r["peak_rss_sampled_bytes"] / 2**20 for r in res["rounds"]]
            loaded = [r["peak_rss_after_load_bytes"] / 2**20 for r in res["rounds"]]
            out.append(f"| {res['label']} | {device} | {' / '.join(f'{x:.0f}' for x in loaded)} | "
                       f"{' / '.join(f'{x:.0f}' for x in peaks)} | {' / '.join(f'{x:.0f}' for x in sampled)} | "
                       f"{res['rounds'][0]['artifact_bytes'] / 2**20:.1f} |")
    return out


def rss_ratio_lines(report: dict, pairs, device: str) -> list[str]:
    """Peak RSS of num over den, per round (VmHWM and the psutil-sampled peak): median and range."""
    import statistics

    pick = {(r["label"], r["device"]): r for r in report["results"]}
    out = []
    for num, den in pairs:
        a, b = pick.get((num, device)), pick.get((den, device))
        if not a or not b:
            continue
        cells = []
        for key in ("peak_rss_bytes", "peak_rss_sampled_bytes"):
            r = [ra[key] / rb[key] for ra, rb in zip(a["rounds"], b["rounds"])]
            cells.append(f"{statistics.median(r):.3f} | {min(r):.3f}–{max(r):.3f}")
        out.append(f"| {num} / {den} | {device} | {' | '.join(cells)} |")
    return out


def write_summary(rep: dict, body: dict, devices, tag: str, out: Path, names, shapes, body_shapes) -> None:
    """latency_TAG.md (ratios with their spread, RSS) and latency_TAG.json (both raw reports)."""
    lines = [f"# Latency and memory: MiniLM ({tag})", "",
             f"Full tables: `latency_{tag}/bench.md` (main), `sparse_body_{tag}/bench.md` (SparseCodesMatMul bodies).",
             "",
             "## Ratios of p50 latency (median over rounds; range = the rounds' values)", "",
             "| ratio | device | batch×seq | median | rounds range |", "|---|---|---|---:|---|"]
    pairs = [("ort_c03", "ort_dense", shapes), ("ort_c03", "ort_dense16", shapes), ("ort_c03q4", "ort_dense", shapes),
             ("ort_c03", "torch_c03", shapes), ("ort_dense", "torch_dense", shapes),
             ("torch_c03", "torch_dense", shapes)]
    for d in devices:
        lines += ratio_lines(rep, pairs, d)
    lines += ["", "## SparseCodesMatMul bodies (ORT), p50 relative to the dense export", "",
              "| ratio | device | batch×seq | median | rounds range |", "|---|---|---|---:|---|"]
    for d in devices:
        lines += ratio_lines(body, [(f"ort_c03{s}", "ort_dense", body_shapes) for s in ("", "_dense", "_gather")], d)
    lines += ["", "## Ratios of peak resident memory (whole process: load and every shape; median over rounds)", "",
              "| ratio | device | VmHWM | rounds range | psutil sampled | rounds range |", "|---|---|---:|---|---:|---|"]
    for d in devices:
        lines += rss_ratio_lines(rep, [("ort_c03", "ort_dense"), ("ort_c03q4", "ort_dense"), ("ort_c03", "ort_dense16"),
                                       ("ort_dense", "torch_dense"), ("ort_c03", "torch_c03")], d)
    lines += ["", "## Peak resident memory per process (MiB, one value per round)", "",
              "| model | device | after load | peak (VmHWM) | peak (psutil, sampled) | artifact MiB |",
              "|---|---|---|---|---|---:|"]
    for d in devices:
        lines += rss_lines(rep, names, d)
    (out / f"latency_{tag}.md").write_text("\n".join(lines) + "\n")
    with open(out / f"latency_{tag}.json", "w") as f:
        json.dump({"main": rep, "sparse_body": body}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder [default: the packaged all-MiniLM-L6-v2]")
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu", help="suffix of the report files")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summary-only", action="store_true", help="rewrite latency_TAG.md from latency_TAG.json")
    args = ap.parse_args(argv)
    if args.summary_only:
        j = json.loads((Path(args.out) / f"latency_{args.tag}.json").read_text())
        rep, body = j["main"], j["sparse_body"]
        names = list(dict.fromkeys(r["label"] for r in rep["results"]))
        write_summary(rep, body, list(dict.fromkeys(r["device"] for r in rep["results"])), args.tag, Path(args.out),
                      names, [tuple(s) for s in rep["settings"]["shapes"]], [tuple(s) for s in body["settings"]["shapes"]])
        return 0

    from compot_deploy.bench import bench, write_reports
    from compot_deploy.config import BenchConfig
    from compot_deploy.models import default_model_dir

    def log(m):
        print(m, file=sys.stderr, flush=True)

    model = Path(args.model) if args.model else default_model_dir()
    a = build_artifacts(model, Path(args.work), log)
    devices = args.device.split(",")
    shapes = [(1, 16), (1, 128), (8, 128)]
    main_targets = [("torch_dense", model), ("torch_c03", a["c03"]), ("ort_dense", a["ort_dense"]),
                    ("ort_dense16", a["ort_dense16"]), ("ort_c03", a["ort_c03"]), ("ort_c03q4", a["ort_c03q4"])]
    cfg = BenchConfig(shapes=shapes, warmup=args.warmup, repeat=args.repeat, rounds=args.rounds, threads=args.threads,
                      devices=devices)
    rep = bench([(n, str(p)) for n, p in main_targets], cfg, progress=log)
    out = Path(args.out)
    paths = write_reports(rep, out / f"latency_{args.tag}")
    body_shapes = [(1, 1), (1, 16), (1, 128), (8, 128)]
    body_cfg = cfg.model_copy(update={"shapes": body_shapes, "repeat": max(10, args.repeat // 5), "backends": ("ort",)})
    body = bench([(n, str(a[n])) for n in ("ort_dense", "ort_c03", "ort_c03_dense", "ort_c03_gather")], body_cfg,
                 progress=log)
    paths += write_reports(body, out / f"sparse_body_{args.tag}")

    write_summary(rep, body, devices, args.tag, out, [n for n, _ in main_targets], shapes, body_shapes)
    for p in paths + [out / f"latency_{args.tag}.md"]:
        print(f"wrote {os.path.relpath(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
