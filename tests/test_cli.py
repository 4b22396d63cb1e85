"""The CLI on bad input: one clear line on stderr, a non-zero exit, and nothing left in OUT."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROGRESS_LINE, message_lines

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compot_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def assert_clean_failure(res, out: Path, pattern: str):
    assert res.returncode != 0
    lines = message_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert pattern in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_help_lists_every_option():
    res = run("compress", "--help")
    assert res.returncode == 0
    for opt in ("--ratio", "--method", "--allocation", "--calib", "--samples", "--seq-len", "--sequential",
                "--dtype", "--include", "--exclude", "--overwrite", "--iters", "--refit"):
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


def test_an_error_cap_the_budget_cannot_meet(tiny_dirs, tmp_path):
    """--max-layer-error below what any layer can reach at the budget: one error line naming the option."""
    out = tmp_path / "out"
    res = run("compress", tiny_dirs["bert"], "--ratio", "0.5", "--max-layer-error", "1e-9", "-o", out)
    assert_clean_failure(res, out, "--max-layer-error 1e-09 leaves no cheap enough candidate")


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
    # 24 documents: enough tokens (4 per dimension) that no calibration warning precedes the error
    assert_clean_failure(run("compress", bad, "-o", out, "--samples", "24"), out, "not positive definite")


def test_non_empty_output_is_refused_and_kept(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("compress", tiny_dirs["bert"], "-o", out, "--samples", "8")
    assert res.returncode != 0 and "not empty" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_compress_cli_writes_a_loadable_model(tiny_dirs, tmp_path):
    out = tmp_path / "ok"
    res = run("compress", tiny_dirs["gpt2"], "-o", out, "--samples", "8", "--seq-len", "48", "--no-refit")
    assert res.returncode == 0, res.stderr  # compress's own defaults (not build's): --ratio 0.3, table left as is
    assert "embeddings" not in json.loads((out / "config.json").read_text())["compot"]
    assert "fraction removed 0.3" in res.stdout and "transformer.h.0.attn.c_attn" in res.stdout
    assert json.loads((out / "config.json").read_text())["compot"]["config"]["factorize"]["refit"] is False
    # progress reaches a pipe as whole lines, ending at 100 %, never as carriage-return redraws
    assert "\r" not in res.stderr
    assert any(PROGRESS_LINE.match(ln) and ln.startswith("calibrate") and "100%" in ln for ln in res.stderr.splitlines())
    report = json.loads((out / "compression_report.json").read_text())
    assert report["linears"]["file_ratio"] >= 0.29
    # 8 packed samples of 48 tokens; gpt2's widest input is its MLP's c_proj, 4 × 64
    assert report["calibration"] == {"tokens": 384, "widest_input": 256, "tokens_per_input_dim": 1.5, "enough": False}
    assert "calibration: 384 tokens, 1.5 per dimension" in res.stdout
    # fewer than 4 per dimension: the Grams' small eigenvalues are noise, and the user is told so
    assert "calibration holds 384 tokens for inputs 256 wide (1.5 per dimension)" in res.stderr
    # beside the exact bytes, the papers' count 1 − (d_in·k + s·d_out)/(d_in·d_out), which leaves out positions
    compot = [x for x in report["layers"] if x["method"] == "compot"]
    assert compot
    for x in compot:
        assert x["paper_ratio"] == pytest.approx(1 - (x["d_in"] * x["k"] + x["s"] * x["d_out"]) / (x["d_in"] * x["d_out"]))
        assert x["paper_ratio"] > x["ratio"]
    params = sum(x["d_in"] * x["k"] + x["s"] * x["d_out"] if x["method"] == "compot" else x["d_in"] * x["d_out"]
                 for x in report["layers"])
    dense = sum(x["d_in"] * x["d_out"] for x in report["layers"])
    assert report["linears"]["paper_ratio"] == pytest.approx(1 - params / dense)


def test_too_few_calibration_tokens_are_said(tiny_dirs, tmp_path):
    """Fewer tokens than the widest input: its Gram is singular, and the user is told so (the build still runs)."""
    res = run("compress", tiny_dirs["gpt2"], "-o", tmp_path / "few", "--ratio", "0.3", "--samples", "2",
              "--seq-len", "48")
    assert res.returncode == 0, res.stderr
    assert "calibration holds 96 tokens for inputs 256 wide: their Grams are singular" in res.stderr


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where,pattern", [("parent/model", "is the input"), ("parent/model/sub", "is inside the input"),
                                           ("parent", "holds the input")])
def test_output_never_touches_the_input_model(where, pattern, tiny_dirs, tmp_path):
    """compress -o MODEL --overwrite once replaced the user's model without a word."""
    model = tmp_path / "parent" / "model"
    shutil.copytree(tiny_dirs["bert"], model)
    before = _tree(tmp_path / "parent")
    res = run("compress", model, "-o", tmp_path / where, "--overwrite", "--samples", "8")
    lines = message_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and pattern in lines[0], res.stderr
    assert _tree(tmp_path / "parent") == before


def test_unwritable_output_is_refused_before_any_work(tiny_dirs, tmp_path):
    out = Path("/proc/compot-deploy-out")  # no file can be created there, also as root
    res = run("compress", tiny_dirs["bert"], "-o", out, "--samples", "8")
    lines = message_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot write"), res.stderr


def _truncated_model(tiny_dirs, tmp_path) -> Path:
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_dirs["bert"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return bad


def _latin1_folder(tiny_dirs, tmp_path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "a.txt").write_text("Plain English text about boats and lighthouses.\n" * 50, encoding="utf-8")
    (folder / "b.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e on the terrace.\n".encode("latin-1") * 50)
    return folder


def _random_bytes(tiny_dirs, tmp_path) -> Path:
    f = tmp_path / "random.txt"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    return f


def _bad_manifest(tiny_dirs, tmp_path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text("{not json")
    return pkg


def _tiny(kind: str, tmp_path: Path, tiny_dirs) -> Path:
    """A tiny random Whisper (speech encoder-decoder), wav2vec2 (audio encoder) or ViT (image) folder."""
    import transformers as tf

    folder = tmp_path / kind
    if kind == "whisper":
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=512, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
            max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1))
    elif kind == "wav2vec2":
        model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, conv_dim=(32, 32), conv_stride=(5, 2),
                                                   conv_kernel=(10, 3), num_conv_pos_embeddings=16))
    else:
        model = tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=16, patch_size=8))
        tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


# Every bad input of issue 16 that a tiny model shows: (what, argv from (tiny_dirs, tmp_path, out), exit, message).
BAD_INPUTS = [
    ("truncated safetensors", lambda d, t, o: ["compress", _truncated_model(d, t), "-o", o],
     2, "cannot load a transformer from"),
    ("Latin-1 file in a calibration folder", lambda d, t, o: ["compress", d["bert"], "-o", o, "--calib",
                                                              _latin1_folder(d, t)], 2, "b.txt: not UTF-8 text"),
    ("200 KB of random bytes as --calib", lambda d, t, o: ["compress", d["bert"], "-o", o, "--calib",
                                                           _random_bytes(d, t)], 2, "binary data, not text"),
    ("encoder --packing --seq-len past its positions", lambda d, t, o: ["compress", d["bert"], "-o", o, "--packing",
                                                                        "--seq-len", "300"],
     2, "--seq-len 300 is longer than the 256 positions"),
    ("--ratio together with a target", lambda d, t, o: ["compress", d["bert"], "-o", o, "--ratio", "0.3",
                                                        "--target-ratio", "0.2"], 2, "give one budget"),
    ("--ratio 1e-9", lambda d, t, o: ["compress", d["bert"], "-o", o, "--ratio", "1e-9"],
     2, "invalid --ratio: Input should be greater than or equal to 0.01"),
    ("--allocation with a target", lambda d, t, o: ["compress", d["bert"], "-o", o, "--allocation", "uniform",
                                                    "--target-ratio", "0.2"], 2, "--allocation splits a --ratio"),
    ("--max-layer-ratio below --ratio", lambda d, t, o: ["build", d["bert"], "-o", o, "--ratio", "0.5",
                                                         "--max-layer-ratio", "0.2"],
     2, "invalid options: need --min-layer-ratio <= --ratio <= --max-layer-ratio"),
    ("malformed manifest.json in verify", lambda d, t, o: ["verify", _bad_manifest(d, t)],
     3, "manifest.json is not a package manifest"),
    ("a speech model (Whisper) built without audio", lambda d, t, o: ["build", _tiny("whisper", t, d), "-o", o],
     2, "whisper (WhisperForConditionalGeneration) is a speech model: give --calib a folder of audio files"),
    ("an audio encoder (wav2vec2)", lambda d, t, o: ["compress", _tiny("wav2vec2", t, d), "-o", o],
     2, "wav2vec2 (Wav2Vec2Model) takes input_values: this kind of model is not supported yet"),
    ("an image model (ViT) built without images", lambda d, t, o: ["build", _tiny("vit", t, d), "-o", o],
     2, "vit (ViTModel) is an image model: give --calib a folder of images"),
    ("output is the input model", lambda d, t, o: ["compress", d["bert"], "-o", d["bert"], "--overwrite"],
     2, "is the input"),
]


@pytest.mark.parametrize("what,argv,code,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line(what, argv, code, message, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    before = _tree(tiny_dirs["bert"])
    res = run(*argv(tiny_dirs, tmp_path, out))
    lines = message_lines(res.stderr)
    assert res.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not out.exists() and _tree(tiny_dirs["bert"]) == before


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    """ENOSPC while writing an output folder: one CompotError line, no temporary folder left behind."""
    import errno

    from compot_deploy.errors import CompotError
    from compot_deploy.storage.artifact import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(CompotError, match="No space left on device.*disk full"), atomic_dir(out) as tmp:
        (tmp / "part").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
