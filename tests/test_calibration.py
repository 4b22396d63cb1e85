import json

import pytest
import torch
from conftest import build_tiny

from compot_deploy.calibrate.data import (load_texts, make_batches, make_samples, special_tokens_around,
                                         with_decoder_inputs)
from compot_deploy.calibrate.runner import calibrate, run_blocks
from compot_deploy.errors import CompotError
from compot_deploy.models import find_targets, load_model


def test_sources(tmp_path):
    builtin = load_texts(None)
    assert len(builtin) > 100
    f = tmp_path / "a.txt"
    f.write_text("one line\n\nsecond line\n")
    assert load_texts(str(f)) == ["one line", "second line"]
    d = tmp_path / "folder"
    d.mkdir()
    (d / "x.txt").write_text("alpha\n")
    (d / "y.txt").write_text("beta\n")
    assert load_texts(str(d)) == ["alpha", "beta"]
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "gamma"}) + "\n")
    assert load_texts(str(j)) == ["gamma"]
    with pytest.raises(CompotError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))


def test_saved_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": [1, 2], "text": ["first doc", "second doc"]}).save_to_disk(tmp_path / "ds")
    assert load_texts(str(tmp_path / "ds")) == ["first doc", "second doc"]


def test_samples_are_seeded_and_sized(minilm_dir):
    from compot_deploy.models import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    texts = load_texts(None)
    a = make_samples(tok, texts, 8, 64, seed=1)
    assert a == make_samples(tok, texts, 8, 64, seed=1)
    assert a != make_samples(tok, texts, 8, 64, seed=2)
    pre, suf = special_tokens_around(tok)
    assert (pre, suf) == ([tok.cls_token_id], [tok.sep_token_id])
    assert all(len(s) == 64 and s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in a)
    docs = make_samples(tok, texts, 8, 64, seed=1, packing=False)
    assert all(len(s) <= 64 for s in docs) and len({len(s) for s in docs}) > 1
    with pytest.raises(CompotError, match="tokens"):
        make_samples(tok, ["too short"], 4, 64, seed=0)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_grams_exclude_padding(kind, tiny_dirs):
    """Grams from a right-padded batch equal Grams from each sample run alone, with no padding at all."""
    model, tok = load_model(tiny_dirs[kind])
    samples = make_samples(tok, load_texts(None), 4, 48, seed=0, packing=False)
    assert len({len(s) for s in samples}) > 1  # the batch really is ragged
    targets = find_targets(model)
    padded = calibrate(model, make_batches(samples, 4, tok.pad_token_id), targets, progress=False)
    single = calibrate(model, make_batches(samples, 1, tok.pad_token_id), targets, progress=False)
    for t in targets:
        assert padded[t.name].n == single[t.name].n == sum(len(s) for s in samples)
        # float32 activations: batching changes their last bits, so entries agree to 1e-6 of the Gram's scale
        scale = float(single[t.name].G.abs().max())
        torch.testing.assert_close(padded[t.name].G, single[t.name].G, rtol=1e-4, atol=1e-6 * scale)


def test_the_walk_reruns_a_block_its_step_changed(tiny_dirs):
    model, tok = load_model(tiny_dirs["llama"])
    batches = make_batches(make_samples(tok, load_texts(None), 4, 32, seed=0), 2, tok.pad_token_id)
    targets = find_targets(model)
    base = calibrate(model, batches, targets, progress=False)

    seq, seen = {}, []

    def zero_block0(i, grams):
        seen.append(i)
        seq.update(grams)
        if i == 0:
            for t in targets:
                if t.block == 0:
                    model.get_submodule(t.name).weight.data.zero_()
        return True

    run_blocks(model, batches, targets, zero_block0, "test", progress=False)
    assert seen == sorted({t.block for t in targets})
    b0 = [t.name for t in targets if t.block == 0]
    b1 = [t.name for t in targets if t.block == 1]
    assert all(torch.equal(base[n].G, seq[n].G) for n in b0)
    assert not any(torch.allclose(base[n].G, seq[n].G) for n in b1)


def test_the_walk_stops_after_the_last_block_holding_a_target(tiny_dirs):
    """--include on the first blocks: the blocks after them are never run (a model far bigger than its first
    blocks can be compressed block-wise and timed per block)."""
    model, tok = load_model(tiny_dirs["llama"])
    batches = make_batches(make_samples(tok, load_texts(None), 4, 32, seed=0), 2, tok.pad_token_id)
    targets = find_targets(model, include=["model.layers.0.*"])
    assert {t.block for t in targets} == {0}
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        grams = calibrate(model, batches, targets, progress=False)
    finally:
        handle.remove()
    assert calls == [] and set(grams) == {t.name for t in targets}


def _full_forward_grams(model, batches, targets) -> dict:
    """Grams of every target's inputs hooked during ordinary forward passes of the whole model (the reference the
    block-by-block walk must reproduce)."""
    grams, handles = {t.name: 0 for t in targets}, []
    mask = {}
    for t in targets:
        # an encoder-decoder's decoder reads its own tokens, and its cross-attention's keys and values the encoder's
        side = "dec" if t.name.startswith(("decoder.", "model.decoder.")) else "enc"
        if side == "dec" and any(k in t.name for k in ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj",
                                                       "encoder_attn.v_proj")):
            side = "enc"

        def hook(_m, args, name=t.name, side=side):
            x = args[0].detach()[mask[side]].double()
            grams[name] = grams[name] + x.T @ x

        handles.append(model.get_submodule(t.name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            mask["enc"] = b["attention_mask"].bool()
            mask["dec"] = b.get("decoder_attention_mask", b["attention_mask"]).bool()
            model(**b)
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("kind", ["bert", "llama", "gemma2", "t5-encoder", "t5", "bart"])
def test_the_walk_sees_what_the_whole_model_sees(kind, tiny_dirs, minilm_dir, tmp_path):
    """Every block's Gram from the block-by-block walk equals the one hooked in whole-model forwards: the walk feeds
    each block what its stack would (T5 threads the first block's relative position bias to the others; an
    encoder-decoder's decoder blocks read the encoder's outputs, at the encoder's tokens)."""
    folder = tiny_dirs[kind] if kind in tiny_dirs else build_tiny(kind, tmp_path / kind, minilm_dir)
    model, tok = load_model(folder)
    batches = make_batches(make_samples(tok, load_texts(None), 4, 40, seed=0, packing=False), 2, tok.pad_token_id)
    if kind in ("t5", "bart"):
        batches = [with_decoder_inputs(model, b) for b in batches]
    targets = find_targets(model)
    assert len({t.block for t in targets}) >= (4 if kind in ("t5", "bart") else 2)
    walk = calibrate(model, batches, targets, progress=False)
    ref = _full_forward_grams(model, batches, targets)
    for t in targets:
        scale = float(ref[t.name].abs().max())
        torch.testing.assert_close(walk[t.name].G, ref[t.name], rtol=1e-5, atol=1e-6 * scale, msg=t.name)
    # linears fed the very same tensor share one Gram, accumulated once; the others each have their own
    shared = {"llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")],
              "bart": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       ("encoder_attn.k_proj", "encoder_attn.v_proj")]}.get(kind, [])
    for group in shared:
        first = min(t.block for t in targets if t.name.endswith(group))
        members = [t.name for t in targets if t.name.endswith(group) and t.block == first]
        assert len(members) == len(group) and all(walk[m] is walk[members[0]] for m in members), members
    n_distinct = len({id(g) for g in walk.values()})
    assert n_distinct == len(walk) - sum(len(g) - 1 for g in shared) * len({t.block for t in targets}) \
        if kind == "llama" else n_distinct <= len(walk)
