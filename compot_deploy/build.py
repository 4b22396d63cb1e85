"""`compot-deploy build`: compress → quantize → export → validate → benchmark → package, with a stage cache.

Each stage's output lives in OUT/.cache/<stage>-<key>, where key hashes the stage name, its config, its inputs'
keys (the model folder's content hash for the first stage) and the tool versions. A stage whose folder exists is
reused; folders appear by atomic rename, so a build killed at any point leaves only complete stages behind and a
rerun finishes from there. Every event goes to OUT/build.log.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from .config import BuildConfig
from .errors import CompotError, VerifyFailed

CACHE, PACKAGE, REPORTS, LOG = ".cache", "package", "reports", "build.log.jsonl"


# ------------------------------------------------------------------------------------------------------ hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hash(folder: Path) -> str:
    """Content hash of every file under `folder` (relative names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    src = Path(__file__).resolve().parent
    code = hashlib.sha256(b"".join(sha256_file(p).encode() for p in sorted(src.rglob("*.py")))).hexdigest()[:16]
    out = {"compot-deploy": __version__, "compot-deploy-source": code}  # a code change invalidates the cache
    for name in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = version("onnxruntime-gpu") if name == "onnxruntime" else None
    return out


def stage_key(stage: str, config, inputs: list[str], versions: dict) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------------- build


class Build:
    """One build into `out`: runs or reuses each stage, logging to build.log.jsonl."""

    def __init__(self, cfg: BuildConfig, out: Path, force: bool = False, echo=None):
        self.cfg, self.out, self.force = cfg, Path(out), force
        self.cache = self.out / CACHE
        self.echo = echo or (lambda m: None)
        self.versions = tool_versions()
        self.reused: list[str] = []
        self.ran: list[str] = []

    def event(self, **kw) -> None:
        kw = {"time": round(time.time(), 3), **kw}
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(kw) + "\n")

    def stage(self, name: str, config, inputs: list[str], fn) -> tuple[Path, str]:
        """The cached folder of `name` (running fn(tmp_folder) when missing) and its key."""
        from .artifact import atomic_dir

        key = stage_key(name, config, inputs, self.versions)
        folder = self.cache / f"{name}-{key}"
        if folder.is_dir() and not self.force:
            self.reused.append(name)
            self.event(stage=name, status="reused", key=key)
            self.echo(f"[{name}] reused ({folder.name})")
            return folder, key
        self.event(stage=name, status="start", key=key)
        self.echo(f"[{name}] running")
        t0 = time.perf_counter()
        try:
            with atomic_dir(folder, overwrite=True) as tmp:
                fn(tmp)
        except BaseException as e:
            self.event(stage=name, status="failed", key=key, error=f"{type(e).__name__}: {e}"[:500])
            raise
        self.ran.append(name)
        self.event(stage=name, status="done", key=key, seconds=round(time.perf_counter() - t0, 3))
        return folder, key

    def run(self) -> dict:
        from .models import default_model_dir, read_hf_config

        cfg = self.cfg
        model = Path(cfg.model) if cfg.model else default_model_dir()
        read_hf_config(model)  # bad input fails before OUT is created
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(exist_ok=True)
        for stale in self.cache.glob(".*.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        self.event(event="build", status="start", model=str(model), versions=self.versions)
        src_key = folder_hash(model)
        compress_cfg = cfg.compress.model_copy(update={"quantize": None})
        comp, key = self.stage("compress", compress_cfg.model_dump(mode="json"), [src_key],
                               lambda tmp: _compress(model, tmp, compress_cfg))
        if cfg.compress.quantize:
            q = cfg.compress.quantize
            comp, key = self.stage("quantize", {"q": q.model_dump(mode="json"),
                                                "calibration": cfg.compress.calibration.model_dump(mode="json")},
                                   [key], lambda tmp: _quantize(comp, tmp, q, cfg.compress.calibration))
        export_cfg = cfg.export.model_dump(mode="json")
        exp, key = self.stage("export", export_cfg, [key], lambda tmp: _export(comp, tmp, cfg.export))
        vcfg = cfg.gate.model_copy(update={"device": "cuda" if cfg.target == "cuda" else "cpu"})
        val, val_key = self.stage("validate", vcfg.model_dump(mode="json"), [key],
                                  lambda tmp: _validate(exp, comp, model, tmp, vcfg))
        bench_dir = None
        if cfg.bench.enabled:
            dense, dkey = self.stage("export-dense", export_cfg, [src_key],
                                     lambda tmp: _export(model, tmp, cfg.export))
            bench_dir, _ = self.stage("bench", {**cfg.bench.model_dump(mode="json"), "target": cfg.target},
                                      [val_key, dkey], lambda tmp: _bench(val, dense, tmp, cfg))
        pkg, _ = self.stage("package", {"target": cfg.target}, [val_key],
                            lambda tmp: make_package(val, comp, tmp, cfg.target, self.versions))
        summary = self.publish(pkg, bench_dir, comp, val)
        self.event(event="build", status="done", reused=self.reused, ran=self.ran, summary=summary)
        return summary

    def publish(self, pkg: Path, bench_dir: Path | None, comp: Path, val: Path) -> dict:
        """Copy the package (and its .tar.gz) to OUT/package, the bench reports to OUT/reports; summarize."""
        from .artifact import atomic_dir

        with atomic_dir(self.out / PACKAGE, overwrite=True) as tmp:
            for f in sorted(pkg.iterdir()):
                shutil.copy2(f, tmp / f.name)
        tar = self.out / f"{PACKAGE}.tar.gz"
        write_tarball(self.out / PACKAGE, tar)
        if bench_dir is not None:
            with atomic_dir(self.out / REPORTS, overwrite=True) as tmp:
                for f in bench_dir.iterdir():
                    shutil.copy2(f, tmp / f.name)
        return summarize(comp, val, bench_dir, self.out, self.reused, self.ran)


# --------------------------------------------------------------------------------------------------- the stages


def _compress(model: Path, tmp: Path, cfg) -> None:
    from .pipeline import compress

    compress(model, tmp, cfg, overwrite=True, progress=False)


def _quantize(comp: Path, tmp: Path, q, calib) -> None:
    from .pipeline import quantize_dir

    quantize_dir(comp, tmp, q, calib, overwrite=True, progress=False)


def _export(src: Path, tmp: Path, ecfg) -> None:
    from .exporters.onnx_export import export_dir

    export_dir(src, tmp, ecfg, overwrite=True)


def _validate(exp: Path, comp: Path, model: Path, tmp: Path, vcfg) -> None:
    """Copy the export and run the gate on the copy (the cached export stays untouched); fails closed."""
    from .exporters.validate import validate_export

    for f in exp.iterdir():
        shutil.copy2(f, tmp / f.name)
    validate_export(tmp, vcfg, source=comp, reference=model)


def _bench(val: Path, dense: Path, tmp: Path, cfg: BuildConfig) -> None:
    from .bench import bench, write_reports

    device = "cuda" if cfg.target == "cuda" else "cpu"
    rep = bench([("ort_dense", str(dense)), ("ort_compressed", str(val))], ["ort"], [device], cfg.bench.shapes,
                cfg.bench.warmup, cfg.bench.repeat)
    write_reports(rep, tmp)


# ------------------------------------------------------------------------------------------------------ package

LOADER = '''"""Load this package with onnxruntime, tokenizers and numpy only.

    from loader import Model
    m = Model()                       # this folder; Model(providers=["CUDAExecutionProvider"]) on a GPU
    m.embed(["a sentence"])           # encoders: mean-pooled sentence embeddings, (n, hidden)
    m.generate("Once upon", 8)        # decoders: greedy continuation through the KV cache, token ids
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


class Model:
    def __init__(self, folder=HERE, providers=("CPUExecutionProvider",)):
        folder = Path(folder)
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=list(providers))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "config.json").read_text())
        pad = cfg.get("pad_token_id")
        self.tokenizer.enable_padding(pad_id=pad if isinstance(pad, int) else 0)

    def encode(self, texts, max_length=128):
        self.tokenizer.enable_truncation(max_length)
        enc = self.tokenizer.encode_batch(list(texts))
        feed = {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in enc], np.int64)
        return feed

    def embed(self, texts, max_length=128):
        feed = self.encode(texts, max_length)
        (h,) = self.session.run(["last_hidden_state"], feed)
        m = feed["attention_mask"][..., None].astype(np.float64)
        return (h * m).sum(1) / m.sum(1)

    def generate(self, text, max_new_tokens=16):
        ids = np.array([self.tokenizer.encode(text, add_special_tokens=False).ids], np.int64)
        past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}
        names = [o.name for o in self.session.get_outputs()]
        out, n = [], ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None]}
        for _ in range(max_new_tokens):
            res = dict(zip(names, self.session.run(None, {**feed, **past})))
            tok = int(res["logits"][0, -1].argmax())
            out.append(tok)
            past = {k: res[k.replace("past_key_values", "present")] for k in past}
            n += 1
            feed = {"input_ids": np.array([[tok]], np.int64), "attention_mask": np.ones((1, n), np.int64),
                    "position_ids": np.array([[n - 1]], np.int64)}
        return out
'''


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
            "quantize": cfg.get("quantize"), "joint": rep.get("joint")}


def make_package(val: Path, comp: Path, tmp: Path, target: str, versions: dict) -> None:
    """The deployable folder: model, tokenizer, config, reports, loader, README, manifest (checksums)."""
    from .exporters.validate import markdown

    skip = {"export.json", "validation.json", "validation.md"}
    for f in sorted(val.iterdir()):
        if f.name not in skip:
            shutil.copy2(f, tmp / f.name)
    cfg = json.loads((tmp / "config.json").read_text())
    section = cfg.get("compot", {})
    section.pop("source_model", None)  # a build-machine path
    for lay in section.get("layers", {}).values():  # timings: the package must be byte-identical across builds
        lay.pop("seconds", None)
        if isinstance(lay.get("quant"), dict):
            lay["quant"].pop("seconds", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rep = _sanitized_validation(val)
    (tmp / "validation.json").write_text(json.dumps(rep, indent=2) + "\n")
    (tmp / "validation.md").write_text(markdown({**rep, "export_dir": "model.onnx", "source": "the compressed model"}))
    (tmp / "loader.py").write_text(LOADER)
    graph = json.loads((val / "export.json").read_text())["graph"]
    if target == "mobile":
        _to_ort_format(tmp)
    summary = _compression_summary(comp)
    (tmp / "README.md").write_text(_package_readme(graph, summary, rep, target))
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
    manifest = {"format": "compot-deploy-package", "format_version": 1, "producer": f"compot-deploy {versions['compot-deploy']}",
                "versions": versions, "target": target, "kind": graph["kind"], "signature": _signature(tmp / "model.onnx"),
                "op_domains": sorted({op.split("::")[0] for op in graph["ops"]}), "compression": summary,
                "validation": {"passed": rep["passed"], "max_abs": rep["parity"]["overall"]["max_abs"],
                               "task": rep.get("task")},
                "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _to_ort_format(folder: Path) -> None:
    """model.ort and the operators a reduced ORT Mobile build must include (ORT's own converter)."""
    import subprocess
    import sys

    work = folder / ".ort-work"
    work.mkdir()
    shutil.copy2(folder / "model.onnx", work / "model.onnx")
    res = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
                          "--optimization_style", "Fixed"], capture_output=True, text=True)
    if res.returncode != 0:
        raise CompotError(f"ORT-format conversion failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    shutil.copy2(work / "model.ort", folder / "model.ort")
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
    use = ('m.embed(["a sentence", "another one"])' if graph["kind"] == "encoder" else 'm.generate("Once upon a", 8)')
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
{"model.ort + required_operators.config: the ORT-format model for ORT Mobile and the operator list of a reduced build." if target == "mobile" else ""}
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
         "task": rep.get("task"), "joint": comp_sum["joint"], "reused": reused, "ran": ran}
    if bench_dir is not None:
        from .bench import summary_rows

        rows = summary_rows(json.loads((bench_dir / "bench.json").read_text()))
        s["latency"] = [{"batch": r["batch"], "seq": r["seq"], "dense_ms": d["p50_ms"], "compressed_ms": r["p50_ms"],
                         "ratio": r["p50_ms"] / d["p50_ms"], "dense_rss_mib": d["peak_rss_mib"],
                         "compressed_rss_mib": r["peak_rss_mib"]}
                        for r in rows if r["label"] == "ort_compressed"
                        for d in rows if d["label"] == "ort_dense" and (d["batch"], d["seq"]) == (r["batch"], r["seq"])]
    return s


# ------------------------------------------------------------------------------------------------------- verify


def verify(package: str | Path) -> dict:
    """Check every file of the package against manifest.json, then run one inference (parity_sample.npz)."""
    package = Path(package)
    mf = package / "manifest.json"
    if not mf.is_file():
        raise CompotError(f"{package} is not a compot-deploy package (no manifest.json)")
    manifest = json.loads(mf.read_text())
    problems = []
    listed = manifest["files"]
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
    from .runtimes.standalone import replay

    res = replay(package)
    if not res["passed"]:
        raise VerifyFailed(f"verify failed for {package}: inference does not reproduce the stored sample ({res})")
    return {"files": len(listed), "inference": res}
