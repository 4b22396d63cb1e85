"""`compot-deploy bench`: each backend in its own process, real PyTorch and ORT runs, reports written."""

import json
import subprocess
import sys

import pytest

from compot_deploy.bench import ratio_with_spread, summary_rows
from compot_deploy.config import ExportConfig
from compot_deploy.exporters.onnx_export import export_dir


@pytest.mark.slow  # suite time: the build tests run bench (encoder) in CI
def test_bench_torch_and_ort_on_a_decoder(tiny_dirs, tmp_path):
    export_dir(tiny_dirs["llama"], tmp_path / "ort", ExportConfig())
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "bench", f"pt={tiny_dirs['llama']}",
                          f"onnx={tmp_path / 'ort'}", "--shapes", "1x4,2x8", "--warmup", "1", "--repeat", "3",
                          "--rounds", "2", "--decode-steps", "3", "-o", str(tmp_path / "rep")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert {(r["label"], r["backend"]) for r in rep["results"]} == {("pt", "torch"), ("onnx", "ort")}
    assert rep["environment"]["logical_cores"] >= 1 and rep["environment"]["onnxruntime"]
    for r in rep["results"]:
        assert len(r["rounds"]) == 2
        for rnd in r["rounds"]:
            assert 0 < rnd["peak_rss_after_load_bytes"] <= rnd["peak_rss_bytes"]
            assert rnd["peak_rss_sampled_bytes"] > 50 * 2**20  # a python with torch or onnxruntime loaded
            assert all(0 < row["p50_ms"] <= row["p99_ms"] and row["decode"]["n"] == 3 for row in rnd["rows"])
    ort_desc = next(r for r in rep["results"] if r["backend"] == "ort")["rounds"][0]["runtime"]
    assert ort_desc["providers"] == ["CPUExecutionProvider"] and ort_desc["graph_optimization"] == "all"
    rows = summary_rows(rep)
    assert len(rows) == 4 and all(r["decode_ms_per_token"] > 0 for r in rows)
    r = ratio_with_spread(rep, "onnx", "pt", 2, 8)
    assert r["min"] <= r["ratio"] <= r["max"] and len(r["rounds"]) == 2
    assert (tmp_path / "rep" / "bench.md").read_text().count("| onnx | ort | cpu |") == 2
    assert (tmp_path / "rep" / "bench.png").stat().st_size > 10_000


def test_bench_refuses_bad_targets(tmp_path):
    for args in (["bench", str(tmp_path / "missing"), "-o", str(tmp_path / "r")],
                 ["bench", str(tmp_path), "-o", str(tmp_path / "r")],
                 ["bench", str(tmp_path), "--shapes", "1by2", "-o", str(tmp_path / "r")]):
        res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", *args], capture_output=True, text=True)
        assert res.returncode == 2, (args, res.stderr)
        assert not (tmp_path / "r").exists()


@pytest.mark.slow  # suite time: the family builds in CI skip bench
def test_bench_on_encoder_decoder_image_and_speech_exports(minilm_dir, tmp_path):
    """T5 and Whisper: the encoder plus the decoder's first call, then decode steps; ViT: one row per batch size,
    its sequence the tokens the model makes (16 patches + class token). PyTorch and ORT on each."""
    from conftest import build_tiny
    from test_families import _tiny_vit, _tiny_whisper

    srcs = {"t5": build_tiny("t5", tmp_path / "t5", minilm_dir), "vit": _tiny_vit(tmp_path / "vit"),
            "whisper": _tiny_whisper(tmp_path / "whisper", minilm_dir)}
    targets = []
    for name, src in srcs.items():
        export_dir(src, tmp_path / f"{name}-ort", ExportConfig())
        targets += [f"{name}-pt={src}", f"{name}-ort={tmp_path / f'{name}-ort'}"]
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "bench", *targets, "--shapes", "1x8,2x8",
                          "--warmup", "1", "--repeat", "2", "--rounds", "1", "--decode-steps", "2",
                          "-o", str(tmp_path / "rep")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = summary_rows(json.loads((tmp_path / "rep" / "bench.json").read_text()))
    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    assert {(r["batch"], r["seq"]) for r in by["vit-ort"]} == {(1, 17), (2, 17)} == \
        {(r["batch"], r["seq"]) for r in by["vit-pt"]}
    assert {(r["batch"], r["seq"]) for r in by["whisper-ort"]} == {(1, 50), (2, 50)}
    for label in ("t5-pt", "t5-ort", "whisper-pt", "whisper-ort"):
        assert all(r["p50_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in by[label]), label
