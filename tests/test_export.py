"""ONNX export: the ai.compot ops in real ORT sessions, decoders through the KV cache, the gate failing closed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as h

import compot_deploy
from conftest import build_tiny, message_lines
from compot_deploy.storage.budget import Budget
from compot_deploy.errors import CompotError
from compot_deploy.config import (AllocationConfig, CalibrationConfig, CompressConfig, ExportConfig, FactorizeConfig,
                                  QuantizeConfig, ValidateConfig)
from compot_deploy.exporters import ops
from compot_deploy.exporters.onnx_export import export_dir
from compot_deploy.exporters.torch_ops import bit_planes, plane_indices
from compot_deploy.exporters.validate import GateFailed, validate_export
from compot_deploy.storage.modules import CompotLinear, sparse_codes_matmul
from compot_deploy.compression import quantize_dir
from compot_deploy.quantize.gptq import rtn
from compot_deploy.storage.packing import SUPPORTED_BITS, QuantTensor
from compot_deploy.runtimes.ort import session

CALIB = CalibrationConfig(samples=8, seq_len=48, batch_size=4)
ROOT = Path(__file__).resolve().parent.parent


def _session(nodes, inits, inputs, outputs, body="folded"):
    """outputs: [(name, elem type, shape)]."""
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, TensorProto.FLOAT, ["a", "b", "c"]) for n in inputs],
                     [h.make_tensor_value_info(*o) for o in outputs], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(ops.DOMAIN, 1)],
                     functions=list(ops.functions(body).values()))
    onnx.checker.check_model(m, full_check=True)
    import onnxruntime as ort

    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("body", ops.BODIES)
@pytest.mark.parametrize("position", ["bitmask", "uint8"])
@pytest.mark.parametrize("values_dtype", [np.float32, np.float16])  # float16: values read at the storage dtype
def test_sparse_codes_matmul_matches_torch(body, position, values_dtype):
    torch.manual_seed(0)
    d_out, k, s = 24, 20, 10 if position == "bitmask" else 3  # k/s = 2 → bitmask, k/s ≈ 7 → index list
    idx = torch.stack([torch.randperm(k)[:s] for _ in range(d_out)], 1)
    m = CompotLinear.from_factors(torch.randn(8, k), torch.randn(s, d_out), idx, None)
    assert m.position == position
    if position == "bitmask":
        nodes = [h.make_node("ColumnMaskToIndices", ["pos"], ["idx"], domain=ops.DOMAIN, s=s)]
        pos = bit_planes(m.mask, k).numpy()
        assert torch.equal(plane_indices(torch.from_numpy(pos), s), m.code_indices())  # what the tracer records
    else:
        nodes = [h.make_node("Identity", ["pos"], ["idx"])]
        pos = m.indices.numpy()
    nodes.append(h.make_node("SparseCodesMatMul", ["z", "values", "idx"], ["y"], domain=ops.DOMAIN, k=k))
    vals = m.values.data.numpy().astype(values_dtype)
    m.values.data = torch.from_numpy(vals.astype(np.float32))  # the reference at the values' precision
    inits = [numpy_helper.from_array(pos, "pos"), numpy_helper.from_array(vals, "values")]
    idx_type = TensorProto.INT64 if position == "bitmask" else TensorProto.UINT8
    sess = _session(nodes, inits, ["z"], [("y", TensorProto.FLOAT, ["a", "b", "d"]), ("idx", idx_type, ["s", "d"])], body)
    for n in (1, 7, 40):
        z = torch.randn(2, n, k)
        y, got_idx = sess.run(None, {"z": z.numpy()})
        np.testing.assert_array_equal(got_idx, m.code_indices().numpy())
        ref = sparse_codes_matmul(z.reshape(-1, k), m.values.data, m.code_indices()).reshape(2, n, d_out)
        np.testing.assert_allclose(y, ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("bits,wide", [(2, False), (4, False), (8, False), (3, True), (4, True), (8, True)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("K,group", [(40, 16), (7, 7), (50, 128)])
def test_dequantize_blocks_matches_packing(bits, wide, sym, K, group):
    torch.manual_seed(bits)
    qt = QuantTensor.from_quantized(rtn(torch.randn(K, 12), bits, group, sym))
    ins = ["qw", "sc"] + ([] if sym else ["zp"])
    inits = [numpy_helper.from_array(qt.qweight.numpy(), "qw"), numpy_helper.from_array(qt.scales.data.numpy(), "sc")]
    if not sym:
        inits.append(numpy_helper.from_array(qt.zeros.numpy(), "zp"))
    name = "DequantizeBlocks" + ("AnyWidth" if wide else "") + ("Sym" if sym else "")
    node = h.make_node(name, ins, ["M"], domain=ops.DOMAIN, bits=bits, group=group, K=K)
    (M,) = _session([node], inits, [], [("M", TensorProto.FLOAT, ["K", "N"])]).run(None, {})
    np.testing.assert_array_equal(M, qt.dequantize().numpy())


def _compressed(tiny_dirs, kind, tmp_path, bits=None):
    out = tmp_path / f"c_{kind}"
    cfg = CompressConfig(calibration=CALIB, allocation=AllocationConfig(budget=Budget(removed=0.3)))
    compot_deploy.compress(tiny_dirs[kind], out, cfg, progress=False)
    if bits:
        quantize_dir(out, tmp_path / f"q_{kind}", QuantizeConfig(bits=bits, group=32), CALIB, progress=False)
        out = tmp_path / f"q_{kind}"
    return out


@pytest.mark.parametrize("kind,bits", [("llama", None), ("qwen3", None), ("gpt2", None), ("llama", 4), ("bert", 4),
                                       ("gpt2", 3), ("llama", 8), ("gemma2", None)])
def test_export_passes_the_gate(kind, bits, tiny_dirs, tmp_path):
    src = _compressed(tiny_dirs, kind, tmp_path, bits)
    man = export_dir(src, tmp_path / "onnx", ExportConfig())
    assert man["bytes"]["onnx_over_safetensors"] <= 1.05, man["bytes"]
    graph = man["graph"]
    assert "ai.compot::SparseCodesMatMul" in graph["ops"]
    assert ("com.microsoft::MatMulNBits" in graph["ops"]) == (bits in (2, 4, 8))  # 3-bit: DequantizeBlocks
    assert any(op.startswith("ai.compot::DequantizeBlocks") for op in graph["ops"]) == bool(bits)
    rep = validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=8))
    par = rep["parity"]
    assert rep["passed"] and par["overall"]["max_abs"] < 1e-4, par["overall"]
    if kind != "bert":
        # prefill + 8 greedy decode calls through the KV cache: exactly PyTorch's tokens
        assert graph["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
        assert par["tokens"] == {"mismatches": 0, "total": 1 * 9 + 2 * 9}
        if kind == "gemma2":  # the (2, 20) prompt and its decode steps run past the 16-token window
            assert max(c["prompt"][1] for c in par["cases"]) > 16
        assert 0.0 < rep["task"]["next_token_agreement"] <= 1.0 and rep["task"]["perplexity"] > 1.0
    else:
        assert graph["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
        assert 0.0 < rep["task"]["mean_cosine"] <= 1.0
    assert json.loads((tmp_path / "onnx" / "validation.json").read_text())["passed"] is True


def _corrupt(path: Path, name_part: str) -> str:
    """Scale the first float initializer whose name contains name_part by 1.5; return its name."""
    m = onnx.load(str(path))
    for init in m.graph.initializer:
        if name_part in init.name and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((arr * 1.5).astype(arr.dtype), init.name))
            onnx.save_model(m, str(path))
            return init.name
    raise AssertionError(f"no initializer matching {name_part}")


def test_gate_fails_closed_on_a_corrupted_initializer(tiny_dirs, tmp_path):
    src = _compressed(tiny_dirs, "gpt2", tmp_path)
    out = tmp_path / "onnx"
    export_dir(src, out, ExportConfig())
    _corrupt(out / "model.onnx", ".values")
    manifest = (out / "export.json").read_bytes()
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "validate", str(out), "--eval-texts", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    lines = message_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: validation failed"), res.stderr
    rep = json.loads((out / "validation.json").read_text())
    assert rep["passed"] is False and rep["parity"]["overall"]["max_abs"] > 1e-3
    assert (out / "export.json").read_bytes() == manifest  # validate writes only its own report
    with pytest.raises(GateFailed):
        validate_export(out, ValidateConfig(eval_texts=0))


def test_export_cli_refuses_bad_input_cleanly(tiny_dirs, tmp_path):
    for args, pattern in ([str(tiny_dirs["gpt2"]), "--opset", "17"], "opset"), ([str(tmp_path)], "config.json"):
        out = tmp_path / "o"
        res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "export", *args, "-o", str(out)],
                             capture_output=True, text=True)
        assert res.returncode == 2 and pattern in res.stderr, res.stderr
        assert not out.exists() and not list(tmp_path.glob(".o.tmp*"))


def test_plain_model_exports_dense_and_cuda_is_refused_without_the_ep(tiny_dirs, tmp_path):
    import onnxruntime as ort

    man = export_dir(tiny_dirs["llama"], tmp_path / "dense", ExportConfig(sparse_body="gather"))
    assert not any(op.startswith(ops.DOMAIN) for op in man["graph"]["ops"])
    assert validate_export(tmp_path / "dense", ValidateConfig(eval_texts=0))["passed"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(CompotError, match="onnxruntime-gpu"):
            session(tmp_path / "dense" / "model.onnx", "cuda")


def isolated_python(tmp: Path, extra=()) -> list[str]:
    """A python that sees only the standard library, numpy, onnxruntime and `extra` modules (links to the
    installed packages)."""
    import numpy
    import onnxruntime

    site = tmp / "site"
    site.mkdir()
    for mod in (numpy, onnxruntime, *extra):
        pkg = Path(mod.__file__).parent
        (site / pkg.name).symlink_to(pkg)
        libs = pkg.parent / f"{pkg.name}.libs"
        if libs.exists():
            (site / libs.name).symlink_to(libs)
    boot = f"import sys, runpy; sys.path.insert(0, {str(site)!r}); sys.argv = sys.argv[1:]; " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-I", "-S", "-c", boot]  # -I: PYTHONPATH and the like ignored too


def test_standalone_replay_needs_only_numpy_and_onnxruntime(tiny_dirs, tmp_path):
    src = _compressed(tiny_dirs, "qwen3", tmp_path)
    out = tmp_path / "onnx"
    export_dir(src, out, ExportConfig())
    validate_export(out, ValidateConfig(eval_texts=0))
    py = isolated_python(tmp_path)
    probe = tmp_path / "probe.py"
    for mod in ("torch", "transformers", "compot_deploy"):  # the isolation is real
        probe.write_text(f"import {mod}")
        res = subprocess.run(py + [str(probe)], capture_output=True, text=True, cwd=tmp_path)
        assert "ModuleNotFoundError" in res.stderr, (mod, res.stderr)
    script = tmp_path / "loader.py"  # copied next to nothing, as on a device
    script.write_text((ROOT / "compot_deploy" / "runtimes" / "loader.py").read_text())
    res = subprocess.run(py + [str(script), str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["tokens_match"] and got["prefill_max_abs"] < 1e-4, got


def test_external_data_past_the_protobuf_limit(tiny_dirs, tmp_path, monkeypatch):
    """Models over 2 GB keep their tensors in model.onnx.data; the limit is lowered here to exercise that path."""
    from compot_deploy.exporters import onnx_export, validate
    from compot_deploy.runtimes import artifact_bytes, loader

    assert validate.SAMPLE == loader.SAMPLE
    monkeypatch.setattr(onnx_export, "TWO_GB", 3 * 2**20)
    src = _compressed(tiny_dirs, "llama", tmp_path)
    man = export_dir(src, tmp_path / "onnx", ExportConfig())
    data = tmp_path / "onnx" / "model.onnx.data"
    assert data.stat().st_size > (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert man["bytes"]["onnx"] == artifact_bytes(tmp_path / "onnx") and man["bytes"]["onnx_over_safetensors"] <= 1.05
    assert validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=0))["passed"]


def test_bfloat16_storage_exports_losslessly(tiny_dirs, tmp_path):
    out = tmp_path / "c"
    cfg = CompressConfig(calibration=CALIB, allocation=AllocationConfig(budget=Budget(removed=0.3)),
                         factorize=FactorizeConfig(dtype="bfloat16"))
    compot_deploy.compress(tiny_dirs["qwen3"], out, cfg, progress=False)
    man = export_dir(out, tmp_path / "onnx", ExportConfig())
    assert man["graph"]["storage_dtype"] == "bfloat16" and man["graph"]["initializers_at_storage_dtype"] > 0
    assert man["bytes"]["onnx_over_safetensors"] <= 1.05
    assert validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=0))["passed"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("k,s,product", [(24, 12, True), (8, 4, False)])
def test_compot_layer_exports_the_cheaper_form(k, s, product, tmp_path):
    """W = A C folded at load where d_in·d_out ≤ k·(d_in + d_out), else x·A then the sparse codes; same outputs."""
    from compot_deploy.exporters.torch_ops import export_forwards

    torch.manual_seed(0)
    d = 32
    idx = torch.stack([torch.randperm(k)[:s] for _ in range(d)], 1)
    m = CompotLinear.from_factors(torch.randn(d, k), torch.randn(s, d), idx, torch.randn(d))
    path = tmp_path / "m.onnx"
    with export_forwards(m), torch.no_grad():
        torch.onnx.export(m, (torch.randn(2, d),), str(path), dynamo=False, opset_version=18, input_names=["x"],
                          custom_opsets={ops.DOMAIN: 1}, dynamic_axes={"x": {0: "n"}})
    proto = onnx.load(str(path))
    shapes = sorted(tuple(i.dims) for i in proto.graph.initializer)  # the stored factors, no dense product
    assert shapes == sorted([(d, k), (s, d), (d,), (-(-k // 8), d)])
    order = [n.op_type for n in proto.graph.node if n.op_type in ("MatMul", "SparseCodesMatMul")]
    assert order == (["SparseCodesMatMul", "MatMul"] if product else ["MatMul", "SparseCodesMatMul"])
    for f in ops.functions("folded").values():
        proto.functions.append(f)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, d)
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], m(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [False, True])
# MatMulNBits where it applies (48 rows in one block: re-blocked by 16), else DequantizeBlocks (40: no block divides)
@pytest.mark.parametrize("d_in,group", [(64, 32), (48, 48), (40, 40)])
def test_every_quantized_width_exports(bits, sym, d_in, group, tmp_path):
    """Each width the allocator and `quantize` can pick traces, loads in ORT and gives the module's outputs
    (8 bits once broke torch's exporter in its peephole pass)."""
    from compot_deploy.exporters.torch_ops import export_forwards
    from compot_deploy.storage.modules import QuantLinear

    torch.manual_seed(bits)
    m = QuantLinear(d_in, 24, bits, group, sym, bias=True)
    m.weight.load_state_dict(QuantTensor.from_quantized(rtn(torch.randn(d_in, 24), bits, group, sym)).state_dict())
    m.bias.data.normal_()
    path = tmp_path / "q.onnx"
    with export_forwards(m), torch.no_grad():
        torch.onnx.export(m, (torch.randn(2, d_in),), str(path), dynamo=False, opset_version=18, input_names=["x"],
                          custom_opsets={ops.DOMAIN: 1}, dynamic_axes={"x": {0: "n"}})
    proto = onnx.load(str(path))
    used = {n.op_type for n in proto.graph.node}
    assert ("MatMulNBits" in used) == (bits != 3 and d_in != 40), used
    for f in ops.functions("folded").values():
        proto.functions.append(f)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, d_in)
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], m(x).numpy(), rtol=1e-4, atol=1e-4)


def test_t5_encoder_reads_weight_of_its_compact_linears(minilm_dir, tmp_path):
    """T5 reads `.weight.dtype` of its output projection: compact modules expose a reconstructed `.weight`, so a
    compressed T5EncoderModel runs, exports and passes the gate."""
    from compot_deploy.storage.modules import CompotLinear

    src = build_tiny("t5-encoder", tmp_path / "t5", minilm_dir)
    cfg = CompressConfig(calibration=CALIB, allocation=AllocationConfig(budget=Budget(removed=0.3)))
    compot_deploy.compress(src, tmp_path / "c", cfg, progress=False)
    model = compot_deploy.load(tmp_path / "c")
    wos = [b.layer[1].DenseReluDense.wo for b in model.encoder.block]
    wo = next(m for m in wos if isinstance(m, CompotLinear))  # the projection T5 reads `.weight` of, compact
    assert wo.weight.shape == (64, 160) and wo.weight.dtype == torch.float32
    np.testing.assert_allclose(wo.weight.double().numpy(), wo.reconstruct().T.numpy(), rtol=1e-6, atol=1e-7)
    man = export_dir(tmp_path / "c", tmp_path / "onnx", ExportConfig())
    assert "ai.compot::SparseCodesMatMul" in man["graph"]["ops"]
    rep = validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=8))
    assert rep["passed"] and rep["parity"]["overall"]["max_abs"] < 1e-4, rep["parity"]["overall"]
