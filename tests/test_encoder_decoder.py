"""Encoder-decoders (T5, BART): both stacks calibrated and compressed, the saved folder loads and generates."""

import pytest
import torch
from conftest import build_tiny

import compot_deploy
from compot_deploy.calibrate.data import make_batches, with_decoder_inputs
from compot_deploy.config import AllocationConfig, CalibrationConfig, CompressConfig, FactorizeConfig
from compot_deploy.models import final_hidden, find_stacks, load_model
from compot_deploy.storage.budget import Budget
from compot_deploy.storage.modules import CompotLinear


@pytest.mark.parametrize("kind,encoder,decoder", [("t5", "encoder.block", "decoder.block"),
                                                  ("bart", "model.encoder.layers", "model.decoder.layers")])
def test_an_encoder_decoder_compresses_both_stacks_and_its_folder_generates(kind, encoder, decoder, minilm_dir,
                                                                           tmp_path):
    src = build_tiny(kind, tmp_path / kind, minilm_dir)
    model, tok = load_model(src)
    stacks = find_stacks(model)
    assert [(s.prefix, s.offset, s.mask_key) for s in stacks] == [
        (encoder, 0, "attention_mask"), (decoder, 2, "decoder_attention_mask")]

    cfg = CompressConfig(calibration=CalibrationConfig(samples=16, seq_len=48, batch_size=4),
                         allocation=AllocationConfig(strategy="uniform", budget=Budget(removed=0.3)),
                         factorize=FactorizeConfig(iters=3))
    out = tmp_path / "out"
    report = compot_deploy.compress(src, out, cfg, progress=False)
    names = [lay["name"] for lay in report["layers"] if lay["method"] == "compot"]
    assert any(n.startswith(encoder + ".") for n in names) and any(n.startswith(decoder + ".") for n in names)
    # the decoder's cross-attention is compressed too, and the blocks of both stacks are numbered in one walk
    assert any("EncDecAttention" in n or "encoder_attn" in n for n in names)
    assert 0.28 <= report["linears"]["file_ratio"] <= 0.32

    loaded = compot_deploy.load(out)
    assert sum(isinstance(m, CompotLinear) for m in loaded.modules()) == len(names)
    ids = [tok("the quick brown fox jumps over the lazy dog")["input_ids"], tok("a short one")["input_ids"]]
    batch = with_decoder_inputs(model, make_batches(ids, 2, tok.pad_token_id)[0])
    with torch.no_grad():
        ref, got = final_hidden(model, batch), final_hidden(loaded, batch)
    real = batch["decoder_attention_mask"].bool()
    rel = float((got - ref)[real].norm() / ref[real].norm())
    assert 1e-4 < rel < 0.6, rel  # changed, not broken (random weights: the error means nothing beyond that)
    gen = loaded.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
                          do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] >= 2
