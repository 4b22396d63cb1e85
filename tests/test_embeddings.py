"""--embedding-bits: the token table stored packed, looked up by GatherBlockQuantized in stock ONNX Runtime."""

import time

import pytest
import torch

from compot_deploy.storage.budget import embedding_bytes


def test_rows_are_the_rounded_table():
    """QuantEmbedding's lookups = round-to-nearest of the table with its scales rounded to float16, row by row;
    the error shrinks ~16× from 4 to 8 bits."""
    from compot_deploy.quantize.gptq import rtn
    from compot_deploy.storage.modules import QuantEmbedding
    from compot_deploy.storage.packing import QuantTensor

    torch.manual_seed(0)
    E = torch.randn(300, 64) * torch.rand(300, 1)
    ids = torch.tensor([[0, 7, 299], [5, 5, 1]])
    err = {}
    for bits in (4, 8):
        qz = rtn(E.T, bits, 32, sym=True)
        m = QuantEmbedding(300, 64, bits, 32, embed_scale=2.0)
        m.table = QuantTensor.from_quantized(qz, lambda t: t.half().float())
        ref = (qz.q.double() - qz.zeros[torch.arange(64) // 32]) * qz.scales.half().double()[torch.arange(64) // 32]
        torch.testing.assert_close(m(ids).double(), 2.0 * ref.T[ids], rtol=0, atol=1e-6)
        assert m.table.qweight.numel() == 300 * 64 * bits // 8
        err[bits] = ((m.weight - E).norm() / E.norm()).item()
    assert err[8] < 0.01 and 10 < err[4] / err[8] < 25, err
    from compot_deploy.quantize.embeddings import rtn_rows

    whole, chunked = rtn(E.T, 4, 32, sym=True), rtn_rows(E, 4, 32, chunk=7)  # rows are independent
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scales, chunked.scales)


def test_gptq_of_a_tied_table_weighs_the_heads_inputs():
    """GPTQ of Eᵀ as the LM head (gptq_head): on correlated head inputs its output error is well below
    round-to-nearest's at the same bytes, and chunks of the vocabulary give the whole-matrix GPTQ."""
    from compot_deploy.calibrate.runner import Gram
    from compot_deploy.quantize.embeddings import HEAD_DAMP, gptq_head, rtn_rows, table_errors2
    from compot_deploy.quantize.gptq import gptq

    torch.manual_seed(0)
    V, H = 400, 64
    E = torch.randn(V, H) * torch.rand(V, 1)
    # correlated inputs (a spectrum falling 100×, rotated), not centred, as final hidden states are
    X = (torch.randn(3000, H) * torch.logspace(0, -2, H)) @ torch.linalg.qr(torch.randn(H, H))[0] + 0.1 * torch.randn(H)
    gram = Gram(G=(X.T @ X).double(), n=3000)
    g = gptq_head(E, gram, 4, 32, chunk=150, progress=False)
    whole = gptq(E.T, 2.0 * gram.G / gram.n, 4, 32, sym=True, damp=HEAD_DAMP)
    assert (g.q != whole.q).double().mean() < 1e-3 and torch.allclose(g.scales, whole.scales)
    r = rtn_rows(E, 4, 32)

    def rows(qz):
        return lambda i0, i1: qz.dequantize().T[i0:i1]

    rows_g, head_g = (x ** 0.5 for x in table_errors2(E, rows(g), gram))
    rows_r, head_r = (x ** 0.5 for x in table_errors2(E, rows(r), gram))
    assert head_g < 0.65 * head_r, (head_g, head_r)  # 0.051 vs 0.094
    assert rows_r < rows_g < 1.5 * rows_r, (rows_g, rows_r)  # the lookups pay a little (0.110 vs 0.095)


@pytest.mark.parametrize("kind,bits", [("bert", 8), ("llama", 4), ("gpt2", 8)])  # gpt2: the LM head is tied
def test_packed_table_exports_and_passes_the_gate(kind, bits, tiny_dirs, tmp_path):
    """compress --embedding-bits → load → export: the table is one uint8 initializer of V·H·bits/8 bytes read by
    com.microsoft::GatherBlockQuantized; ORT matches the PyTorch model; the file shrinks by exactly the table's
    saving (budget.embedding_bytes)."""
    import onnx
    from onnx import numpy_helper

    import compot_deploy
    from compot_deploy.config import CalibrationConfig, CompressConfig, EmbeddingConfig, ExportConfig, ValidateConfig
    from compot_deploy.exporters.onnx_export import export_dir
    from compot_deploy.exporters.validate import validate_export
    from compot_deploy.storage.modules import QuantEmbedding

    calib = CalibrationConfig(samples=8, seq_len=48)
    plain = compot_deploy.compress(tiny_dirs[kind], tmp_path / "plain", CompressConfig(calibration=calib),
                                   progress=False)
    cfg = CompressConfig(calibration=calib, embeddings=EmbeddingConfig(bits=bits))
    rep = compot_deploy.compress(tiny_dirs[kind], tmp_path / "c", cfg, progress=False)
    e = rep["embeddings"]
    V, H = e["num_embeddings"], e["embedding_dim"]
    assert e["bytes"] == embedding_bytes(V, H, bits, 32, 2) == V * H * bits // 8 + V * (H // 32) * 2
    saved = plain["model_file"]["bytes"] - rep["model_file"]["bytes"]
    assert abs(saved - (V * H * 2 - e["bytes"])) < 256, saved  # header entries aside
    assert e["rel_error"] < (0.01 if bits == 8 else 0.12), e
    assert rep["linears"]["file_bytes"] == plain["linears"]["file_bytes"]  # the linears are untouched
    assert isinstance(compot_deploy.load(tmp_path / "c").get_input_embeddings(), QuantEmbedding)

    man = export_dir(tmp_path / "c", tmp_path / "e", ExportConfig())
    assert "com.microsoft::GatherBlockQuantized" in man["graph"]["ops"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.initializer}
    tables = [a for a in inits.values() if a.dtype.name == "uint8" and a.size == V * H * bits // 8]
    floats = [a for a in inits.values() if a.size == V * H and a.dtype.kind == "f"]
    assert len(tables) == 1 and len(floats) == (kind == "llama"), len(floats)  # llama's untied head stays float
    if kind == "gpt2":  # the head reads the same packed bytes
        assert "com.microsoft::MatMulNBits" in man["graph"]["ops"]
        assert type(compot_deploy.load(tmp_path / "c").get_output_embeddings()).__name__ == "TiedQuantHead"
    rep = validate_export(tmp_path / "e", ValidateConfig(eval_texts=0))
    assert rep["passed"] and rep["parity"]["overall"]["max_abs"] < 1e-4, rep["parity"]["overall"]


def test_a_table_that_cannot_be_grouped_is_refused_before_any_work(tiny_dirs, tmp_path):
    import compot_deploy
    from compot_deploy.config import CompressConfig, EmbeddingConfig
    from compot_deploy.errors import CompotError

    t0 = time.perf_counter()
    with pytest.raises(CompotError, match="hidden size 64 is not a multiple of the group 128"):
        compot_deploy.compress(tiny_dirs["bert"], tmp_path / "o", CompressConfig(embeddings=EmbeddingConfig(
            bits=8, group=128)), progress=False)
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o").exists()
    assert list(tmp_path.iterdir()) == []


def test_quantize_takes_the_table_too_and_keeps_it_tied(tiny_dirs, tmp_path):
    """`quantize --embedding-bits` on a plain model: dense GPTQ of the linears plus the packed table, which the tied
    head reads (one tensor in the file); a second pass refuses to quantize the table again."""
    import compot_deploy
    from compot_deploy.compression import quantize_dir
    from compot_deploy.config import CalibrationConfig, EmbeddingConfig, QuantizeConfig
    from compot_deploy.errors import CompotError
    from compot_deploy.storage.artifact import safetensors_header

    calib = CalibrationConfig(samples=8, seq_len=48)
    rep = quantize_dir(tiny_dirs["gpt2"], tmp_path / "q", QuantizeConfig(bits=4), calib, progress=False,
                       embeddings=EmbeddingConfig(bits=4))
    e = rep["embeddings"]
    assert e["tied_head"] == "lm_head" and e["bits"] == 4 and e["method"] == "gptq"
    assert 0 < e["head_rel_error"] < 0.5, e  # GPTQ on the head's inputs by default
    names = [n for n in safetensors_header(tmp_path / "q" / "model.safetensors") if n.endswith("table.qweight")]
    assert len(names) == 1, names  # stored once
    m = compot_deploy.load(tmp_path / "q")
    assert m.get_output_embeddings().table is m.get_input_embeddings().table
    assert rep["model_file"]["ratio"] > 0.7  # 4-bit linears and table: most of the float16 file is gone

    # a compressed folder with a packed table: quantize keeps it, and refuses to quantize it twice
    from compot_deploy.config import CompressConfig

    compot_deploy.compress(tiny_dirs["bert"], tmp_path / "c", CompressConfig(calibration=calib,
                           embeddings=EmbeddingConfig(bits=8)), progress=False)
    with pytest.raises(CompotError, match="embedding table is already quantized"):
        quantize_dir(tmp_path / "c", tmp_path / "q2", QuantizeConfig(bits=8), calib, progress=False,
                     embeddings=EmbeddingConfig(bits=8))
    rep = quantize_dir(tmp_path / "c", tmp_path / "q3", QuantizeConfig(bits=8), calib, progress=False)
    assert rep["embeddings"]["bits"] == 8 and type(compot_deploy.load(tmp_path / "q3").get_input_embeddings()) \
        is type(m.get_input_embeddings())


def test_build_defaults_and_auto(tiny_dirs):
    """build's defaults fill what a config leaves open (a budget given in any form replaces the default one whole);
    --embedding-bits auto quantizes an untied table at 4 bits and leaves a tied one alone."""
    from compot_deploy.config import BuildConfig, CompressConfig, with_build_defaults
    from compot_deploy.models import load_model
    from compot_deploy.quantize.embeddings import resolve_bits

    b = BuildConfig()
    assert b.compress.allocation.budget.removed == 0.1 and b.compress.embeddings.bits == "auto"
    c = CompressConfig(**with_build_defaults({"allocation": {"budget": {"kept": 0.2}, "strategy": "joint"}}))
    assert c.allocation.budget.kept == 0.2 and c.allocation.budget.removed is None
    c = CompressConfig(**with_build_defaults({"embeddings": {"bits": None}}))
    assert c.allocation.budget.removed == 0.1 and c.embeddings.bits is None
    assert CompressConfig().allocation.budget.removed == 0.3  # compress keeps its own defaults
    assert resolve_bits(load_model(tiny_dirs["bert"])[0], "auto", 32) == 4
    assert resolve_bits(load_model(tiny_dirs["gpt2"])[0], "auto", 32) is None  # tied to the LM head
    assert resolve_bits(load_model(tiny_dirs["bert"])[0], "auto", 128) is None  # 64 values a row: no group of 128
    assert resolve_bits(load_model(tiny_dirs["gpt2"])[0], 8, 32) == 8  # asked for: tied or not
