"""ONNX Runtime's own one-line quantizers on the same model: what a user already has, measured beside a package.

Each peer is made from the float32 ONNX export of the original, exactly as ORT's documentation shows it:
- `int8`: `quantize_dynamic(model, out, weight_type=QuantType.QInt8)` (its defaults: every MatMul, Gather and
  Attention weight at int8, per tensor; activations quantized at run time);
- `int4-b32`, `int4-b128`: `MatMulNBitsQuantizer(model, block_size=B, is_symmetric=True, accuracy_level=4)`
  (every MatMul weight at int4 in blocks of B along the input; embeddings left float32).
A peer is written as an export folder (the dense export's config, tokenizer and manifest beside the quantized
model.onnx), so the gate's task-level check and `bench` measure it exactly as they measure the package.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .errors import CompotError

PEERS = ("int8", "int4-b32", "int4-b128")
LABELS = {"int8": "ORT quantize_dynamic int8", "int4-b32": "ORT MatMulNBits int4 block 32",
          "int4-b128": "ORT MatMulNBits int4 block 128"}


def float_weight_dtype(onnx_path: Path) -> str:
    """The element type of the model's largest floating initializer ('float', 'float16', …)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    floats = [i for i in m.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                onnx.TensorProto.BFLOAT16)]
    if not floats:
        return "none"
    big = max(floats, key=lambda i: math.prod(i.dims))
    if big.data_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    return onnx.helper.tensor_dtype_to_np_dtype(big.data_type).name


def quantize_onnx(name: str, src: Path, dst: Path) -> None:
    """Write ORT's one-liner `name` (PEERS) of the float32 model `src` to `dst` (external data past 2 GB)."""
    import onnx

    if name == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         use_external_data_format=src.with_name(src.name + ".data").is_file())
        return
    if name.startswith("int4-b"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=int(name.removeprefix("int4-b")), is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=q.model.model.ByteSize() >= 2**31 - 2**20)
        return
    raise CompotError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def make_peer(name: str, dense_export: Path, out: Path) -> None:
    """Write the peer `name` of the dense export folder `dense_export` into the (new, empty) folder `out` (each
    graph of an encoder-decoder quantized on its own)."""
    from .exporters.onnx_export import MANIFEST, SHARED_DATA, graph_files

    files = graph_files(json.loads((dense_export / MANIFEST).read_text())["graph"])
    for f in dense_export.iterdir():  # the quantized graphs hold their own weights (no shared data file)
        if f.is_file() and f.name != SHARED_DATA and not any(f.name.startswith(g) for g in files):
            shutil.copy2(f, out / f.name)
    for g in files:
        quantize_onnx(name, dense_export / g, out / g)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["peer"] = {"name": name, "label": LABELS[name], "from": str(dense_export)}
    manifest["bytes"] = {"onnx": sum(p.stat().st_size for g in files for p in out.glob(g + "*"))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def make_peers(names, dense_export: Path, reference: Path, texts: list[str], out: Path, progress=None) -> dict:
    """Each peer of `names` as out/<name>/ plus its task-level quality against the original model `reference` on
    `texts` (the gate's held-out texts); out/peers.json lists them. A dense export whose weights are not float32
    gets no peers (ORT's quantizers take float32 models): the report says so."""
    from .exporters.onnx_export import MANIFEST, graph_files
    from .exporters.validate import task_level
    from .models import load_model, load_tokenizer
    from .runtimes import artifact_bytes
    from .runtimes.ort import export_session

    graph = json.loads((dense_export / MANIFEST).read_text())["graph"]
    dtype = float_weight_dtype(dense_export / graph_files(graph)[-1])
    result = {"peers": [], "texts": len(texts)}
    if dtype != "float32":
        result["skipped"] = f"the dense export stores {dtype} weights; ORT's quantizers take float32 models"
    else:
        ref = load_model(reference)[0]
        tok = load_tokenizer(dense_export)
        kind = graph["kind"]
        for name in names:
            if progress:
                progress(f"peer {LABELS[name]}")
            folder = out / name
            folder.mkdir()
            make_peer(name, dense_export, folder)
            task = task_level(ref, export_session(folder, "cpu"), tok, kind, texts)
            result["peers"].append({"name": name, "label": LABELS[name], "file_bytes": artifact_bytes(folder),
                                    "task": task})
    (out / "peers.json").write_text(json.dumps(result, indent=2))
    return result


def quality(task: dict | None) -> tuple[str, float, bool] | None:
    """(metric, value, higher is better) of a task-level report, or None."""
    task = task or {}
    if "mean_cosine" in task:
        return "mean embedding cosine", task["mean_cosine"], True
    if "perplexity" in task:
        return "perplexity", task["perplexity"], False
    return None


def dominates(a: dict, b: dict) -> bool:
    """Whether point a = {file_bytes, task} is at least as small and as good as b and strictly better in one."""
    qa, qb = quality(a.get("task")), quality(b.get("task"))
    if qa is None or qb is None:
        return False
    better = (qa[1] >= qb[1]) if qa[2] else (qa[1] <= qb[1])
    strictly = a["file_bytes"] < b["file_bytes"] or (qa[1] > qb[1] if qa[2] else qa[1] < qb[1])
    return a["file_bytes"] <= b["file_bytes"] and better and strictly


def comparison(package: dict, peers: list[dict], latency: dict[str, dict] | None = None,
               dense: dict | None = None) -> dict:
    """The package beside each peer (and the dense export, the original itself): rows of (label, file bytes,
    quality, session peak RSS, p50 at each shape) and the peers that dominate the package in (file bytes,
    quality). package/peers/dense: {label, file_bytes, task} (peers also name); latency: bench label →
    {"rss_mib", "p50_ms": {"BxL": ms}} (bench labels ort_compressed, ort_dense, peer_<name>)."""
    latency = latency or {}
    points = [("ort_compressed", package)] + [(f"peer_{p['name']}", p) for p in peers]
    rows = []
    for key, point in points:
        q = quality(point.get("task"))
        rows.append({"label": point["label"], "file_bytes": point["file_bytes"],
                     "metric": q[0] if q else None, "quality": q[1] if q else None, **latency.get(key, {})})
    if dense is not None:  # the original: cosine 1 with itself, its own perplexity
        q = quality(package.get("task"))
        value = None if q is None else 1.0 if q[2] else package["task"].get("perplexity_original")
        rows.append({"label": dense["label"], "file_bytes": dense["file_bytes"], "metric": q[0] if q else None,
                     "quality": value, **latency.get("ort_dense", {})})
    return {"rows": rows, "dominated_by": [p["label"] for p in peers if dominates(p, package)]}


def markdown(cmp: dict) -> str:
    shapes = sorted({s for r in cmp["rows"] for s in r.get("p50_ms", {})})
    metric = next((r["metric"] for r in cmp["rows"] if r["metric"]), "quality")
    lines = ["# The package beside ONNX Runtime's one-line quantizers", "",
             f"Same model, same held-out text; {metric} against the original. p50 latency and session peak RSS from "
             "the build's benchmark (each in its own process).", "",
             "| model | file MB | " + metric + " | session peak RSS MiB | " + " | ".join(f"p50 ms {s}" for s in shapes)
             + " |", "|---|---:|---:|---:|" + "---:|" * len(shapes)]
    for r in cmp["rows"]:
        q = "" if r["quality"] is None else f"{r['quality']:.4f}" if r["quality"] < 100 else f"{r['quality']:.1f}"
        rss = f"{r['rss_mib']:.0f}" if r.get("rss_mib") is not None else ""
        lines.append(f"| {r['label']} | {r['file_bytes'] / 1e6:.1f} | {q} | {rss} | "
                     + " | ".join(f"{r.get('p50_ms', {}).get(s, float('nan')):.2f}" for s in shapes) + " |")
    lines += ["", ("**Dominated** in (file bytes, quality) by: " + ", ".join(cmp["dominated_by"]) + ".")
              if cmp["dominated_by"] else "No peer is both smaller and better than the package.", ""]
    return "\n".join(lines)
