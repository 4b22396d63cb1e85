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
    from compot_deploy.streaming import load_rest, weights_of

    d = _bf16_sharded(kind, tmp_path, minilm_dir)
    cfg = CompressConfig.model_validate({"calibration": {"samples": 8}})
    whole, tok = load_model(d)
    lazy, _ = load_model(d, lazy=True)
    assert weights_of(whole) is None and weights_of(lazy) is not None
    assert all(p.device.type == "meta" for p in lazy.parameters())  # nothing read until the walk needs it
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
