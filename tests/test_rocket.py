"""ROCKET (issue 17): its factorization, its byte-exact stored form with per-column counts that differ, its ONNX
op in real ORT sessions, and a tiny decoder compressed, exported and gated with --method rocket."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as h

import compot_deploy
from compot_deploy.config import (AllocationConfig, CalibrationConfig, CompressConfig, ExportConfig, FactorizeConfig,
                                  ValidateConfig)
from compot_deploy.exporters import ops
from compot_deploy.exporters.onnx_export import export_dir
from compot_deploy.exporters.validate import validate_export
from compot_deploy.factorize import compot, damped_cholesky, relative_error
from compot_deploy.factorize.rocket import rocket, rocket_select
from compot_deploy.storage.budget import Budget, budget_bytes, coordinate_bytes
from compot_deploy.storage.modules import RocketLinear
from compot_deploy.storage.record import STORAGE, LayerRecord, plan


def _problem(d_in=96, d_out=128, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(2000, d_in, dtype=torch.float64) @ torch.randn(d_in, d_in, dtype=torch.float64)
    return torch.randn(d_in, d_out, dtype=torch.float64), damped_cholesky(X.T @ X)


def test_rocket_selects_by_weighted_codes_and_reactivates_anywhere():
    P = torch.tensor([[4.0, 0.1, 3.0], [1.0, 2.0, 0.2], [0.5, 1.5, 2.9]])
    idx, flat = rocket_select(P, torch.ones(3), 1, 2)
    assert idx[0].tolist() == [0, 1, 0]  # each column's largest |c|
    assert sorted(flat.tolist()) == [2 * 3 + 1, 2 * 3 + 2]  # 2.9 (col 2) and 1.5 (col 1): the best two dropped
    # an atom's weight changes the pick: row 2 weighted ×4 takes columns 1 (6 > 2) and 2 (11.6 > 3), not 0 (2 < 4)
    idx, _ = rocket_select(P, torch.tensor([1.0, 1.0, 4.0]), 1, 0)
    assert idx[0].tolist() == [0, 2, 2]


def test_rocket_refit_lowers_the_error_and_counts_differ_per_column():
    W, L = _problem()
    f, hist = rocket(W, L, k=48, s=23, extra=128)
    assert hist[1] < hist[0]  # the ridge least-squares refit
    C = f.codes_dense()
    counts = (C != 0).sum(0)
    assert int(counts.sum()) == 23 * 128 + 128 and int(counts.min()) == 23 and int(counts.max()) > 24
    on_base = torch.zeros_like(C, dtype=torch.bool).scatter_(0, f.indices, True)
    assert not on_base[f.extra_rows, f.extra_cols].any()  # extras never land on the fixed-s support
    assert relative_error(W, f.dense(), L) == pytest.approx(hist[1], rel=1e-9)
    # ROCKET (one SVD, one selection, one refit) lands near COMPOT's start, short of 8 alternations + refit
    start = compot(W, L, 48, 24, 0)[1][-1]
    best = compot(W, L, 48, 24, 8, refit=True)[1][-1]
    assert best < hist[1] < start * 1.05


@pytest.mark.parametrize("removed", [0.2, 0.3, 0.5])
def test_rocket_bytes_are_exact_and_fit_the_budget(removed):
    d_in, d_out = 96, 128
    nbytes = budget_bytes(d_in * d_out * 2, removed=removed)
    rec = plan("rocket", d_in, d_out, True, nbytes, "float16")
    base = plan("compot", d_in, d_out, True, nbytes, "float16")
    assert rec.method == "rocket" and rec.k == base.k and rec.s == base.s - 1 and 0 < rec.extra <= d_out
    assert base.bytes - 3 * d_out <= rec.bytes <= nbytes
    assert rec.paper_params == d_in * rec.k + rec.s * d_out + rec.extra
    W, L = _problem(d_in, d_out)
    f, _ = rocket(W, L, rec.k, rec.s, rec.extra)
    m = STORAGE["rocket"].module(f, torch.zeros(d_out, dtype=torch.float64))
    stored = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    assert sum(v.numel() * v.element_size() for v in stored.values()) == rec.bytes
    assert m.extra_rows.dtype == torch.uint8 and m.extra_cols.dtype == torch.uint8  # k, d_out ≤ 256
    assert coordinate_bytes(rec.extra, rec.k, d_out, 2) == 4 * rec.extra
    # the record rebuilds the module it stores, and round-trips through config.json's entry
    assert LayerRecord.from_json(rec.to_json()) == rec
    empty = rec.empty_module()
    empty.load_state_dict(m.state_dict())
    x = torch.randn(5, d_in)
    torch.testing.assert_close(empty(x), m(x))
    torch.testing.assert_close(m(x).double(), x.double() @ f.dense(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.reconstruct(), f.dense(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body", ops.BODIES)
def test_sparse_codes_extra_matmul_matches_torch(body):
    torch.manual_seed(0)
    W, L = _problem(32, 40)
    f, _ = rocket(W, L, 16, 5, 30)
    m = RocketLinear.from_factors(f.A.float(), f.values.float(), f.indices, None, extra=(
        f.extra_values.float(), f.extra_rows, f.extra_cols))
    node = h.make_node("SparseCodesExtraMatMul", ["z", "values", "indices", "ev", "er", "ec"], ["y"],
                       domain=ops.DOMAIN, k=16)
    inits = [numpy_helper.from_array(m.values.data.numpy().astype(np.float16), "values"),
             numpy_helper.from_array(m.code_indices().numpy().astype(np.uint8), "indices"),
             numpy_helper.from_array(m.extra_values.data.numpy().astype(np.float16), "ev"),
             numpy_helper.from_array(m.extra_rows.numpy(), "er"), numpy_helper.from_array(m.extra_cols.numpy(), "ec")]
    g = h.make_graph([node], "g", [h.make_tensor_value_info("z", TensorProto.FLOAT, ["a", "b", 16])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", 40])], initializer=inits)
    proto = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid(ops.DOMAIN, 1)],
                         functions=list(ops.functions(body).values()))
    onnx.checker.check_model(proto, full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    C = torch.zeros(16, 40)
    C.scatter_(0, m.code_indices(), m.values.data.half().float())
    C[m.extra_rows.long(), m.extra_cols.long()] = m.extra_values.data.half().float()
    for n in (1, 9):
        z = torch.randn(2, n, 16)
        np.testing.assert_allclose(sess.run(None, {"z": z.numpy()})[0], (z @ C).numpy(), rtol=1e-5, atol=1e-5)


def test_rocket_compresses_exports_and_passes_the_gate(tiny_dirs, tmp_path):
    """--method rocket with its own allocation (mckp, per-layer error cap): stored bytes as recorded, ONNX via
    SparseCodesExtraMatMul, greedy tokens equal to PyTorch's through the KV cache."""
    cfg = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=48, batch_size=4),
                         allocation=AllocationConfig(strategy="mckp", budget=Budget(removed=0.3), max_layer_error=0.5),
                         factorize=FactorizeConfig(method="rocket"))
    report = compot_deploy.compress(tiny_dirs["llama"], tmp_path / "c", cfg, progress=False)
    recs = [x for x in report["layers"] if x["method"] == "rocket"]
    assert recs and all(x["extra"] > 0 for x in recs)
    man = export_dir(tmp_path / "c", tmp_path / "onnx", ExportConfig())
    assert "ai.compot::SparseCodesExtraMatMul" in man["graph"]["ops"]
    assert man["bytes"]["onnx_over_safetensors"] <= 1.05, man["bytes"]
    rep = validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=4))
    assert rep["passed"] and rep["parity"]["overall"]["max_abs"] < 1e-4
    assert rep["parity"]["tokens"]["mismatches"] == 0
