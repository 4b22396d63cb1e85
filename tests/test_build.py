"""`compot-deploy build`: stages, cache and resume after kill -9, the package, `verify`, the package's loader."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_export import isolated_python

CLI = [sys.executable, "-m", "compot_deploy.cli"]
TINY = ["--samples", "8", "--seq-len", "48"]


def _build(*args, **kw):
    return subprocess.run(CLI + ["build", *args], capture_output=True, text=True, **kw)


def _shas(pkg: Path) -> dict:
    return json.loads((pkg / "manifest.json").read_text())["files"]


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "build.log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("args,pattern", [
    (["--target-ratio", "0.2", "--gptq-bits", "4"], "pick every layer's bits itself"),
    (["--gptq-group", "32"], "need --gptq-bits"),
    (["--target-ratio", "0.2", "--method", "cospadi"], "cospadi cannot take a byte target"),
])
def test_build_refuses_what_compress_refuses_before_any_work(args, pattern, tiny_dirs, tmp_path):
    """build and compress share one path from options to configs: the same combination fails the same way, at
    once (before calibration or the joint profiling), with nothing written."""
    from test_cli import assert_clean_failure

    for cmd in ("build", "compress"):
        out = tmp_path / cmd
        t0 = time.perf_counter()
        res = subprocess.run(CLI + [cmd, str(tiny_dirs["bert"]), *TINY, *args, "-o", str(out)], capture_output=True,
                             text=True)
        assert res.returncode == 2 and time.perf_counter() - t0 < 30
        assert_clean_failure(res, out, pattern)


def test_build_package_cache_config_and_verify(tiny_dirs, tmp_path):
    out = tmp_path / "b"
    res = _build(str(tiny_dirs["bert"]), *TINY, "--gptq-bits", "4", "--gptq-group", "32", "-o", str(out),
                 "--save-config", str(tmp_path / "build.yaml"))
    assert res.returncode == 0, res.stderr
    pkg = out / "package"
    man = json.loads((pkg / "manifest.json").read_text())
    assert {"model.onnx", "tokenizer.json", "config.json", "loader.py", "README.md", "validation.json",
            "parity_sample.npz"} <= set(man["files"])
    assert man["signature"]["inputs"][0]["name"] == "input_ids" and "ai.compot" in man["op_domains"]
    assert man["compression"]["linears"]["file_ratio"] > 0.3 and man["validation"]["passed"]
    assert [e["stage"] for e in _log(out) if "stage" in e and e["status"] == "done"] == \
        ["compress", "export", "validate", "export-dense", "peers", "bench", "package"]
    assert (out / "package.tar.gz").stat().st_size > 100_000 and (out / "reports" / "bench.json").is_file()
    # ORT's one-liners of the original, measured beside the package: file bytes, quality, session RSS, latency
    peers = json.loads((out / "reports" / "peers.json").read_text())
    rows = {r["label"]: r for r in peers["rows"]}
    assert list(rows)[0] == "compot-deploy package" and len(rows) == 5
    dense = rows["dense float32 export (original)"]
    assert rows["ORT quantize_dynamic int8"]["file_bytes"] < 0.4 * dense["file_bytes"]
    for r in rows.values():
        assert r["rss_mib"] > 0 and set(r["p50_ms"]) == {"1x16", "1x128", "8x128"} and r["quality"] > 0.5, r
    assert "no ORT one-liner" in res.stdout or "dominated" in res.stdout

    # the saved config reproduces the build: every stage reused, same files
    res = _build("--config", str(tmp_path / "build.yaml"), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "reused stages: compress, export, validate, export-dense, peers, bench, package" in res.stdout
    # a changed option reruns from the first stage it affects
    cfg = yaml.safe_load((tmp_path / "build.yaml").read_text())
    cfg["export"]["sparse_body"] = "dense"
    (tmp_path / "b2.yaml").write_text(yaml.safe_dump(cfg))
    res = _build("--config", str(tmp_path / "b2.yaml"), "-o", str(out), "--no-bench")
    assert res.returncode == 0 and "reused stages: compress\n" in res.stdout, res.stdout
    assert len(list((out / ".cache").iterdir())) == 4  # the first build's export … bench folders are gone

    assert subprocess.run(CLI + ["verify", str(pkg)], capture_output=True, text=True).returncode == 0
    with open(pkg / "model.onnx", "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(f.seek(0, 2) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    res = subprocess.run(CLI + ["verify", str(pkg)], capture_output=True, text=True)
    assert res.returncode == 3 and "model.onnx does not match its sha256" in res.stderr, res.stderr
    (pkg / "model.onnx").unlink()
    (pkg / "extra.txt").write_text("x")
    res = subprocess.run(CLI + ["verify", str(pkg)], capture_output=True, text=True)
    assert res.returncode == 3 and "model.onnx is missing" in res.stderr and "extra.txt is not listed" in res.stderr


def test_build_refuses_bad_input(tiny_dirs, tmp_path):
    (tmp_path / "bad.yaml").write_text("compress: {allocation: {ratio: 2}}\n")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    for args, msg in ((["--config", str(tmp_path / "bad.yaml")], "ratio"),
                      (["--config", str(tmp_path / "missing.yaml")], "not found"),
                      ([str(tmp_path / "nomodel")], "not found")):
        res = _build(*args, "-o", str(tmp_path / "o"))
        assert res.returncode == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "o").exists()
    res = _build(str(tiny_dirs["bert"]), "-o", str(tmp_path / "junk"))
    assert res.returncode == 2 and "holds no build" in res.stderr
    assert [p.name for p in (tmp_path / "junk").iterdir()] == ["f"]


def test_build_output_policy(tiny_dirs, tmp_path):
    """OUT holds one build of one model: another model's build is refused unless --overwrite, which replaces the
    folder whole; the input model is never OUT; after a build only its own stage caches remain."""
    out = tmp_path / "out"
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump({"gate": {"eval_texts": 0}}))  # the task-level check: off
    quick = [*TINY, "--no-bench", "-q", "--config", str(tmp_path / "gate.yaml")]
    assert _build(str(tiny_dirs["bert"]), *quick, "-o", str(out)).returncode == 0
    shas = _shas(out / "package")
    res = _build(str(tiny_dirs["llama"]), *quick, "-o", str(out))
    assert res.returncode == 2 and "holds the build of another model" in res.stderr, res.stderr
    assert _shas(out / "package") == shas
    (out / "mine.txt").write_text("x")
    res = _build(str(tiny_dirs["llama"]), *quick, "-o", str(out), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not (out / "mine.txt").exists() and _shas(out / "package") != shas
    assert json.loads((out / "package" / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name.split("-")[0] for p in (out / ".cache").iterdir()) == ["compress", "export", "package",
                                                                                 "validate"]
    res = _build(str(tiny_dirs["llama"]), *TINY, "--no-bench", "-q", "-o", str(tiny_dirs["llama"]), "--overwrite")
    assert res.returncode == 2 and "is the input" in res.stderr, res.stderr


def _kill_during(out: Path, stage: str, delay: float) -> None:
    """Start a default build, kill -9 it `delay` s after `stage` starts (the stage must still be running)."""
    proc = subprocess.Popen(CLI + ["build", "-q", "--no-bench", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "build.log.jsonl").exists() and any(e.get("stage") == stage and e["status"] == "start"
                                                      for e in _log(out)):
            break
        assert proc.poll() is None, "build ended before the stage started"
        time.sleep(0.05)
    time.sleep(delay)
    assert proc.poll() is None, f"build finished {stage} before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(e.get("stage") == stage and e["status"] == "done" for e in _log(out))


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_package(tmp_path, heldout_texts):
    """MiniLM (README's first command): killed mid-compress and mid-export, each rerun finishes with every package
    file byte-identical to an uninterrupted build; the loader needs only onnxruntime, tokenizers and numpy."""
    ref = tmp_path / "ref"
    res = _build("-q", "--no-bench", "-o", str(ref))
    assert res.returncode == 0, res.stderr

    k1 = tmp_path / "k1"
    _kill_during(k1, "compress", 2.0)
    assert list((k1 / ".cache").glob(".compress-*.tmp-*")) and not list((k1 / ".cache").glob("compress-*"))
    res = _build("--no-bench", "-o", str(k1))
    assert res.returncode == 0, res.stderr
    assert _shas(k1 / "package") == _shas(ref / "package")

    k2 = tmp_path / "k2"
    _kill_during(k2, "export", 0.3)
    res = _build("--no-bench", "-o", str(k2))
    assert res.returncode == 0 and "reused stages: compress\n" in res.stdout, res.stdout
    reused = [e["stage"] for e in _log(k2) if e.get("status") == "reused"]
    assert reused == ["compress"]
    assert _shas(k2 / "package") == _shas(ref / "package")
    assert (k2 / "package.tar.gz").read_bytes() == (ref / "package.tar.gz").read_bytes()
    for name, meta in _shas(ref / "package").items():  # the manifest tells the truth
        import hashlib

        assert hashlib.sha256((k2 / "package" / name).read_bytes()).hexdigest() == meta["sha256"]

    # the package's own loader in a python that has only onnxruntime, tokenizers and numpy
    import onnxruntime
    import tokenizers
    import torch

    import compot_deploy
    from compot_deploy.evaluate import mean_pooled_embeddings
    from compot_deploy.models import load_tokenizer

    texts = heldout_texts[:48]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = tmp_path / "use_loader.py"
    script.write_text(f"import sys, json, numpy as np\nsys.path.insert(0, {str(ref / 'package')!r})\n"
                      "from loader import Model\n"
                      f"texts = json.load(open({str(tmp_path / 'texts.json')!r}))\n"
                      f"np.save({str(tmp_path / 'emb.npy')!r}, Model().embed(texts))\n")
    py = isolated_python(tmp_path, extra=(tokenizers,))
    res = subprocess.run(py + [str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    emb = torch.from_numpy(np.load(tmp_path / "emb.npy"))
    comp = next((ref / ".cache").glob("compress-*"))
    pt = mean_pooled_embeddings(compot_deploy.load(comp), load_tokenizer(comp), texts)
    cos = torch.nn.functional.cosine_similarity(emb, pt, dim=1)
    assert float(cos.min()) >= 0.999, cos.min()
    del onnxruntime


def test_mobile_target_writes_an_ort_model_that_runs(tiny_dirs, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m"
    res = _build(str(tiny_dirs["bert"]), *TINY, "--device", "mobile", "--no-bench", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stderr, "ORT's colour codes reached stderr"
    pkg = out / "package"
    ops = (pkg / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops
    sample = dict(np.load(pkg / "parity_sample.npz"))
    feed = {k: sample[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    outs = [ort.InferenceSession(str(pkg / f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for f in ("model.onnx", "model.ort")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    assert set(json.loads((pkg / "manifest.json").read_text())["files"]) >= {"model.ort", "required_operators.config"}
