"""Model families beyond decoder- and encoder-only text models: encoder-decoders (T5, BART) with both stacks
calibrated and compressed, exported in Optimum's encoder / decoder split and gated on greedy generation, and image
models (ViT) calibrated on a folder of images."""

import json
import re
import subprocess
import sys

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


def _build(src, out, *args):
    """`compot-deploy build SRC --ratio 0.3 --no-bench -o OUT ARGS` in its own process, the gate's task-level check
    on 8 held-out inputs; OUT."""
    import yaml

    cfg = out.with_name(out.name + ".yaml")
    cfg.write_text(yaml.safe_dump({"gate": {"eval_texts": 8}}))
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "build", str(src), "--ratio", "0.3", "--no-bench",
                          "--config", str(cfg), "-o", str(out), *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("kind", ["t5", pytest.param("bart", marks=pytest.mark.slow)])
def test_an_encoder_decoder_builds_into_two_graphs_that_generate_as_pytorch_does(kind, minilm_dir, tmp_path):
    """T5 is built for the mobile target too: both graphs (and the weights they share) also in ORT format."""
    import numpy as np
    import onnx

    from compot_deploy.runtimes import torch_seq2seq
    from compot_deploy.runtimes.loader import Model, replay

    src = build_tiny(kind, tmp_path / kind, minilm_dir)
    out = _build(src, tmp_path / "b", "--samples", "8", "--seq-len", "48", *(["--target", "mobile"] if kind == "t5" else []))
    pkg = out / "package"
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["kind"] == "seq2seq" and {"encoder_model.onnx", "decoder_model.onnx"} <= set(man["files"])
    assert "model.onnx" not in man["files"]
    # the embedding table both graphs read is stored once (external data both point at): the graphs' bytes are
    # those of the compressed weights plus ONNX's overhead, not the table twice (1.98x before)
    onnx_bytes = sum(m["bytes"] for f, m in man["files"].items() if ".onnx" in f)
    weights = next(p for p in (out / ".cache").iterdir() if p.name.startswith("compress-")) / "model.safetensors"
    assert "shared_weights.onnx.data" in man["files"] and onnx_bytes < 1.1 * weights.stat().st_size
    # Optimum's names: the encoder, and the decoder with its self-attention past (length 0 on the first call)
    enc, dec = (onnx.load(str(pkg / f), load_external_data=False).graph
                for f in ("encoder_model.onnx", "decoder_model.onnx"))
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask"]
    assert [i.name for i in dec.input][:5] == ["input_ids", "encoder_attention_mask", "encoder_hidden_states",
                                              "past_key_values.0.decoder.key", "past_key_values.0.decoder.value"]
    assert [o.name for o in dec.output][:2] == ["logits", "present.0.decoder.key"] and len(dec.output) == 5
    assert "ai.compot" in man["op_domains"]
    if kind == "t5":
        import onnxruntime as ort

        for name in ("encoder_model.ort", "decoder_model.ort"):
            sess = ort.InferenceSession(str(pkg / name), providers=["CPUExecutionProvider"])
            assert sess.get_inputs()[0].name == "input_ids"
    val = json.loads((pkg / "validation.json").read_text())
    assert val["passed"] and val["parity"]["tokens"] == {"mismatches": 0, "total": 2 * 9 + 9}
    assert val["parity"]["overall"]["max_abs"] < 1e-4 and val["task"]["texts"] > 0
    assert replay(pkg)["passed"]

    # the package's loader (numpy + onnxruntime) generates the tokens PyTorch's compressed model does
    model = compot_deploy.load(out / ".cache" / next(p.name for p in (out / ".cache").iterdir()
                                                    if p.name.startswith("compress-")))
    m = Model(pkg)
    text = "the quick brown fox jumps over the lazy dog"
    ids = np.asarray([m.tokenizer.encode(text).ids], np.int64)
    ref, _, _ = torch_seq2seq(model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, 7)
    assert m.generate_ids(text, 8) == ref[0].tolist()
    # a decoder whose output drifts fails the replay: its first weight matrix (not the shared embedding, not a
    # bias) scaled by 1.5
    proto = onnx.load(str(pkg / "decoder_model.onnx"))
    init = next(i for i in proto.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 16 and max(i.dims) < 1000
                and i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    arr = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array((arr * 1.5).astype(arr.dtype), init.name))
    onnx.save(proto, str(pkg / "decoder_model.onnx"))
    assert not replay(pkg)["passed"]


def _images(folder, n: int, size: int = 24, seed: int = 0):
    """n random RGB PNG files (smooth gradients plus noise, so patches differ) in `folder`."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = np.stack([a * xx + b * yy, b * xx - c * yy, c * xx * yy], -1)
        px = np.clip(128 + 100 * base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{i:03d}.png")
    return folder


def _tiny_vit(folder):
    import transformers as tf

    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_an_image_model_calibrates_on_a_folder_of_images(tmp_path):
    from PIL import Image

    src, images = _tiny_vit(tmp_path / "vit"), _images(tmp_path / "images", 40)
    cfg = CompressConfig(calibration=CalibrationConfig(source=str(images), samples=32, batch_size=8),
                         allocation=AllocationConfig(strategy="uniform", budget=Budget(removed=0.3)),
                         factorize=FactorizeConfig(iters=3))
    out = tmp_path / "out"
    report = compot_deploy.compress(src, out, cfg, progress=False)
    assert sum(lay["method"] == "compot" for lay in report["layers"]) >= 8
    assert report["calibration"]["tokens"] == 32 * (16 + 1)  # 4 × 4 patches and the [CLS] token per image
    assert 0.28 <= report["linears"]["file_ratio"] <= 0.32

    model, processor = load_model(src)
    loaded = compot_deploy.load(out)
    with Image.open(images / "000.png") as im:
        x = processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref, got = model(pixel_values=x).last_hidden_state, loaded(pixel_values=x).last_hidden_state
    rel = float((got - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.6, rel
    assert (out / "preprocessor_config.json").is_file()  # the processor travels with the compressed folder


def test_an_image_model_builds_and_its_package_reads_image_files(tmp_path):
    import numpy as np

    from compot_deploy.models import load_tokenizer
    from compot_deploy.runtimes.loader import Model, preprocess_images, replay

    src = _tiny_vit(tmp_path / "vit")
    images = _images(tmp_path / "images", 12)
    out = _build(src, tmp_path / "b", "--calib", str(images), "--samples", "12")
    pkg = out / "package"
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["kind"] == "image" and "preprocessor_config.json" in man["files"]
    assert [i["name"] for i in man["signature"]["inputs"]] == ["pixel_values"]
    assert man["signature"]["inputs"][0]["shape"] == ["batch_size", 3, 32, 32]
    val = json.loads((pkg / "validation.json").read_text())
    assert val["passed"] and val["parity"]["overall"]["max_abs"] < 1e-4
    assert [c["shape"][0] for c in val["parity"]["cases"]] == [1, 2, 4]
    assert 0.5 < val["task"]["mean_cosine"] < 0.99999 and replay(pkg)["passed"]

    # the package's loader (numpy + pillow) makes the processor's pixel_values, and the compressed model's features
    files = sorted(images.iterdir())[:3]
    from PIL import Image

    pil = [Image.open(f).convert("RGB") for f in files]
    want = load_tokenizer(src)(images=pil, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess_images(files, json.loads((pkg / "preprocessor_config.json").read_text())),
                               want, atol=1e-5)
    model = compot_deploy.load(next(p for p in (out / ".cache").iterdir() if p.name.startswith("compress-")))
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(want)).last_hidden_state.numpy()
    np.testing.assert_allclose(Model(pkg).image_features(files), ref, atol=1e-4)


def test_an_image_model_without_images_or_with_a_broken_one_is_one_error(tmp_path):
    from compot_deploy.errors import CompotError

    src = _tiny_vit(tmp_path / "vit")
    images = _images(tmp_path / "images", 4)
    (images / "broken.png").write_bytes(b"not a png at all")
    for source, message in ((None, "vit (ViTModel) is an image model: give --calib a folder of images"),
                            (str(images), "broken.png: not a readable image")):
        cfg = CompressConfig(calibration=CalibrationConfig(source=source, samples=8),
                             allocation=AllocationConfig(budget=Budget(removed=0.3)))
        with pytest.raises(CompotError, match=re.escape(message)):
            compot_deploy.compress(src, tmp_path / "out", cfg, progress=False)
        assert not (tmp_path / "out").exists()


def _audio(folder, n: int, seed: int = 0):
    """n short audio files: wav and flac, mono and stereo, at 8, 16, 22.05 and 44.1 kHz (resampled on reading)."""
    import numpy as np
    import soundfile

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        rate = (16000, 22050, 8000, 44100)[i % 4]
        t = np.arange(int(rate * rng.uniform(0.3, 1.5))) / rate
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + rng.normal(0, 0.05, t.size)
        soundfile.write(folder / f"{i}.{'flac' if i % 3 == 0 else 'wav'}",
                        (np.stack([x, 0.5 * x], 1) if i % 2 else x).astype(np.float32), rate)
    return folder


def _tiny_whisper(folder, minilm_dir):
    """A 2 + 2 block random Whisper with a one-second window (16 mel bins, 100 frames), MiniLM's tokenizer."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=160, decoder_ffn_dim=160, num_mel_bins=16,
        max_source_positions=50, max_target_positions=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        decoder_start_token_id=101)).save_pretrained(folder)
    tf.WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_speech_model_calibrates_on_audio_files_and_its_package_transcribes(minilm_dir, tmp_path):
    import numpy as np
    import onnx

    from compot_deploy.calibrate.data import read_audio
    from compot_deploy.models import load_tokenizer
    from compot_deploy.runtimes import torch_seq2seq
    from compot_deploy.runtimes.loader import Model, log_mel, replay

    src = _tiny_whisper(tmp_path / "whisper", minilm_dir)
    audio = _audio(tmp_path / "audio", 8)
    out = _build(src, tmp_path / "b", "--calib", str(audio), "--seq-len", "24")
    comp = next(p for p in (out / ".cache").iterdir() if p.name.startswith("compress-"))
    report = json.loads((comp / "compression_report.json").read_text())
    names = [lay["name"] for lay in report["layers"] if lay["method"] == "compot"]
    assert any(".encoder.layers." in n for n in names) and any(".encoder_attn." in n for n in names)
    pkg = out / "package"
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["kind"] == "seq2seq" and {"encoder_model.onnx", "decoder_model.onnx", "tokenizer.json"} <= set(man["files"])
    enc, dec = (onnx.load(str(pkg / f), load_external_data=False).graph
                for f in ("encoder_model.onnx", "decoder_model.onnx"))
    assert [i.name for i in enc.input] == ["input_features"]  # Optimum's Whisper names: no encoder mask
    assert [i.name for i in dec.input][:3] == ["input_ids", "encoder_hidden_states", "past_key_values.0.decoder.key"]
    val = json.loads((pkg / "validation.json").read_text())
    assert val["passed"] and val["parity"]["tokens"]["mismatches"] == 0 and val["parity"]["tokens"]["total"] == 27
    assert val["task"]["next_token_agreement"] > 0.5 and replay(pkg)["passed"]

    # the package's loader: Whisper's log-mel in numpy (HF's extractor to 1e-5), the compressed model's tokens
    processor = load_tokenizer(src)
    wave = read_audio(audio / "1.wav", 16000, 16000)  # stereo at 22.05 kHz, mixed and resampled
    want = processor(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    cfg = processor.feature_extractor.to_dict() if hasattr(processor, "feature_extractor") else processor.to_dict()
    np.testing.assert_allclose(log_mel(wave, cfg)[None], want, atol=1e-5)
    ref, _, _ = torch_seq2seq(compot_deploy.load(comp), {"input_features": want.astype(np.float32)}, 5)
    assert Model(pkg).transcribe_ids(audio / "1.wav", 6) == ref[0].tolist()


def test_a_speech_model_without_audio_or_with_a_broken_file_is_one_error(minilm_dir, tmp_path):
    from compot_deploy.errors import CompotError

    src = _tiny_whisper(tmp_path / "whisper", minilm_dir)
    audio = _audio(tmp_path / "audio", 2)
    (audio / "broken.wav").write_bytes(b"RIFF not really a wave file")
    for source, message in ((None, "whisper (WhisperForConditionalGeneration) is a speech model: give --calib a "
                                   "folder of audio files"),
                            (str(audio), "broken.wav: not a readable audio file")):
        cfg = CompressConfig(calibration=CalibrationConfig(source=source, samples=8, seq_len=16),
                             allocation=AllocationConfig(budget=Budget(removed=0.3)))
        with pytest.raises(CompotError, match=re.escape(message)):
            compot_deploy.compress(src, tmp_path / "out", cfg, progress=False)
        assert not (tmp_path / "out").exists()


def test_a_speech_models_decoder_calibrates_on_its_own_transcription(minilm_dir, tmp_path):
    import numpy as np

    from compot_deploy.calibrate.data import calibration_batches
    from compot_deploy.runtimes import torch_seq2seq

    src = _tiny_whisper(tmp_path / "whisper", minilm_dir)
    model, processor = load_model(src)
    cfg = CalibrationConfig(source=str(_audio(tmp_path / "audio", 3)), samples=3, seq_len=12, batch_size=2)
    batches = calibration_batches(processor, cfg, model, progress=False)
    assert [tuple(b["decoder_input_ids"].shape) for b in batches] == [(2, 12), (1, 12)]
    assert tuple(batches[0]["input_features"].shape) == (2, 16, 100) and "attention_mask" not in batches[0]
    b = batches[0]
    tokens, _, _ = torch_seq2seq(model, {"input_features": b["input_features"].numpy()}, 10)
    assert (b["decoder_input_ids"][:, 0] == 101).all()  # the start token, then the greedy transcription
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:].numpy(), tokens)
    # the mask ends after the first end-of-text token: made the token the first clip's transcription has 4th
    model.config.eos_token_id = int(tokens[0, 3])
    b = calibration_batches(processor, cfg, model, progress=False)[0]
    first = int(np.argmax(tokens[0] == tokens[0, 3])) + 1  # its first position in decoder_input_ids
    mask = b["decoder_attention_mask"].numpy()
    assert mask[0, : first + 1].all() and not mask[0, first + 1 :].any() and first + 1 < 12
