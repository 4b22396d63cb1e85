"""`compot-deploy build`: compress → quantize → export → validate → benchmark → package, with a stage cache.

Each stage's output lives in OUT/.cache/<stage>-<key>, where key hashes the stage name, its config, its inputs'
keys (the model folder's content hash for the first stage) and the tool versions. A stage whose folder exists is
reused; folders appear by atomic rename, so a build killed at any point leaves only complete stages behind and a
rerun finishes from there. Every event goes to OUT/build.log.jsonl.

OUT holds one build, of one model (OUT/build.json names it):
- OUT is never the input model, inside it or a folder holding it (refused, --overwrite or not);
- a non-empty OUT that holds no build, or the build of another model, is refused unless --overwrite, which
  replaces it whole: the old OUT is moved aside, deleted once the new build succeeds, put back if it fails;
- the same model with other options rebuilds in place, reusing the stages whose key is unchanged; when it
  succeeds, stage folders this build did not use are deleted, so caches never pile up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ..config import BuildConfig
from ..storage.artifact import sha256_file
from .package import PACKAGE, make_package, summarize, write_tarball

CACHE, REPORTS, LOG, OWNER = ".cache", "reports", "build.log.jsonl", "build.json"


# ------------------------------------------------------------------------------------------------------ hashing

def folder_hash(folder: Path) -> str:
    """Content hash of every file under `folder` (relative names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    src = Path(__file__).resolve().parent.parent
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

    def __init__(self, cfg: BuildConfig, out: Path, force: bool = False, echo=None, overwrite: bool = False):
        self.cfg, self.out, self.force, self.overwrite = cfg, Path(out), force, overwrite
        self.cache = self.out / CACHE
        self.echo = echo or (lambda m: None)
        self.versions = tool_versions()
        self.reused: list[str] = []
        self.ran: list[str] = []
        self.used: list[Path] = []

    def event(self, **kw) -> None:
        kw = {"time": round(time.time(), 3), **kw}
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(kw) + "\n")

    def stage(self, name: str, config, inputs: list[str], fn) -> tuple[Path, str]:
        """The cached folder of `name` (running fn(tmp_folder) when missing) and its key."""
        from ..storage.artifact import atomic_dir

        key = stage_key(name, config, inputs, self.versions)
        folder = self.cache / f"{name}-{key}"
        self.used.append(folder)
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
        from ..models import check_supported_dir, default_model_dir, resolve_model_dir
        from ..storage.artifact import write_error

        cfg = self.cfg
        model = resolve_model_dir(cfg.model) if cfg.model else default_model_dir()  # a .gguf: its HF folder
        check_supported_dir(model, cfg.compress.calibration)  # bad input fails before OUT is created
        aside = self.claim(model, [model] + ([Path(cfg.model)] if cfg.model else []))
        try:
            summary = self._run(model)
        except BaseException as e:
            if aside is not None:  # --overwrite failed: the previous OUT comes back untouched
                shutil.rmtree(self.out, ignore_errors=True)
                aside.rename(self.out)
            if isinstance(e, OSError) and e.errno in (28, 30, 13):  # ENOSPC, EROFS, EACCES
                raise write_error(self.out, e) from None
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        for stale in set(self.cache.iterdir()) - set(self.used):  # other builds' stages: caches never pile up
            shutil.rmtree(stale, ignore_errors=True)
        return summary

    def claim(self, model: Path, inputs: list[Path]) -> Path | None:
        """Apply OUT's policy (module docstring); return where a replaced OUT was moved, or None."""
        from ..errors import CompotError
        from ..storage.artifact import check_output_dir

        out = self.out
        check_output_dir(out, overwrite=True, inputs=inputs)  # never the input; a file refused; writable
        aside = None
        if out.is_dir() and any(out.iterdir()):
            owner = _owner(out)
            if self.overwrite:
                aside = out.parent / f".{out.name}.old-{os.getpid()}"
                shutil.rmtree(aside, ignore_errors=True)
                out.rename(aside)
            elif owner is None:
                raise CompotError(f"output directory {out} is not empty and holds no build (use --overwrite to "
                                  "replace it)")
            elif owner != str(model):
                raise CompotError(f"output directory {out} holds the build of another model ({owner}); use "
                                  "--overwrite to replace it, or another -o")
        out.mkdir(parents=True, exist_ok=True)
        from ..storage.artifact import write_json_atomic

        write_json_atomic(out / OWNER, {"model": str(model)})
        return aside

    def _run(self, model: Path) -> dict:
        from ..exporters.validate import validate_export

        cfg = self.cfg
        self.cache.mkdir(exist_ok=True)
        for stale in self.cache.glob(".*.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        self.event(event="build", status="start", model=str(model), versions=self.versions)
        src_key = folder_hash(model)
        comp, key = self.stage("compress", cfg.compress.model_dump(mode="json"), [src_key],
                               lambda tmp: _compress(model, tmp, cfg.compress))
        export_cfg = cfg.export.model_dump(mode="json")
        exp, key = self.stage("export", export_cfg, [key], lambda tmp: _export(comp, tmp, cfg.export))
        vcfg = cfg.gate.model_copy(update={"device": "cuda" if cfg.target == "cuda" else "cpu"})
        val, val_key = self.stage("validate", vcfg.model_dump(mode="json"), [key],
                                  lambda tmp: validate_export(exp, vcfg, source=comp, reference=model, out=tmp))  # the gate's report only
        bench_dir = None
        if cfg.bench.enabled:
            dense, dkey = self.stage("export-dense", export_cfg, [src_key],
                                     lambda tmp: _export(model, tmp, cfg.export))
            peers, pkey = None, None
            if cfg.bench.peers:
                pcfg = {"peers": list(cfg.bench.peers), "eval_texts": cfg.gate.eval_texts}
                peers, pkey = self.stage("peers", pcfg, [dkey],
                                         lambda tmp: _peers(dense, model, tmp, cfg, self.echo))
            bench_dir, _ = self.stage("bench", {**cfg.bench.model_dump(mode="json"), "target": cfg.target},
                                      [val_key, dkey, pkey], lambda tmp: _bench(exp, dense, peers, val, tmp, cfg))
        pkg, _ = self.stage("package", {"target": cfg.target}, [val_key],
                            lambda tmp: make_package(exp, val, comp, tmp, cfg.target, self.versions))
        summary = self.publish(pkg, bench_dir, comp, val)
        self.event(event="build", status="done", reused=self.reused, ran=self.ran, summary=summary)
        return summary

    def publish(self, pkg: Path, bench_dir: Path | None, comp: Path, val: Path) -> dict:
        """Copy the package (and its .tar.gz) to OUT/package, the bench reports to OUT/reports; summarize."""
        from ..storage.artifact import atomic_dir

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


def _owner(out: Path) -> str | None:
    """The model whose build OUT holds (build.json; builds before it: the log's first event), or None."""
    if (out / OWNER).is_file():
        return json.loads((out / OWNER).read_text()).get("model")
    if (out / LOG).is_file():
        for line in (out / LOG).read_text().splitlines():
            with contextlib.suppress(ValueError):
                if "model" in (e := json.loads(line)):
                    return e["model"]
    return None


# --------------------------------------------------------------------------------------------------- the stages


def _compress(model: Path, tmp: Path, cfg) -> None:
    from ..compression import compress

    compress(model, tmp, cfg, overwrite=True, progress=False)


def _export(src: Path, tmp: Path, ecfg) -> None:
    from ..exporters.onnx_export import export_dir

    export_dir(src, tmp, ecfg, overwrite=True)


def _peers(dense: Path, model: Path, tmp: Path, cfg: BuildConfig, echo) -> None:
    from ..calibrate.data import heldout_texts
    from ..peers import make_peers

    make_peers(cfg.bench.peers, dense, model, heldout_texts()[: cfg.gate.eval_texts], tmp, progress=echo)


def _bench(exp: Path, dense: Path, peers: Path | None, val: Path, tmp: Path, cfg: BuildConfig) -> None:
    """The benchmark of the export, the dense export and the peers; with peers, also peers.{json,md}: the
    package beside them (peers.comparison)."""
    from ..bench import bench, write_reports
    from ..peers import comparison, markdown
    from ..runtimes import artifact_bytes

    device = "cuda" if cfg.target == "cuda" else "cpu"
    bcfg = cfg.bench.model_copy(update={"backends": ("ort",), "devices": (device,)})
    listed = json.loads((peers / "peers.json").read_text()) if peers is not None else {"peers": []}
    targets = [("ort_dense", str(dense)), ("ort_compressed", str(exp))]
    targets += [(f"peer_{p['name']}", str(peers / p["name"])) for p in listed["peers"]]
    report = bench(targets, bcfg)
    write_reports(report, tmp)
    if peers is None:
        return
    from ..bench import summary_rows

    latency: dict[str, dict] = {}
    for r in summary_rows(report):
        row = latency.setdefault(r["label"], {"rss_mib": 0.0, "p50_ms": {}})
        row["rss_mib"] = max(row["rss_mib"], r["peak_rss_mib"])
        row["p50_ms"][f"{r['batch']}x{r['seq']}"] = r["p50_ms"]
    task = json.loads((val / "validation.json").read_text()).get("task")
    package = {"label": "compot-deploy package", "file_bytes": artifact_bytes(exp), "task": task}
    dense_point = {"label": "dense float32 export (original)", "file_bytes": artifact_bytes(dense), "task": None}
    cmp = comparison(package, listed["peers"], latency, dense_point)
    if "skipped" in listed:
        cmp["skipped"] = listed["skipped"]
    (tmp / "peers.json").write_text(json.dumps(cmp, indent=2))
    (tmp / "peers.md").write_text(markdown(cmp))
