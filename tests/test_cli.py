"""The CLI on bad input: one clear line on stderr, a non-zero exit, and nothing left in OUT."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compot_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def assert_clean_failure(res, out: Path, pattern: str):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert pattern in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_help_lists_every_option():
    res = run("compress", "--help")
    assert res.returncode == 0
    for opt in ("--ratio", "--method", "--allocation", "--calib", "--samples", "--seq-len", "--sequential",
                "--dtype", "--include", "--exclude", "--overwrite"):
        assert opt in res.stdout


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", tmp_path / "nope", "-o", out), out, "not found")


def test_not_a_transformer(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    assert_clean_failure(run("compress", tmp_path / "junk", "-o", out), out, "no config.json")
    (tmp_path / "junk" / "config.json").write_text(json.dumps({"hello": 1}))
    assert_clean_failure(run("compress", tmp_path / "junk", "-o", out), out, "model_type")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(ratio, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", tiny_dirs["bert"], "--ratio", ratio, "-o", out), out, "ratio")


def test_calibration_text_too_short(tiny_dirs, tmp_path):
    calib = tmp_path / "short.txt"
    calib.write_text("just a few words\n")
    out = tmp_path / "out"
    res = run("compress", tiny_dirs["llama"], "--calib", calib, "--samples", "4", "--seq-len", "64", "-o", out)
    assert_clean_failure(res, out, "tokens")


def test_nan_in_a_weight(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["bert"], bad)
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if k.endswith("intermediate.dense.weight"))
    sd[name][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_failure(run("compress", bad, "-o", out, "--samples", "8"), out, "NaN/Inf")


def test_gram_not_positive_definite(tiny_dirs, tmp_path):
    """Zeroed embedding LayerNorm → every input of block 0 is zero → its Grams are zero at any damping."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "zero"
    shutil.copytree(tiny_dirs["bert"], bad)
    sd = load_file(bad / "model.safetensors")
    for k in sd:
        if k.startswith("embeddings.LayerNorm"):
            sd[k].zero_()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_failure(run("compress", bad, "-o", out, "--samples", "8"), out, "not positive definite")


def test_non_empty_output_is_refused_and_kept(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("compress", tiny_dirs["bert"], "-o", out, "--samples", "8")
    assert res.returncode != 0 and "not empty" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_compress_cli_writes_a_loadable_model(tiny_dirs, tmp_path):
    out = tmp_path / "ok"
    res = run("compress", tiny_dirs["gpt2"], "-o", out, "--ratio", "0.3", "--samples", "8", "--seq-len", "48")
    assert res.returncode == 0, res.stderr
    assert "fraction removed 0.3" in res.stdout and "transformer.h.0.attn.c_attn" in res.stdout
    report = json.loads((out / "compression_report.json").read_text())
    assert report["linears"]["file_ratio"] >= 0.29
