"""compress → save → load → forward on tiny random decoders and encoders built from real HF configs."""

import json

import pytest
import torch

import compot_deploy
from compot_deploy.storage.budget import Budget
from compot_deploy.storage.artifact import safetensors_header
from compot_deploy.config import AllocationConfig, CalibrationConfig, CompressConfig, FactorizeConfig
from compot_deploy.storage.modules import CompotLinear, LowRankLinear
from compot_deploy.compression import compress_model

CALIB = CalibrationConfig(samples=8, seq_len=48, batch_size=4)


def _inputs(tok, kind):
    enc = tok(["a short sentence", "and a somewhat longer second sentence here"], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if kind == "bert" or k != "token_type_ids"}


def _out(model, enc):
    with torch.no_grad():
        o = model(**enc)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2", "bert"])
@pytest.mark.parametrize("method,strategy", [("compot", "dynamic"), ("svd-llm", "uniform")])
def test_compress_save_load_forward(kind, method, strategy, tiny_dirs, tmp_path):
    from compot_deploy.models import load_model

    cfg = CompressConfig(calibration=CALIB, allocation=AllocationConfig(strategy=strategy, budget=Budget(removed=0.4)),
                         factorize=FactorizeConfig(method=method, iters=3))
    out = tmp_path / "out"
    report = compot_deploy.compress(tiny_dirs[kind], out, cfg, progress=False)

    # the in-memory compressed model, rebuilt the same way, vs the one loaded from disk
    model, tok = load_model(tiny_dirs[kind])
    compress_model(model, tok, cfg, progress=False)
    loaded = compot_deploy.load(out)
    cls = CompotLinear if method == "compot" else LowRankLinear
    assert any(isinstance(m, cls) for m in loaded.modules())
    enc = _inputs(tok, kind)
    a, b = _out(model, enc), _out(loaded, enc)
    assert torch.isfinite(b).all()
    assert float((a - b).abs().max()) <= 1e-5

    lin = report["linears"]
    assert lin["file_ratio"] == pytest.approx(lin["planned_ratio"], abs=0.01)
    assert 0.3 <= lin["file_ratio"] <= 0.45
    cfg_json = json.loads((out / "config.json").read_text())
    assert set(cfg_json["compot"]["layers"]) == {x["name"] for x in report["layers"]}
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    # every stored floating tensor is float16, every index tensor the smallest unsigned type
    dtypes = {v["dtype"] for v in safetensors_header(out / "model.safetensors").values()}
    assert dtypes <= {"F16", "U8", "U16", "I64"}


def test_sequential_and_mckp_and_cospadi_and_spectral_run(tiny_dirs, tmp_path):
    from compot_deploy.models import load_model

    model, tok = load_model(tiny_dirs["llama"])
    for strategy, method, seq in (("mckp", "compot", True), ("dynamic", "cospadi", False),
                                  ("spectral", "compot", False)):
        cfg = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=48, sequential=seq),
                             allocation=AllocationConfig(strategy=strategy, budget=Budget(removed=0.3)),
                             factorize=FactorizeConfig(method=method, iters=2, cospadi_iters=1))
        m, _ = load_model(tiny_dirs["llama"])
        res = compress_model(m, tok, cfg, progress=False)
        dense = sum(r.dense_bytes for r in res.records.values())
        stored = sum(r.bytes for r in res.records.values())
        assert stored <= 0.7 * dense + 1
        assert all(0 <= st.rel_error < 1 for st in res.stats.values())


def test_include_exclude(tiny_dirs):
    from compot_deploy.models import find_targets, load_model

    model, _ = load_model(tiny_dirs["llama"])
    names = [t.name for t in find_targets(model, include=["*mlp*"], exclude=["*down_proj"])]
    assert names and all("mlp" in n and "down_proj" not in n for n in names)
    assert not any("embed" in t.name or "lm_head" in t.name for t in find_targets(model))
