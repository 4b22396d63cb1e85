"""GPTQ applied to compressed and dense models: packed storage, byte accounting from the file, save/load parity."""

import os
import subprocess
import sys

import pytest
import torch

import compot_deploy
from compot_deploy.storage.budget import Budget
from compot_deploy.storage.artifact import safetensors_header
from compot_deploy.config import AllocationConfig, CalibrationConfig, CompressConfig, FactorizeConfig, QuantizeConfig
from compot_deploy.storage.modules import CompotLinear, QuantLinear
from compot_deploy.compression import compress_model, quantize_dir
from compot_deploy.storage.packing import QuantTensor, pack_bits, unpack_bits
from compot_deploy.quantize.gptq import rtn

CALIB = CalibrationConfig(samples=8, seq_len=48, batch_size=4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (3, 5, 32), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape[-1] == 32 * bits // 8
    assert torch.equal(unpack_bits(packed, bits, 32), q)
    if bits == 4:  # MatMulNBits order: element 2i in the low nibble of byte i
        assert int(pack_bits(torch.tensor([[1, 2]]), 4)[0, 0]) == 0x21
    if bits == 3:  # one bit stream: 8 elements in 3 bytes, element 2 straddling bytes 0 and 1
        b = pack_bits(torch.tensor([[1, 2, 7, 0, 0, 0, 0, 5]]), 3)[0].tolist()
        assert b == [1 | 2 << 3 | (7 & 3) << 6, 7 >> 2, 5 << 5]


@pytest.mark.parametrize("sym", [False, True])
def test_quant_tensor_dequantizes_the_grid(sym):
    W = torch.randn(100, 7, dtype=torch.float64)  # K not a multiple of the group: last block padded
    qz = rtn(W, 4, 32, sym)
    qt = QuantTensor.from_quantized(qz)
    assert qt.qweight.shape == (7, 4, 16)
    torch.testing.assert_close(qt.dequantize().double(), qz.dequantize(), rtol=1e-6, atol=1e-6)


def _out(model, tok):
    enc = tok(["a short sentence", "and a somewhat longer second sentence here"], padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None) if "llama" in type(model).__name__.lower() else None
    with torch.no_grad():
        o = model(**enc)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("bits", [4, 8])
def test_compress_gptq_save_load(kind, bits, tiny_dirs, tmp_path):
    from compot_deploy.models import load_model

    cfg = CompressConfig(calibration=CALIB, allocation=AllocationConfig(budget=Budget(removed=0.3)),
                         factorize=FactorizeConfig(iters=3), quantize=QuantizeConfig(bits=bits, group=32))
    report = compot_deploy.compress(tiny_dirs[kind], tmp_path / "q", cfg, progress=False)
    model, tok = load_model(tiny_dirs[kind])
    compress_model(model, tok, cfg, progress=False)
    loaded = compot_deploy.load(tmp_path / "q")
    comp = [m for m in loaded.modules() if isinstance(m, CompotLinear)]
    assert comp and all(isinstance(m.A, QuantTensor) and isinstance(m.values, QuantTensor) for m in comp)
    assert float((_out(model, tok) - _out(loaded, tok)).abs().max()) <= 1e-5
    lin = report["linears"]
    assert lin["file_bytes"] == lin["planned_bytes"]  # scales, zeros and padding all accounted for
    # 4-bit factors of a 0.3-compressed model: well under a third of the fp16 dense bytes
    assert lin["file_ratio"] > (0.70 if bits == 4 else 0.55)
    dtypes = {v["dtype"] for v in safetensors_header(tmp_path / "q" / "model.safetensors").values()}
    assert "U8" in dtypes


def test_dense_gptq_baseline_and_quantize_of_compressed_dir(tiny_dirs, tmp_path):
    q = QuantizeConfig(bits=4, group=32)
    rep = quantize_dir(tiny_dirs["llama"], tmp_path / "dense", q, CALIB, progress=False)
    loaded = compot_deploy.load(tmp_path / "dense")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14  # 7 linears x 2 blocks
    assert rep["linears"]["file_bytes"] == rep["linears"]["planned_bytes"]
    assert 0.70 < rep["linears"]["file_ratio"] < 0.75  # 4 bits + fp16 scale and 4-bit zero per 32 weights

    cfg = CompressConfig(calibration=CALIB, factorize=FactorizeConfig(iters=2))
    compot_deploy.compress(tiny_dirs["llama"], tmp_path / "c", cfg, progress=False)
    rep2 = quantize_dir(tmp_path / "c", tmp_path / "cq", q, CALIB, progress=False)
    assert rep2["linears"]["file_bytes"] == rep2["linears"]["planned_bytes"]
    # uint8 code indices (1 byte per non-zero) stay: at these tiny widths COMPOT+4-bit is no smaller than dense 4-bit
    assert rep2["linears"]["file_ratio"] > 0.70
    # the factorization's measurements carry over from the compressed folder's report, beside the quantization's
    factored = [x for x in rep2["layers"] if x["method"] == "compot"]
    assert factored and all(0 < x["rel_error"] < 1 and 0 < x["quant_rel_error"] < 1 for x in factored)
    with pytest.raises(compot_deploy.errors.CompotError, match="already quantized"):
        quantize_dir(tmp_path / "cq", tmp_path / "again", q, CALIB, progress=False)


def test_rank_deficient_calibration_still_quantizes(tiny_dirs, tmp_path):
    """Four short sentences (far fewer tokens than inputs): damping recovers and the log says so."""
    calib = tmp_path / "four.txt"
    calib.write_text("The cat sat.\nIt rained today.\nWe went home.\nGood night.\n")
    out = tmp_path / "rd"
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "quantize", tiny_dirs["bert"], "--calib", calib,
                          "--samples", "4", "--no-packing", "-q", "-o", out],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "rank-deficient" in res.stderr and "relying on damping" in res.stderr
    assert torch.isfinite(_out(compot_deploy.load(out), compot_deploy.models.load_tokenizer(out))).all()
