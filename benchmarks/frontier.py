"""Quality against bytes on MiniLM, in one run: the joint allocator beside every fixed recipe and ORT's quantizers.

    python benchmarks/frontier.py [--budgets 0.10,0.15,0.20,0.25,0.30] [--compot-ratios 0.2,0.3,0.4,0.5,0.6]
                                  [--whole-budgets 0.2,0.25,0.3,0.35,0.4,0.5]

x: bytes of the block linears (weights, biases, scales, zero points, code positions) as a fraction of the same
linears at float16; y: mean cosine of mean-pooled embeddings against the original on the held-out sentences.
Points, all measured here:
  * ORT peers on the float32 ONNX export of the original, each counted from its own initializers:
    `quantize_dynamic` int8 per channel, MatMulNBits int4 RTN block 32 and 128;
  * dense GPTQ 2/3/4-bit (group 32 and 128) and 8-bit g128 (`compot-deploy quantize`);
  * COMPOT + GPTQ 4/8-bit at several ratios, and float16 COMPOT (`compot-deploy compress`);
  * the joint allocator (`--target-ratio`), its candidates measured once, built at each budget and at every other
    point's exact bytes; and the allocator restricted to COMPOT (`--method compot`) at each budget.
Then, for every other point, whether the allocator given that point's bytes reaches its cosine.
The whole file (x: the whole weights file, embedding table included, over the original's at float16): every point
above, ORT's quantize_dynamic with its defaults (MatMul and Gather), fixed recipes with the table 4-bit (dense GPTQ
4/8-bit, `build`'s default COMPOT 0.1, COMPOT 0.3 + GPTQ 8-bit), and the joint allocator with the table one of its
choices (`--embedding-bits joint`) at each --whole-budgets fraction and at every whole-file peer's bytes.
Writes benchmarks/results/frontier.{json,md,png} and frontier_whole.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
LAYER = "/encoder/layer."
WHOLE_ONLY = ("whole file, fixed", "joint allocator, whole file")  # table quantized: points of the whole-file chart


def onnx_linear_bytes(model_path: Path, layer: str = LAYER) -> int:
    """Stored bytes of the block linears of an ONNX model: every initializer past the first input of a MatMul-like
    node whose name holds `layer` (weights, scales, zero points), each once; external data is not read."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path), load_external_data=False)
    sizes = {}
    for i in m.graph.initializer:
        ext = {e.key: e.value for e in i.external_data}
        sizes[i.name] = (int(ext["length"]) if "length" in ext
                         else len(i.raw_data) or numpy_helper.to_array(i).nbytes)
    seen, total = set(), 0
    for n in m.graph.node:
        if layer in n.name and n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"):
            for name in n.input[1:]:
                if name in sizes and name not in seen:
                    seen.add(name)
                    total += sizes[name]
    return total


def linear_bytes(model_path: Path, fp16_bias: dict[str, int]) -> int:
    """onnx_linear_bytes of MiniLM's encoder layers plus each linear's bias counted at float16."""
    return onnx_linear_bytes(model_path) + sum(fp16_bias.values())


def ort_embeddings(path: Path, tokenizer, texts) -> "np.ndarray":  # noqa: F821
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = []
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) for n in names}
        (h,) = sess.run(["last_hidden_state"], feed)
        m = feed["attention_mask"][..., None].astype(np.float64)
        out.append((h * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def ort_peers(model_dir: str, work: Path, tok, texts, ref, dense_fp16: int, bias16: dict,
              file_fp16: int) -> list[dict]:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from compot_deploy.config import ExportConfig
    from compot_deploy.evaluate import embedding_agreement
    from compot_deploy.exporters.onnx_export import export_dir

    dense_onnx = work / "ort_dense" / "model.onnx"
    if not dense_onnx.is_file():
        export_dir(model_dir, dense_onnx.parent, ExportConfig(), overwrite=True)
    assert abs(linear_bytes(dense_onnx, bias16) / dense_fp16 - 2.0) < 0.01  # float32 weights: twice fp16
    peers = work / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    q8 = peers / "int8_dynamic.onnx"
    quantize_dynamic(str(dense_onnx), str(q8), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True)
    cands = [("ORT quantize_dynamic int8 (per channel)", q8)]
    q8d = peers / "int8_dynamic_defaults.onnx"  # as ORT documents it (and `build` runs it): MatMul and Gather
    quantize_dynamic(str(dense_onnx), str(q8d), weight_type=QuantType.QInt8)
    cands.append(("ORT quantize_dynamic int8 (defaults: MatMul + Gather)", q8d))
    for block in (32, 128):
        q4 = peers / f"int4_rtn_b{block}.onnx"
        mq = MatMulNBitsQuantizer(onnx.load(str(dense_onnx)), algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=False))
        mq.process()
        mq.model.save_model_to_file(str(q4), use_external_data_format=False)
        cands.append((f"ORT MatMulNBits int4 RTN block {block}", q4))
    rows = []
    for label, path in cands:
        q = embedding_agreement(ref, torch.from_numpy(ort_embeddings(path, tok, texts)))
        rows.append({"family": "ORT peer", "label": label, "fp16_fraction": linear_bytes(path, bias16) / dense_fp16,
                     "file_fraction": path.stat().st_size / file_fp16, **q})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.10,0.15,0.20,0.25,0.30")
    ap.add_argument("--compot-ratios", default="0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--whole-budgets", default="0.2,0.25,0.3,0.35,0.4,0.5",
                    help="whole-file budgets of the joint allocator: fractions of the original's float16 weights "
                         "file, embedding table included (its storage one of the allocator's choices)")
    ap.add_argument("--work", default=str(HERE / ".work"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--report-only", action="store_true", help="re-render frontier.md/png from frontier.json")
    args = ap.parse_args(argv)
    if args.report_only:
        result = json.loads((Path(args.out) / "frontier.json").read_text())
        (Path(args.out) / "frontier.md").write_text(markdown(result))
        chart(result["rows"], Path(args.out) / "frontier.png")
        chart(result["rows"], Path(args.out) / "frontier_whole.png", whole=True)
        return 0

    import torch

    import compot_deploy
    from compot_deploy.calibrate.data import heldout_texts
    from compot_deploy.config import AllocationConfig, CompressConfig, EmbeddingConfig, QuantizeConfig
    from compot_deploy.errors import CompotError
    from compot_deploy.storage.budget import Budget, dense_model_bytes, linear_budget
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import default_model_dir, find_targets, load_model
    from compot_deploy.allocate import joint
    from compot_deploy.compression import build_joint, quantize_dir, save, store_table

    t_start = time.perf_counter()
    torch.manual_seed(0)
    work, res = Path(args.work), Path(args.out)
    res.mkdir(parents=True, exist_ok=True)
    model_dir = str(default_model_dir())
    texts = heldout_texts()
    model, tok = load_model(model_dir)
    ref = mean_pooled_embeddings(model, tok, texts)
    targets = find_targets(model)
    dense_fp16 = sum((t.d_in * t.d_out + (t.d_out if t.bias else 0)) * 2 for t in targets)
    bias16 = {t.name: t.d_out * 2 for t in targets if t.bias}
    file_fp16 = dense_model_bytes(model, 2)  # the original's whole weights file at float16
    del model

    def log(row: dict) -> None:
        print(f"{row['family']:22s} {row['label']:42s} {row['fp16_fraction']:.4f}  cos {row['mean_cosine']:.4f}  "
              f"{time.perf_counter() - t_start:6.0f}s", flush=True)

    rows = ort_peers(model_dir, work, tok, texts, ref, dense_fp16, bias16, file_fp16)
    for r in rows:
        log(r)

    def saved_point(family: str, label: str, run, **extra) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            rep = run(Path(tmp) / "m")
            q = embedding_agreement(ref, mean_pooled_embeddings(compot_deploy.load(Path(tmp) / "m"), tok, texts))
        row = {"family": family, "label": label, "fp16_fraction": 1.0 - rep["linears"]["file_ratio"],
               "file_fraction": rep["model_file"]["bytes"] / file_fp16, **q, **extra}
        log(row)
        rows.append(row)
        return rep

    for bits, group in ((2, 32), (2, 128), (3, 32), (3, 128), (4, 32), (4, 128), (8, 128)):
        qc = QuantizeConfig(bits=bits, group=group)
        saved_point("dense GPTQ", f"dense GPTQ {bits}-bit g{group}",
                    lambda out, qc=qc: quantize_dir(model_dir, out, qc, progress=False))
    for r in [float(x) for x in args.compot_ratios.split(",")]:
        for bits in (4, 8):
            cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=r)), quantize=QuantizeConfig(bits=bits))
            saved_point(f"COMPOT + GPTQ {bits}-bit", f"COMPOT {r} + GPTQ {bits}-bit",
                        lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    for r in (0.2, 0.3, 0.5):
        cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=r)))
        saved_point("COMPOT fp16", f"COMPOT {r} fp16",
                    lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    table4 = EmbeddingConfig(bits=4)  # the embedding table too: half of MiniLM's weights
    for bits in (4, 8):
        qc = QuantizeConfig(bits=bits)
        saved_point("whole file, fixed", f"dense GPTQ {bits}-bit g128 + table 4-bit",
                    lambda out, qc=qc: quantize_dir(model_dir, out, qc, progress=False, embeddings=table4))
    for r, bits in ((0.1, None), (0.3, 8)):  # the first: `build`'s default recipe
        cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=r)), embeddings=table4,
                             **({"quantize": QuantizeConfig(bits=bits)} if bits else {}))
        label = f"COMPOT {r}" + (f" + GPTQ {bits}-bit" if bits else " fp16") + " + table 4-bit"
        saved_point("whole file, fixed", label,
                    lambda out, cfg=cfg: compot_deploy.compress(model_dir, out, cfg, progress=False))
    peers = [r for r in rows if r["family"] != "whole file, fixed"]
    whole_peers = [r for r in rows if r["family"] in ("whole file, fixed", "ORT peer")]

    # the joint allocator: candidates measured once, then built at each budget
    # (the table's candidates too, for the whole-file points: --embedding-bits joint; the linears' points leave it)
    table_joint = EmbeddingConfig(bits="joint")
    jcfg = CompressConfig(allocation=AllocationConfig(strategy="joint", budget=Budget(kept=0.2)))
    model, _ = load_model(model_dir)
    whole_profile = joint.profile(model, tok, jcfg.model_copy(update={
        "embeddings": table_joint, "allocation": jcfg.allocation.model_copy(update={"budget": Budget(file_bytes=1)})}),
        progress=False)
    profile = dataclasses.replace(whole_profile, table=None)
    del model
    print(f"joint candidates: {sum(len(c) for c in profile.candidates)} over {len(profile.targets)} layers, "
          f"{profile.seconds:.0f}s", flush=True)

    def joint_point(frac: float, family: str, methods=None, peer: str | None = None) -> dict:
        def run(out):
            m, _ = load_model(model_dir)
            t0 = time.perf_counter()
            budget = Budget(kept=frac)
            result = build_joint(m, profile, linear_budget(budget, profile.dense_linear_bytes), jcfg, False, methods)
            cfg = jcfg.model_copy(update={"allocation": jcfg.allocation.model_copy(update={"budget": budget})})
            return save(m, tok, out, result, cfg.model_dump(mode="json"), "float16", 0, model_dir, model_dir, t0, False)

        label = f"budget {frac:.4f}" + (f" (= {peer})" if peer else "")
        rep = saved_point(family, label, run, budget=frac, peer=peer)
        rows[-1]["choices"] = rep["joint"]["choices"]
        return rows[-1]

    budgets = [float(x) for x in args.budgets.split(",")]
    for b in budgets:
        joint_point(b, "joint allocator")
        joint_point(b, "joint, COMPOT only", ("compot",))
    def check(p: dict, j: dict, x: str) -> dict:
        """Point `p` against the allocator's point `j` at its bytes (`x`: which bytes)."""
        return {"peer": p["label"], "family": p["family"], "bytes": p[x], "peer_cosine": p["mean_cosine"],
                "joint_cosine": j["mean_cosine"], "joint_bytes": j[x], "margin": j["mean_cosine"] - p["mean_cosine"],
                "joint_at_least_peer": j["mean_cosine"] >= p["mean_cosine"] - 1e-4}

    checks = [check(p, joint_point(p["fp16_fraction"], "joint allocator", peer=p["label"]), "fp16_fraction")
              for p in peers]

    def joint_whole_point(frac: float, peer: str | None = None) -> dict:
        """The joint allocator within `frac` of the original's float16 file, the table one of its choices (dense,
        8- or 4-bit), as `compress --target-bytes --embedding-bits joint` does."""
        def run(out):
            m, _ = load_model(model_dir)
            t0 = time.perf_counter()
            cfg = jcfg.model_copy(update={"embeddings": table_joint, "allocation": jcfg.allocation.model_copy(
                update={"budget": Budget(file_bytes=int(frac * file_fp16))})})
            result = build_joint(m, whole_profile, joint.budget_for(m, whole_profile.targets, cfg), cfg, False)
            store_table(m, tok, cfg, result, "joint", False)
            return save(m, tok, out, result, cfg.model_dump(mode="json"), "float16", 0, model_dir, model_dir, t0, False)

        label = f"file budget {frac:.4f}" + (f" (= {peer})" if peer else "")
        rep = saved_point("joint allocator, whole file", label, run, file_budget=frac, peer=peer)
        rows[-1]["choices"] = {**rep["joint"]["choices"], rep["joint"]["table"]["choice"]: 1}
        return rows[-1]

    for b in [float(x) for x in args.whole_budgets.split(",")]:
        joint_whole_point(b)
    whole_checks = []
    for p in whole_peers:
        try:
            j = joint_whole_point(p["file_fraction"], peer=p["label"])
        except CompotError as e:  # below what the 4-bit table and the rest take
            print(f"no joint point at {p['label']}'s bytes: {e}", flush=True)
            continue
        whole_checks.append(check(p, j, "file_fraction"))

    mark_frontier(rows, whole=False)
    mark_frontier(rows, whole=True)
    rows.sort(key=lambda r: r["fp16_fraction"])
    result = {
        "model": model_dir, "heldout_sentences": len(texts), "dense_fp16_linear_bytes": dense_fp16,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "compot_deploy": compot_deploy.__version__, "threads": torch.get_num_threads()},
        "joint_profile_seconds": profile.seconds, "seconds": time.perf_counter() - t_start,
        "dense_fp16_file_bytes": file_fp16, "rows": rows, "peer_checks": checks, "whole_peer_checks": whole_checks,
    }
    (res / "frontier.json").write_text(json.dumps(result, indent=1) + "\n")
    (res / "frontier.md").write_text(markdown(result))
    chart(rows, res / "frontier.png")
    chart(rows, res / "frontier_whole.png", whole=True)
    print(markdown(result))
    return 0


def axis(whole: bool) -> tuple[str, str]:
    """(the row key of the x axis, the row key of the frontier flag) of the block-linear or the whole-file chart."""
    return ("file_fraction", "on_whole_frontier") if whole else ("fp16_fraction", "on_frontier")


def points(rows: list[dict], whole: bool) -> list[dict]:
    """The rows of the block-linear chart (all but the whole-file-only families) or of the whole-file chart (those
    with whole-file bytes), by their x."""
    x, _ = axis(whole)
    return sorted((r for r in rows if x in r and (whole or r["family"] not in WHOLE_ONLY)), key=lambda r: r[x])


def mark_frontier(rows: list[dict], whole: bool) -> None:
    """Flag the chart's points on the upper envelope of cosine (nothing at most as large has a higher cosine)."""
    _, flag = axis(whole)
    best = -1.0
    for r in points(rows, whole):
        r[flag] = r["mean_cosine"] > best
        best = max(best, r["mean_cosine"])


def _choices(r: dict) -> str:
    return ", ".join(f"{n}× {c}" for c, n in r.get("choices", {}).items())


def _layers_of(r: dict, family: str) -> int:
    return sum(n for c, n in r.get("choices", {}).items() if c.startswith(family))


def low_budget(result: dict, limit: float = 0.165) -> list[dict]:
    """The allocator against dense GPTQ where 2-bit GPTQ collapses: at each dense GPTQ point ≤ `limit` (the
    allocator given its bytes), and at each budget ≤ `limit` (the best dense GPTQ point at or below it)."""
    rows = result["rows"]
    dense = [r for r in rows if r["family"] == "dense GPTQ"]
    out = [{"where": f"at {c['peer']}", "bytes": c["joint_bytes"], "joint": c["joint_cosine"], "dense": c["peer_cosine"]}
           for c in result["peer_checks"] if c["family"] == "dense GPTQ" and c["bytes"] <= limit]
    for r in rows:
        if r["family"] == "joint allocator" and not r.get("peer") and r["fp16_fraction"] <= limit:
            best = max((d for d in dense if d["fp16_fraction"] <= r["fp16_fraction"] + 1e-9),
                       key=lambda d: d["mean_cosine"], default=None)
            out.append({"where": f"budget {r['budget']:.2f}", "bytes": r["fp16_fraction"], "joint": r["mean_cosine"],
                        "dense": None if best is None else best["mean_cosine"],
                        "dense_label": None if best is None else best["label"]})
    return sorted(out, key=lambda x: x["bytes"])


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Quality against bytes (all-MiniLM-L6-v2, held-out cosine)", "",
             "x = bytes of the block linears / the same at float16 (scales, zero points, code positions, biases "
             "included). Frontier = no smaller point has a higher cosine. One run, "
             f"{result['seconds'] / 60:.0f} min on {result['environment']['threads']} threads; the joint allocator's "
             f"candidates took {result['joint_profile_seconds']:.0f} s to measure, once.", "",
             "## Every point", "",
             "| fp16 fraction | mean cos | min cos | family | configuration | frontier |", "|---:|---:|---:|---|---|---|"]
    lines += [f"| {r['fp16_fraction']:.4f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['family']} | "
              f"{r['label']} | {'yes' if r.get('on_frontier') else ''} |"
              for r in rows if r["family"] not in WHOLE_ONLY]
    lines += ["", "## The joint allocator at each budget", "",
              "| budget | bytes | mean cos | family | layers: COMPOT / SVD-LLM / dense | layers chose |",
              "|---:|---:|---:|---|---|---|"]
    lines += [f"| {r['budget']:.2f} | {r['fp16_fraction']:.4f} | {r['mean_cosine']:.4f} | {r['family']} | "
              f"{_layers_of(r, 'compot')} / {_layers_of(r, 'svd-llm')} / {_layers_of(r, 'dense')} | {_choices(r)} |"
              for r in sorted(rows, key=lambda r: (r['family'], r['fp16_fraction']))
              if r["family"].startswith("joint") and "budget" in r and not r.get("peer")]
    checks = result["peer_checks"]
    failed = [c for c in checks if not c["joint_at_least_peer"]]
    lines += ["", "## Does any point beat the allocator at its own bytes?", "",
              f"{len(checks) - len(failed)} of {len(checks)} points: the allocator given exactly that point's bytes "
              "reaches at least its cosine" + (" (the others are listed with a negative margin)." if failed else "."),
              "", "| point | bytes | its cos | allocator cos | margin |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c['peer']} | {c['bytes']:.4f} | {c['peer_cosine']:.4f} | {c['joint_cosine']:.4f} | "
              f"{c['margin']:+.4f} |" for c in sorted(checks, key=lambda c: c["bytes"])]
    lines += ["", "## Around 0.16 × fp16 and below: the allocator against dense GPTQ", "",
              "| where | allocator bytes | allocator cos | dense GPTQ cos | gain |", "|---|---:|---:|---:|---:|"]
    for x in low_budget(result):
        dense = "none at or below" if x["dense"] is None else f"{x['dense']:.4f}" + (
            f" ({x['dense_label']})" if x.get("dense_label") else "")
        gain = "—" if x["dense"] is None else f"{x['joint'] - x['dense']:+.4f}"
        lines.append(f"| {x['where']} | {x['bytes']:.4f} | {x['joint']:.4f} | {dense} | {gain} |")
    whole = sorted((r for r in rows if "file_fraction" in r), key=lambda r: r["file_fraction"])
    if whole:
        wc = result.get("whole_peer_checks", [])
        failed = [c for c in wc if not c["joint_at_least_peer"]]
        lines += ["", "## The whole file: embedding table included", "",
                  f"x = bytes of the whole weights file (ours: model.safetensors; ORT's: its .onnx) / the original's "
                  f"at float16 ({result['dense_fp16_file_bytes']:,} bytes). The allocator's whole-file points "
                  "(`--embedding-bits joint`) choose the table's storage (dense, 8- or 4-bit) with the linears'.", "",
                  "| file fraction | mean cos | min cos | family | configuration | frontier |",
                  "|---:|---:|---:|---|---|---|"]
        lines += [f"| {r['file_fraction']:.4f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['family']} | "
                  f"{r['label']} | {'yes' if r.get('on_whole_frontier') else ''} |" for r in whole]
        lines += ["", f"{len(wc) - len(failed)} of {len(wc)} whole-file points (ORT's one-liners and the fixed "
                  "recipes with a quantized table): the allocator given that point's file bytes (the table one of its "
                  "choices) reaches at least its "
                  "cosine" + (" (the others have a negative margin)." if failed else "."), "",
                  "| point | file fraction | its cos | allocator cos | margin |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c['peer']} | {c['bytes']:.4f} | {c['peer_cosine']:.4f} | {c['joint_cosine']:.4f} | "
                  f"{c['margin']:+.4f} |" for c in sorted(wc, key=lambda c: c["bytes"])]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, whole: bool = False) -> None:
    """Cosine against bytes of the block linears, or with `whole` of the whole weights file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, flag = axis(whole)
    rows = points(rows, whole)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    fams = sorted({r["family"] for r in rows})
    for fam, mk in zip(fams, "osD^v<>ph*X"):
        pts = [r for r in rows if r["family"] == fam and (not r.get("peer") or fam.startswith("joint allocator"))]
        ax.scatter([p[x] for p in pts], [p["mean_cosine"] for p in pts], marker=mk, label=fam, s=40)
    front = [r for r in rows if r.get(flag)]
    ax.plot([r[x] for r in front], [r["mean_cosine"] for r in front], "k--", lw=0.8, label="frontier")
    ax.set_xlabel("bytes of the whole weights file / the original's at float16" if whole
                  else "bytes of the block linears / float16")
    ax.set_ylabel("mean cosine vs original (held-out)")
    ax.set_title("all-MiniLM-L6-v2: quality against " + ("whole-file bytes" if whole else "bytes"))
    ax.set_xlim(*((0.1, 1.35) if whole else (0.08, 0.75)))
    ax.set_ylim(0.4, 1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
