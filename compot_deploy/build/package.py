"""The deployable package: make it from a validated export, summarize a build, verify a package.

A package holds model.onnx (an encoder-decoder: encoder_model.onnx and decoder_model.onnx), the tokenizer, config.json, the gate's report and parity sample, loader.py (a copy of
runtimes/loader.py: numpy, onnxruntime and tokenizers only), README.md and manifest.json (sha256 of every file).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from importlib import resources
from pathlib import Path

from ..errors import CompotError, VerifyFailed
from ..storage.artifact import sha256_file

PACKAGE = "package"


def loader_source() -> str:
    """The text of runtimes/loader.py, shipped in every package as loader.py."""
    return resources.files("compot_deploy.runtimes").joinpath("loader.py").read_text(encoding="utf-8")




def _signature(onnx_path: Path) -> dict:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)

    def io(vs):
        return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in vs]

    return {"inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "functions": sorted(f"{f.domain}::{f.name}" for f in m.functions)}


def _sanitized_validation(val: Path) -> dict:
    """The gate's report without machine paths (the package must not depend on where it was built)."""
    rep = json.loads((val / "validation.json").read_text())
    for k in ("export_dir", "source"):
        rep.pop(k, None)
    if isinstance(rep.get("task"), dict):
        rep["task"].pop("reference", None)
    return rep


def _compression_summary(comp: Path) -> dict:
    rep = json.loads((comp / "compression_report.json").read_text())
    section = json.loads((comp / "config.json").read_text())["compot"]
    cfg = section.get("config", {})
    methods: dict[str, int] = {}
    for lay in rep["layers"]:
        methods[lay["method"]] = methods.get(lay["method"], 0) + 1
    return {"linears": rep["linears"], "model_file": rep["model_file"], "storage_dtype": section["storage_dtype"],
            "layers_by_method": methods, "allocation": cfg.get("allocation"), "factorize": cfg.get("factorize"),
            "quantize": cfg.get("quantize"), "joint": rep.get("joint"),
            "pruned_blocks": rep.get("prune", {}).get("removed_blocks")}


def make_package(exp: Path, val: Path, comp: Path, tmp: Path, target: str, versions: dict) -> None:
    """The deployable folder from the export `exp`, its gate's folder `val` and the compressed model `comp`: model,
    tokenizer, config, reports, loader, README, manifest (checksums)."""
    from ..exporters.onnx_export import graph_files
    from ..exporters.validate import SAMPLE, markdown

    for f in sorted(exp.iterdir()):
        if f.name != "export.json":
            shutil.copy2(f, tmp / f.name)
    shutil.copy2(val / SAMPLE, tmp / SAMPLE)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.get("compot", {}).pop("source_model", None)  # a build-machine path
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rep = _sanitized_validation(val)
    (tmp / "validation.json").write_text(json.dumps(rep, indent=2) + "\n")
    (tmp / "validation.md").write_text(markdown({**rep, "export_dir": "model.onnx", "source": "the compressed model"}))
    (tmp / "loader.py").write_text(loader_source())
    graph = json.loads((exp / "export.json").read_text())["graph"]
    graphs = graph_files(graph)
    if target == "mobile":
        _to_ort_format(tmp, graphs)
    summary = _compression_summary(comp)
    (tmp / "README.md").write_text(_package_readme(graph, summary, rep, target))
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    manifest = {"format": "compot-deploy-package", "format_version": 1, "producer": f"compot-deploy {versions['compot-deploy']}",
                "versions": versions, "target": target, "kind": graph["kind"],
                "signature": (_signature(tmp / graphs[0]) if len(graphs) == 1 else
                              {g.removesuffix(".onnx"): _signature(tmp / g) for g in graphs}),
                "op_domains": sorted({op.split("::")[0] for op in graph["ops"]}), "compression": summary,
                "validation": {"passed": rep["passed"], "max_abs": rep["parity"]["overall"]["max_abs"],
                               "task": rep.get("task")},
                "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _to_ort_format(folder: Path, files: list[str]) -> None:
    """An .ort file per .onnx graph and the operators a reduced ORT Mobile build must include (ORT's own
    converter)."""
    import subprocess
    import sys

    from ..exporters.onnx_export import SHARED_DATA

    work = folder / ".ort-work"
    work.mkdir()
    for f in [*files, SHARED_DATA]:  # the graphs, and the tensors they share (encoder-decoders)
        if (folder / f).is_file():
            shutil.copy2(folder / f, work / f)
    res = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
                          "--optimization_style", "Fixed"], capture_output=True, text=True)
    if res.returncode != 0:
        raise CompotError(f"ORT-format conversion failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    for f in files:
        ort_file = f.removesuffix(".onnx") + ".ort"
        shutil.copy2(work / ort_file, folder / ort_file)
    cfgs = sorted(work.glob("*required_operators.config"))
    if cfgs:
        shutil.copy2(cfgs[0], folder / "required_operators.config")
    shutil.rmtree(work)


def _package_readme(graph: dict, summary: dict, rep: dict, target: str) -> str:
    lin = summary["linears"]
    task = rep.get("task") or {}
    quality = (f"mean embedding cosine {task['mean_cosine']:.4f} against the original" if "mean_cosine" in task else
               f"next-token agreement {task['next_token_agreement']:.4f} with the original"
               if "next_token_agreement" in task else "not measured")
    kind = "speech" if graph["kind"] == "seq2seq" and graph["inputs"] == ["input_features"] else graph["kind"]
    use = {"encoder": 'm.embed(["a sentence", "another one"])',
           "seq2seq": 'm.generate("translate English to German: a house", 8)',
           "image": 'm.image_features(["photo.jpg"])  # last_hidden_state; needs pillow too',
           "speech": 'm.transcribe("speech.wav", 32)  # audio files need soundfile (and scipy to resample)'}.get(
        kind, 'm.generate("Once upon a", 8)')
    return f"""# compot-deploy package

A {graph['kind']} compressed with COMPOT: the target linears take {lin['file_bytes']:,} of {lin['dense_bytes']:,}
dense bytes (ratio {lin['file_ratio']:.3f} removed, {summary['storage_dtype']} storage). Task-level quality: {quality}.
The ONNX Runtime output matched the compressed PyTorch model to {rep['parity']['overall']['max_abs']:.1e} (max abs).

Runs in stock ONNX Runtime (opset {graph['opset']}; custom ops in the `ai.compot` domain are ONNX functions inside
the model). Needs only `pip install onnxruntime tokenizers numpy`:

```python
from loader import Model
m = Model()
{use}
```

Inputs: {', '.join(graph['inputs'][:5])}{' …' if len(graph['inputs']) > 5 else ''}.
Outputs: {', '.join(graph['outputs'][:3])}{' …' if len(graph['outputs']) > 3 else ''}.
Files and their sha256: manifest.json (`compot-deploy verify THIS_FOLDER` checks them and runs one inference).
{"*.ort + required_operators.config: the ORT-format model for ORT Mobile and the operator list of a reduced build." if target == "mobile" else ""}
"""


def write_tarball(folder: Path, path: Path) -> None:
    """A reproducible .tar.gz of `folder`: sorted entries, zeroed times and owners."""
    import gzip

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [folder] + sorted(folder.rglob("*")):
            info = tar.gettarinfo(str(p), arcname=str(Path(folder.name) / p.relative_to(folder)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if p.is_dir() else 0o644
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(tmp, path)


def summarize(comp: Path, val: Path, bench_dir: Path | None, out: Path, reused, ran) -> dict:
    comp_sum = _compression_summary(comp)
    rep = _sanitized_validation(val)
    s = {"package": str(out / PACKAGE), "tarball": str(out / f"{PACKAGE}.tar.gz"),
         "byte_ratio": comp_sum["linears"]["file_ratio"], "model_file_ratio": comp_sum["model_file"]["ratio"],
         "validation_passed": rep["passed"], "ort_vs_pytorch_max_abs": rep["parity"]["overall"]["max_abs"],
         "task": rep.get("task"), "joint": comp_sum["joint"], "pruned_blocks": comp_sum["pruned_blocks"],
         "reused": reused, "ran": ran}
    if bench_dir is not None:
        from ..bench import summary_rows

        rows = summary_rows(json.loads((bench_dir / "bench.json").read_text()))
        s["latency"] = [{"batch": r["batch"], "seq": r["seq"], "dense_ms": d["p50_ms"], "compressed_ms": r["p50_ms"],
                         "ratio": r["p50_ms"] / d["p50_ms"], "dense_rss_mib": d["peak_rss_mib"],
                         "compressed_rss_mib": r["peak_rss_mib"]}
                        for r in rows if r["label"] == "ort_compressed"
                        for d in rows if d["label"] == "ort_dense" and (d["batch"], d["seq"]) == (r["batch"], r["seq"])]
        if (bench_dir / "peers.json").is_file():
            s["peers"] = json.loads((bench_dir / "peers.json").read_text())
    return s


# ------------------------------------------------------------------------------------------------------- verify


def verify(package: str | Path) -> dict:
    """Check every file of the package against manifest.json, then run one inference (parity_sample.npz)."""
    package = Path(package)
    mf = package / "manifest.json"
    if not mf.is_file():
        raise CompotError(f"{package} is not a compot-deploy package (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if not all(isinstance(m, dict) and {"bytes", "sha256"} <= m.keys() for m in listed.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VerifyFailed(f"verify failed for {package}: manifest.json is not a package manifest (want a JSON "
                           "object whose 'files' maps each file to its bytes and sha256)") from None
    problems = []
    for name, meta in listed.items():
        p = package / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            problems.append(f"{name} does not match its sha256 in manifest.json")
    extra = sorted(p.name for p in package.iterdir() if p.name != "manifest.json" and p.name not in listed)
    problems += [f"{name} is not listed in manifest.json" for name in extra]
    if problems:
        raise VerifyFailed(f"verify failed for {package}: " + "; ".join(problems))
    from ..runtimes.loader import replay

    res = replay(package)
    if not res["passed"]:
        raise VerifyFailed(f"verify failed for {package}: inference does not reproduce the stored sample ({res})")
    return {"files": len(listed), "inference": res}
