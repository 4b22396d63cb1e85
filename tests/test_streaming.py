"""Lazily loaded models (streaming.py): blocks stay in the checkpoint until the walk reads them, and compressing
one gives exactly what compressing the model loaded whole gives."""

from __future__ import annotations

import pytest

from conftest import build_tiny


def _bf16_sharded(kind: str, path, minilm_dir, layers: int = 3):
    """A tiny random `kind` re-saved in bfloat16 as sharded safetensors with an index, as hub checkpoints are."""
    import torch
    import transformers as tf

    src = build_tiny(kind, path / "src", minilm_dir, layers=layers)
    cls = getattr(tf, tf.AutoConfig.from_pretrained(src).architectures[0])
    model = cls.from_pretrained(src, dtype=torch.bfloat16)
    out = path / "bf16"
    model.save_pretrained(out, max_shard_size="100KB")
    tf.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "gemma2", "t5-encoder"])
def test_lazy_compress_equals_whole(kind, tmp_path, minilm_dir):
    """Gemma2's blocks get different masks (sliding / global), T5's first block hands the others its position bias
    (so its blocks are read for the capture): each compresses exactly as the model loaded whole does."""
    from compot_deploy.compression import compress_model
    from compot_deploy.config import CompressConfig
    from compot_deploy.models import load_model
    from compot_deploy.storage.budget import dense_model_bytes, stored_tensor_count
    from compot_deploy.streaming import load_rest, weights_of

    d = _bf16_sharded(kind, tmp_path, minilm_dir)
    cfg = CompressConfig.model_validate({"calibration": {"samples": 8}})
    whole, tok = load_model(d)
    lazy, _ = load_model(d, lazy=True)
    assert weights_of(whole) is None and weights_of(lazy) is not None
    assert all(p.device.type == "meta" for p in lazy.parameters())  # nothing read until the walk needs it
    # the dense file's bytes and tensor count, the reports' and budgets' reference, whether loaded or not
    assert dense_model_bytes(lazy, 2) == dense_model_bytes(whole, 2) and stored_tensor_count(lazy) == stored_tensor_count(whole)
    a, b = compress_model(whole, tok, cfg, progress=False), compress_model(lazy, tok, cfg, progress=False)
    assert a.records == b.records
    assert any(p.device.type == "meta" for p in lazy.parameters())  # the walk handed the blocks back
    load_rest(lazy)
    sa, sb = _state(whole), _state(lazy)
    assert sa.keys() == sb.keys()
    assert all(sa[k].equal(sb[k]) for k in sa)


def test_partial_compress_saves_the_whole_model(tmp_path, minilm_dir):
    """--include on the first block: the walk stops after it, the blocks after it are never read, and the saved
    folder holds every weight (the blocks not walked read at save time), as a whole-model run writes it."""
    from safetensors.torch import load_file

    from compot_deploy.calibrate.runner import run_blocks
    from compot_deploy.compression import compress
    from compot_deploy.config import CompressConfig
    from compot_deploy.models import find_targets, load_model

    d = _bf16_sharded("llama", tmp_path, minilm_dir)
    model, _ = load_model(d, lazy=True)
    walked = []
    run_blocks(model, [{"input_ids": __import__("torch").tensor([[5, 6, 7, 8]])}],
               find_targets(model, ["*.layers.0.*"]), lambda i, g: walked.append(i) or False, "walk", False)
    assert walked == [0]
    assert all(p.device.type == "meta" for p in model.model.layers[1].parameters())
    cfg = CompressConfig.model_validate({"include": ["*.layers.0.*"], "calibration": {"samples": 8}})
    compress(d, tmp_path / "out", cfg, progress=False)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert any(k.startswith("model.layers.0.") and k.endswith(".A") for k in saved)
    assert "model.layers.2.mlp.down_proj.weight" in saved
    whole, _ = load_model(d)
    ref = whole.model.layers[2].mlp.down_proj.weight.to(saved["model.layers.2.mlp.down_proj.weight"].dtype)
    assert saved["model.layers.2.mlp.down_proj.weight"].equal(ref)


def _wide_llama(path, minilm_dir, layers: int):
    """A random Llama wide enough that factoring a block takes a noticeable moment."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512,
                                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256, pad_token_id=0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_killed_compress_resumes_and_writes_the_same_files(tmp_path, minilm_dir):
    """kill -9 while blocks are being factored; the same command then reads the Grams, the allocation and the
    finished blocks back, factors the rest, and writes the very files an uninterrupted run writes; the work kept
    beside the output is gone after."""
    import json
    import os
    import subprocess
    import sys
    import time

    from compot_deploy.resume import resume_folder

    d = _wide_llama(tmp_path / "m", minilm_dir, layers=8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    def cmd(out):
        return [sys.executable, "-m", "compot_deploy.cli", "compress", str(d), "-o", str(out), "--samples", "32",
                "--max-shard-size", "1MB", "--quiet"]

    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(cmd(ref), env=env, check=True, capture_output=True, timeout=600)
    blocks = resume_folder(out) / "blocks"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if blocks.is_dir() and len(list(blocks.glob("*.safetensors"))) >= 2:
            proc.kill()
            break
        time.sleep(0.005)
    assert proc.wait() == -9, "the run ended before it could be killed"
    finished = sorted(blocks.glob("*.safetensors"))
    assert 2 <= len(finished) < 8 and not out.exists()
    res = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    rep = json.loads((out / "compression_report.json").read_text())
    assert rep["resumed"]["allocation"] and len(rep["resumed"]["blocks"]) >= len(finished)
    assert "calibrate" in rep["timings"]  # the earlier run's seconds, carried over
    shards = sorted(p.name for p in ref.glob("model*.safetensors*"))
    assert len(shards) > 3 and "model.safetensors.index.json" in shards
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == shards
    assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in shards)
    assert not resume_folder(out).exists() and not resume_folder(ref).exists()


def test_sharded_output_holds_the_same_tensors_and_loads(tmp_path, minilm_dir):
    """A streamed compress written as shards (blocks copied from their files as they were finished) and the same
    job loaded whole into one model.safetensors hold the same tensors; both load into the same model, and the
    report counts every shard."""
    import json

    import torch
    from safetensors.torch import load_file

    from compot_deploy.compression import compress
    from compot_deploy.config import CompressConfig
    from compot_deploy.storage.artifact import load

    d = _bf16_sharded("llama", tmp_path, minilm_dir)
    cfg = CompressConfig.model_validate({"calibration": {"samples": 8}})
    compress(d, tmp_path / "one", cfg, progress=False, stream=False)
    compress(d, tmp_path / "sh", cfg.model_copy(update={"max_shard_bytes": 60_000}), progress=False)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "sh" / "model.safetensors").exists()
    assert all((tmp_path / "sh" / f).stat().st_size <= 60_000 + 4096 or len(load_file(tmp_path / "sh" / f)) == 1
               for f in files)
    one = load_file(tmp_path / "one" / "model.safetensors")
    sharded = {k: v for f in files for k, v in load_file(tmp_path / "sh" / f).items()}
    assert one.keys() == sharded.keys() and all(one[k].equal(sharded[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in one.values())
    rep = json.loads((tmp_path / "sh" / "compression_report.json").read_text())
    assert rep["model_file"]["bytes"] == sum((tmp_path / "sh" / f).stat().st_size for f in files)
    a, b = load(tmp_path / "one"), load(tmp_path / "sh")
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
