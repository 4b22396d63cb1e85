"""Quality against bytes on MiniLM: compot-deploy's points beside ONNX Runtime's own one-line quantizers.

    python benchmarks/frontier.py      # after benchmarks/quality.py and benchmarks/latency.py (reuses their output)

x: bytes of the target linears (weights + biases + scales/zero points/indices) as a fraction of the same linears
at float16; y: mean cosine of mean-pooled embeddings against the original on the held-out sentences. Our points
(dense GPTQ/RTN, COMPOT fp16, COMPOT + GPTQ) come from benchmarks/results/quality.json; the peers are measured
here on the float32 ONNX export of the original: `quantize_dynamic` int8 and MatMulNBits int4 RTN (block 32 and
128), each counted from its own initializers. Writes benchmarks/results/frontier.{json,md,png}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYER = "/encoder/layer."


def linear_bytes(model_path: Path, fp16_bias: dict[str, int]) -> int:
    """Stored bytes of the block linears of an ONNX model: every initializer a weight-bearing node inside the
    encoder layers reads (weights, scales, zero points), plus each linear's bias counted at float16."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i).nbytes for i in m.graph.initializer}
    seen, total = set(), 0
    for n in m.graph.node:
        if LAYER in n.name and n.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"):
            for name in n.input[1:]:
                if name in inits and name not in seen:
                    seen.add(name)
                    total += inits[name]
    return total + sum(fp16_bias.values())


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


def main() -> int:
    import torch

    from compot_deploy.calibration import heldout_texts
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import default_model_dir, find_targets, load_model

    work, res = HERE / ".work", HERE / "results"
    dense_onnx = work / "ort_dense" / "model.onnx"
    if not dense_onnx.is_file():
        print("run benchmarks/latency.py first (it writes the float32 export of the original)", file=sys.stderr)
        return 2
    texts = heldout_texts()
    model, tok = load_model(default_model_dir())
    ref = mean_pooled_embeddings(model, tok, texts)
    targets = find_targets(model)
    dense_fp16 = sum((t.d_in * t.d_out + (t.d_out if t.bias else 0)) * 2 for t in targets)
    bias16 = {t.name: t.d_out * 2 for t in targets if t.bias}

    rows = []
    assert abs(linear_bytes(dense_onnx, bias16) / dense_fp16 - 2.0) < 0.01  # float32 weights: twice fp16

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    peers = work / "peers"
    peers.mkdir(exist_ok=True)
    q8 = peers / "int8_dynamic.onnx"
    quantize_dynamic(str(dense_onnx), str(q8), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True)
    cands = [("ORT quantize_dynamic int8 (per channel)", q8)]
    import onnx

    for block in (32, 128):
        q4 = peers / f"int4_rtn_b{block}.onnx"
        mq = MatMulNBitsQuantizer(onnx.load(str(dense_onnx)), algo_config=DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=False))
        mq.process()
        mq.model.save_model_to_file(str(q4), use_external_data_format=False)
        cands.append((f"ORT MatMulNBits int4 RTN block {block}", q4))
    for label, path in cands:
        emb = torch.from_numpy(ort_embeddings(path, tok, texts))
        q = embedding_agreement(ref, emb)
        rows.append({"family": "ORT peer", "label": label, "fp16_fraction": linear_bytes(path, bias16) / dense_fp16,
                     **q})

    ours = json.loads((res / "quality.json").read_text())["rows"]
    for r in ours:
        if r["section"] == "factorize" and r.get("allocation") != "dynamic":
            continue
        fam = ("dense " + r.get("quant", "")).strip() if r["method"] == "dense" else \
            f"{r['method']} fp16" if r["section"] == "factorize" else f"{r['method']} + {r.get('quant', 'gptq')}"
        rows.append({"family": fam, "label": r["label"], "fp16_fraction": r["fp16_fraction"],
                     "mean_cosine": r["mean_cosine"], "min_cosine": r["min_cosine"],
                     "pairwise_spearman": r["pairwise_spearman"]})
    rows.sort(key=lambda r: r["fp16_fraction"])
    # the upper envelope: a point is on it when nothing at most as large has a higher cosine
    best = -1.0
    for r in rows:
        r["on_frontier"] = r["mean_cosine"] > best
        best = max(best, r["mean_cosine"])
    (res / "frontier.json").write_text(json.dumps({"dense_fp16_linear_bytes": dense_fp16, "rows": rows}, indent=1))
    lines = ["# Quality against bytes (MiniLM, held-out cosine)", "",
             "x = bytes of the block linears / the same at float16 (scales, zero points, indices, biases included).",
             "Frontier = no smaller point has a higher cosine.", "",
             "| fp16 fraction | mean cos | min cos | family | configuration | frontier |", "|---:|---:|---:|---|---|---|"]
    lines += [f"| {r['fp16_fraction']:.3f} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['family']} | "
              f"{r['label']} | {'yes' if r['on_frontier'] else ''} |" for r in rows]
    (res / "frontier.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    markers = dict(zip(sorted({r["family"] for r in rows}), "osD^v<>ph*"))
    for fam, mk in markers.items():
        pts = [r for r in rows if r["family"] == fam]
        ax.scatter([p["fp16_fraction"] for p in pts], [p["mean_cosine"] for p in pts], marker=mk, label=fam, s=45)
    front = [r for r in rows if r["on_frontier"]]
    ax.plot([r["fp16_fraction"] for r in front], [r["mean_cosine"] for r in front], "k--", lw=0.8, label="frontier")
    ax.set_xlabel("bytes of the block linears / float16")
    ax.set_ylabel("mean cosine vs original (held-out)")
    ax.set_title("all-MiniLM-L6-v2: quality against bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res / "frontier.png", dpi=110)
    print(f"wrote {res / 'frontier.md'}, frontier.json, frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
