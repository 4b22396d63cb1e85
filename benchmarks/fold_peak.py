"""Where an ORT session's peak RSS comes from: the load-time constant folding, not the folded weights.

    python benchmarks/fold_peak.py [[LABEL=]MODEL.onnx ...]   # default: the exports benchmarks/latency.py left

Each model is loaded in its own fresh process (CPU EP, all graph optimizations); reported: VmHWM (peak) and VmRSS
after the session is created, and VmRSS after glibc's malloc_trim(0) hands freed heap pages back (what the
session really keeps). A synthetic model — one 10 MB float32 initializer through a chain of n foldable Mul
nodes — shows ONNX Runtime's constant folding keeping every intermediate of a folded chain alive until the pass
ends: the peak grows by ~10 MB per node although the folded result is one 10 MB tensor. Our function bodies
(mask unpacking, scatter, dequantization) are such chains, once per layer, so they are kept short and their
intermediates narrow (exporters/ops.py). Writes benchmarks/results/fold_peak.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROBE = r"""
import ctypes, json, sys
import onnxruntime as ort

def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            d[k] = int(v.split()[0]) / 1024
    return d

base = status()["VmRSS"]
so = ort.SessionOptions()
so.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
after = status()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"baseline_mib": base, "peak_mib": after["VmHWM"], "rss_after_load_mib": after["VmRSS"],
                  "rss_after_trim_mib": status()["VmRSS"]}))
"""


def probe(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def chain_model(n: int, path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper as h, numpy_helper

    nodes, prev = [], "W"
    for i in range(n):
        nodes.append(h.make_node("Mul", [prev, "two"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(h.make_node("MatMul", ["x", prev], ["y"]))
    W = np.random.default_rng(0).random((1024, 2560), dtype=np.float32)  # 10 MiB
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2560])],
                     [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(2, np.float32), "two")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), path)
    return path


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        work = HERE / ".work"
        args = [f"{n}={work / n / 'model.onnx'}" for n in ("ort_dense", "ort_dense16", "ort_c03", "ort_c03q4")
                if (work / n / "model.onnx").is_file()]
    labelled = [a.split("=", 1) if "=" in a else (a, a) for a in args]
    rows = [{"model": label, **probe(Path(path))} for label, path in labelled]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 10, 20):
            rows.append({"model": f"synthetic: 10 MiB initializer through {n} folded Mul", "chain": n,
                         **probe(chain_model(n, Path(tmp) / f"chain{n}.onnx"))})
    lines = ["# ORT session memory: peak against what the session keeps (CPU EP, MiB)", "",
             "| model | peak (VmHWM) | RSS after load | RSS after malloc_trim | baseline (python + ORT) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['peak_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['rss_after_trim_mib']:.0f} | "
              f"{r['baseline_mib']:.0f} |" for r in rows]
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / "fold_peak.json").write_text(json.dumps(rows, indent=1) + "\n")
    (res / "fold_peak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
