"""Real quality on the real all-MiniLM-L6-v2 (the default model): the one full build CI runs."""

import json
import os
import subprocess
import sys

import pytest

import compot_deploy
from compot_deploy.storage.budget import Budget
from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
from compot_deploy.models import load_model



@pytest.fixture(scope="module")
def reference(minilm_dir, heldout_texts):
    model, tok = load_model(minilm_dir)
    return tok, mean_pooled_embeddings(model, tok, heldout_texts)


def test_build_default_model_and_quality(tmp_path, reference, heldout_texts):
    """README's first command: `compot-deploy build` on the default model (COMPOT removing 10 % of the linears'
    bytes, the embedding table at 4 bits), then held-out quality, and ORT's one-liners beside it: none of them is
    both smaller and better."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "build", "-q", "-o", tmp_path / "b"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr
    b = tmp_path / "b"
    man = json.loads((b / "package" / "manifest.json").read_text())
    lin = man["compression"]["linears"]
    assert lin["file_ratio"] == pytest.approx(0.1, abs=0.01)
    assert lin["file_ratio"] == pytest.approx(lin["planned_ratio"], abs=0.01)
    assert man["validation"]["passed"] and man["validation"]["max_abs"] <= 1e-4
    assert man["validation"]["task"]["mean_cosine"] >= 0.97  # measured 0.978
    import onnx

    graph = onnx.load(str(b / "package" / "model.onnx")).graph
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}
    assert (b / "package" / "model.onnx").stat().st_size < 27e6  # 26.3 MB: the table packed at 4 bits
    bench = json.loads((b / "reports" / "bench.json").read_text())
    assert {r["label"] for r in bench["results"]} == {"ort_dense", "ort_compressed", "peer_int8", "peer_int4-b32",
                                                      "peer_int4-b128"}
    peers = {r["label"]: r for r in json.loads((b / "reports" / "peers.json").read_text())["rows"]}
    int8 = peers["ORT quantize_dynamic int8"]
    assert int8["file_bytes"] < 25e6 and int8["quality"] > 0.95, int8  # the one-liner to beat: 22.8 MB, 0.966
    assert json.loads((b / "reports" / "peers.json").read_text())["dominated_by"] == []
    tok, ref = reference
    loaded = compot_deploy.load(next((b / ".cache").glob("compress-*")))
    q = embedding_agreement(ref, mean_pooled_embeddings(loaded, tok, heldout_texts))
    assert q["mean_cosine"] >= 0.97, q  # measured 0.978 (dynamic COMPOT at 0.1, the table at 4 bits)


@pytest.mark.slow  # suite time; benchmarks/quality.py measures it at every ratio
def test_compot_beats_svd_llm_at_equal_bytes(tmp_path, minilm_dir, reference, heldout_texts):
    from compot_deploy.config import AllocationConfig, CompressConfig, FactorizeConfig

    tok, ref = reference
    cos = {}
    for method in ("compot", "svd-llm"):
        cfg = CompressConfig(allocation=AllocationConfig(budget=Budget(removed=0.5)), factorize=FactorizeConfig(method=method))
        rep = compot_deploy.compress(minilm_dir, tmp_path / method, cfg, progress=False)
        assert rep["linears"]["file_ratio"] >= 0.495
        cos[method] = embedding_agreement(ref, mean_pooled_embeddings(compot_deploy.load(tmp_path / method), tok,
                                                                      heldout_texts))["mean_cosine"]
    assert cos["compot"] >= cos["svd-llm"] + 0.03, cos  # measured 0.831 vs 0.776


@pytest.mark.slow  # suite time: test_build_default_model_and_quality exports and gates MiniLM in CI
@pytest.mark.parametrize("bits", [None, 4])
def test_minilm_onnx_export_matches_pytorch(tmp_path, minilm_dir, bits):
    """MiniLM at ratio 0.3, with and without GPTQ-4: ORT vs PyTorch ≤ 1e-4 (fp32), file ≤ 1.05 × safetensors, and
    a corrupted initializer makes the gate fail."""
    import onnx
    from onnx import numpy_helper

    from compot_deploy.config import CompressConfig, ExportConfig, QuantizeConfig, ValidateConfig
    from compot_deploy.exporters.onnx_export import export_dir
    from compot_deploy.exporters.validate import GateFailed, validate_export
    from compot_deploy.compression import quantize_dir

    src = tmp_path / "c"
    compot_deploy.compress(minilm_dir, src, CompressConfig(), progress=False)
    if bits:
        quantize_dir(src, tmp_path / "q", QuantizeConfig(bits=bits), progress=False)
        src = tmp_path / "q"
    out = tmp_path / "onnx"
    man = export_dir(src, out, ExportConfig())
    assert man["bytes"]["onnx_over_safetensors"] <= 1.05
    assert ("com.microsoft::MatMulNBits" in man["graph"]["ops"]) == bool(bits)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    rep = validate_export(out, ValidateConfig(eval_texts=32))
    assert rep["passed"] and rep["parity"]["overall"]["max_abs"] <= 1e-4, rep["parity"]["overall"]
    assert rep["task"]["mean_cosine"] >= (0.78 if bits else 0.88), rep["task"]  # measured 0.816 / 0.918 on 64 texts

    m = onnx.load(str(out / "model.onnx"))
    init = next(i for i in m.graph.initializer if "encoder.layer.3" in i.name and i.name.endswith(".A.stored")
                or "encoder.layer.3" in i.name and "scales" in i.name)
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((arr * 1.01).astype(arr.dtype), init.name))
    onnx.save_model(m, str(out / "model.onnx"))
    with pytest.raises(GateFailed):
        validate_export(out, ValidateConfig(eval_texts=0))
