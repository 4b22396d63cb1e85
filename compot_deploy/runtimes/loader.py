"""Run an exported model with numpy and onnxruntime alone (tokenizers for text). This file imports neither torch
nor compot_deploy: `build` copies it into every package as loader.py, and compot-deploy itself uses its decoder
loop and pooling, so the package and the tool run the same code.

    from loader import Model
    m = Model()                       # this folder; Model(providers=["CUDAExecutionProvider"]) on a GPU
    m.embed(["a sentence"])           # encoders: mean-pooled sentence embeddings, (n, hidden)
    m.generate("Once upon", 8)        # decoders: the greedy continuation through the KV cache, as text
                                      # encoder-decoders (T5, BART): the greedy output for the input text
    m.image_features(["cat.png"])     # image models (ViT): last_hidden_state (n, tokens, hidden); needs pillow
    m.transcribe("speech.wav", 32)    # speech models (Whisper): the greedy output as text; files need soundfile

    python loader.py [EXPORT_DIR]     # replays parity_sample.npz (written by the gate), exit 1 on mismatch
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE = "parity_sample.npz"
HERE = Path(__file__).resolve().parent


def mean_pool(hidden, attention_mask):
    """Sentence embeddings as sentence-transformers makes them: the mean of hidden (B, L, H) over the real
    tokens of attention_mask (B, L), in float64 → (B, H)."""
    m = np.asarray(attention_mask)[..., None].astype(np.float64)
    return (np.asarray(hidden, np.float64) * m).sum(1) / m.sum(1)


def greedy(step, ids, steps: int):
    """Greedy decoding: a prefill of the prompt ids (B, L) (no padding), then `steps` one-token calls through the
    cache. step(ids, attention_mask, position_ids, past) → (logits (B, L, V) numpy, next past); past is None on
    the prefill. Returns (tokens (B, steps + 1), logits of every call [(B, L, V), (B, 1, V) × steps])."""
    B, L = ids.shape
    pos = np.arange(L, dtype=np.int64)[None].repeat(B, 0)
    logits, past = step(ids, np.ones((B, L), np.int64), pos, None)
    all_logits, tokens = [logits], [logits[:, -1].argmax(-1)]
    for t in range(steps):
        n = L + t + 1
        logits, past = step(tokens[-1][:, None].astype(np.int64), np.ones((B, n), np.int64),
                            np.full((B, 1), n - 1, np.int64), past)
        all_logits.append(logits)
        tokens.append(logits[:, -1].argmax(-1))
    return np.stack(tokens, 1), all_logits


class OrtDecoder:
    """One call through an exported decoder's past/present tensors (Optimum's names)."""

    def __init__(self, sess):
        self.sess = sess
        self.past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in (self.past[0].type if self.past else "") else np.float32
        self.outputs = [o.name for o in sess.get_outputs()]

    def empty_past(self, batch: int) -> dict:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), self.dtype) for i in self.past}

    def call(self, feed: dict, past: dict | None):
        """One run on `feed` (input_ids and the graph's other inputs) and `past` (None: an empty cache). Returns
        (logits (B, L, V), next past dict)."""
        past = self.empty_past(feed["input_ids"].shape[0]) if past is None else past
        outs = self.sess.run(None, {**feed, **past})
        present = dict(zip(self.outputs[1:], outs[1:], strict=True))
        return outs[0], {p.name: present[p.name.replace("past_key_values", "present")] for p in self.past}

    def step(self, ids, attention_mask, position_ids, past: dict | None):
        """One call (past None: an empty cache). Returns (logits (B, L, V), next past dict)."""
        return self.call({"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids}, past)

    def greedy(self, ids, steps: int):
        return greedy(self.step, ids, steps)


class OrtSeq2Seq:
    """An encoder-decoder's two exported graphs (Optimum's names): encode once, then decoder calls through the
    self-attention past/present tensors."""

    def __init__(self, encoder, decoder, start_token: int):
        self.encoder, self.decoder, self.start = encoder, decoder, int(start_token)
        self.calls = OrtDecoder(decoder)
        self.masked = "encoder_attention_mask" in [i.name for i in decoder.get_inputs()]  # Whisper's is not

    def encode(self, feed: dict):
        """The encoder's inputs (input_ids and attention_mask (B, S), or input_features) → last_hidden_state."""
        return self.encoder.run(["last_hidden_state"], feed)[0]

    def stepper(self, hidden, attention_mask=None):
        """A step for greedy() over the encoder's output; greedy's decoder mask and positions are not inputs
        here (the decoder counts positions from its past)."""
        fixed = {"encoder_hidden_states": hidden}
        if self.masked:
            fixed["encoder_attention_mask"] = attention_mask

        def step(ids, _mask, _positions, past):
            return self.calls.call({"input_ids": ids, **fixed}, past)

        return step

    def greedy(self, feed: dict, steps: int):
        """Greedy decoding for the encoder inputs `feed`: the decoder starts from its start token. Returns
        (tokens (B, steps + 1), every call's logits, the encoder's last_hidden_state)."""
        hidden = self.encode(feed)
        start = np.full((hidden.shape[0], 1), self.start, np.int64)
        tokens, logits = greedy(self.stepper(hidden, feed.get("attention_mask")), start, steps)
        return tokens, logits, hidden


def open_session(model, providers=("CPUExecutionProvider",)):
    """An InferenceSession on `model` (a path, or a serialized ModelProto as bytes) that logs errors only (ORT's
    warnings come with terminal colour codes)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=list(providers))


ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"  # an encoder-decoder's two graphs


def start_token(config: dict) -> int:
    """The token an encoder-decoder's decoder starts from: config's decoder_start_token_id, else its pad."""
    start = config.get("decoder_start_token_id")
    return config.get("pad_token_id") or 0 if start is None else start


def is_seq2seq(folder) -> bool:
    """Whether an export or package folder holds an encoder-decoder's two graphs."""
    return (Path(folder) / ENCODER_FILE).is_file()


def seq2seq(folder, providers=("CPUExecutionProvider",), opener=None):
    """OrtSeq2Seq over an export or package folder with encoder_model.onnx and decoder_model.onnx; `opener(path)`
    makes each session (default: open_session on `providers`)."""
    folder = Path(folder)
    opener = opener or (lambda path: open_session(path, providers))
    config = json.loads((folder / "config.json").read_text())
    return OrtSeq2Seq(opener(folder / ENCODER_FILE), opener(folder / DECODER_FILE), start_token(config))


def preprocess_images(images, cfg: dict):
    """pixel_values (n, 3, H, W) float32 of `images` (paths or PIL images) as a ViT-style image processor makes them
    from preprocessor_config.json `cfg`: RGB, resized to size (height, width) with its resample filter, rescaled,
    normalized by image_mean / image_std."""
    from PIL import Image

    size = cfg.get("size") or {}
    hw = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge"),) * 2
    out = []
    for im in images:
        im = (Image.open(im) if isinstance(im, (str, Path)) else im).convert("RGB")
        if cfg.get("do_resize", True) and hw[0]:
            im = im.resize((hw[1], hw[0]), resample=Image.Resampling(cfg.get("resample", 2)))
        a = np.asarray(im, np.float32)
        if cfg.get("do_rescale", True):
            a = a * np.float32(cfg.get("rescale_factor", 1 / 255))
        if cfg.get("do_normalize", True):
            a = (a - np.asarray(cfg["image_mean"], np.float32)) / np.asarray(cfg["image_std"], np.float32)
        out.append(a.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), 3.0 * f / 200.0)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(n_fft: int, n_mels: int, sampling_rate: int, fmax: float = 8000.0):
    """(1 + n_fft // 2, n_mels) triangular filters on Slaney's mel scale from 0 to fmax, area-normalized (Whisper's
    feature extractor's)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(fmax), n_mels + 2))
    slopes = edges[None] - fft_freqs[:, None]
    rise, fall = -slopes[:, :-2] / np.diff(edges)[:-1], slopes[:, 2:] / np.diff(edges)[1:]
    return np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (edges[2:] - edges[:-2]))[None]


def log_mel(waveform, cfg: dict):
    """Whisper's input_features (n_mels, frames) float32 of a mono waveform at cfg's sampling_rate: zero-padded or
    cut to n_samples, a centred STFT (periodic Hann window of n_fft, hop_length), power through the mel filters,
    log10, floored 8 below the maximum, scaled (x + 4) / 4. cfg: the feature extractor's configuration."""
    n_fft, hop, n = cfg["n_fft"], cfg["hop_length"], cfg["n_samples"]
    x = np.zeros(n, np.float64)
    w = np.asarray(waveform, np.float64)[:n]
    x[: w.size] = w
    x = np.pad(x, n_fft // 2, mode="reflect")
    frames = 1 + (x.size - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.abs(np.fft.rfft(x[np.arange(n_fft)[None] + hop * np.arange(frames)[:, None]] * window, axis=1)) ** 2
    mel = np.log10(np.maximum(spec @ mel_filters(n_fft, cfg["feature_size"], cfg["sampling_rate"]), 1e-10)).T[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def read_audio(path, sampling_rate: int):
    """A mono float32 waveform of the audio file `path` at `sampling_rate` (needs soundfile; scipy where the
    file's rate differs)."""
    import math

    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    x = data.mean(1)
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, sampling_rate)
        x = resample_poly(x, sampling_rate // g, rate // g)
    return x.astype(np.float32)


def _processor_config(folder: Path) -> dict:
    """The image processor's or feature extractor's settings (preprocessor_config.json, or the section of a
    processor's processor_config.json)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "feature_extractor"),
                      ("processor_config.json", "image_processor")):
        if (folder / name).is_file():
            cfg = json.loads((folder / name).read_text())
            if key is None or key in cfg:
                return cfg if key is None else cfg[key]
    raise FileNotFoundError(f"{folder} has no preprocessor_config.json or processor_config.json")


class Model:
    """A package folder: model.onnx (or encoder_model.onnx + decoder_model.onnx), config.json, and tokenizer.json
    (text), preprocessor_config.json (images) or both with the feature extractor's settings (speech)."""

    def __init__(self, folder=HERE, providers=("CPUExecutionProvider",)):
        folder = Path(folder)
        self.seq2seq = seq2seq(folder, providers) if is_seq2seq(folder) else None
        self.session = self.seq2seq.encoder if self.seq2seq else open_session(folder / "model.onnx", providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        if "pixel_values" in self.inputs or "input_features" in self.inputs:
            self.processor = _processor_config(folder)
        if not (folder / "tokenizer.json").is_file():
            return
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "config.json").read_text())
        pad = cfg.get("pad_token_id")
        self.tokenizer.enable_padding(pad_id=pad if isinstance(pad, int) else 0)

    def encode(self, texts, max_length=128):
        self.tokenizer.enable_truncation(max_length)
        enc = self.tokenizer.encode_batch(list(texts))
        feed = {"input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in enc], np.int64)
        return feed

    def embed(self, texts, max_length=128):
        feed = self.encode(texts, max_length)
        (h,) = self.session.run(["last_hidden_state"], feed)
        return mean_pool(h, feed["attention_mask"])

    def image_features(self, images):
        """last_hidden_state (n, tokens, hidden) of `images` (paths or PIL images), image models."""
        pixels = preprocess_images(images, self.processor)
        return self.session.run(["last_hidden_state"], {"pixel_values": pixels})[0]

    def transcribe(self, audio, max_new_tokens=32):
        """The greedy output of a speech model (Whisper) for `audio` (a file path, or a mono float array at the
        model's sampling rate), decoded to text."""
        return self.tokenizer.decode(self.transcribe_ids(audio, max_new_tokens), skip_special_tokens=True)

    def transcribe_ids(self, audio, max_new_tokens=32):
        rate = self.processor["sampling_rate"]
        wave = read_audio(audio, rate) if isinstance(audio, (str, Path)) else audio
        feed = {"input_features": log_mel(wave, self.processor)[None]}
        tokens, _, _ = self.seq2seq.greedy(feed, max_new_tokens - 1)
        return tokens[0].tolist()

    def generate(self, text, max_new_tokens=16):
        """The greedy continuation of `text`, decoded to a string (decoders)."""
        return self.tokenizer.decode(self.generate_ids(text, max_new_tokens), skip_special_tokens=True)

    def generate_ids(self, text, max_new_tokens=16):
        """Token ids of the greedy continuation of `text` (an encoder-decoder: of its output for `text`), through
        the KV cache; the prompt gets the tokenizer's special tokens (e.g. Gemma's <bos>)."""
        self.tokenizer.no_truncation()
        ids = np.array([self.tokenizer.encode(text).ids], np.int64)
        if self.seq2seq:
            tokens, _, _ = self.seq2seq.greedy({"input_ids": ids, "attention_mask": np.ones_like(ids)},
                                               max_new_tokens - 1)
        else:
            tokens, _ = OrtDecoder(self.session).greedy(ids, max_new_tokens - 1)
        return tokens[0].tolist()


def replay(folder: str | Path, tol: float = 1e-3) -> dict:
    """Run the sample the gate stored (inputs and PyTorch's outputs) through model.onnx on the CPU EP."""
    folder = Path(folder)
    sample = dict(np.load(folder / SAMPLE))
    if "encoder_hidden" in sample:
        s2s = seq2seq(folder)
        feed = {i.name: sample[i.name] for i in s2s.encoder.get_inputs()}
        tokens, logits, hidden = s2s.greedy(feed, int(sample["decode_steps"]))
        real = sample["attention_mask"].astype(bool) if "attention_mask" in sample else np.ones(hidden.shape[:2], bool)
        err = max(float(np.abs(hidden[real] - sample["encoder_hidden"][real]).max()),
                  float(np.abs(logits[0] - sample["first_logits"]).max()))
        same = bool((tokens == sample["tokens"]).all())
        return {"kind": "seq2seq", "tokens_match": same, "max_abs": err, "passed": same and err <= tol}
    sess = open_session(folder / "model.onnx")
    if "prompt" in sample:
        tokens, logits = OrtDecoder(sess).greedy(sample["prompt"], int(sample["decode_steps"]))
        err = float(np.abs(logits[0] - sample["prefill_logits"]).max())
        ok = bool((tokens == sample["tokens"]).all()) and err <= tol
        return {"kind": "decoder", "tokens_match": bool((tokens == sample["tokens"]).all()), "prefill_max_abs": err,
                "passed": ok}
    feed = {i.name: sample[i.name] for i in sess.get_inputs()}
    (out,) = sess.run(["last_hidden_state"], feed)
    ref = sample["last_hidden_state"]
    real = sample["attention_mask"].astype(bool) if "attention_mask" in sample else np.ones(ref.shape[:2], bool)
    err = float(np.abs(out[real] - ref[real]).max())
    return {"kind": "image" if "pixel_values" in sample else "encoder", "max_abs": err, "passed": err <= tol}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="loader.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", nargs="?", default=str(HERE),
                    help=f"a folder with model.onnx (or encoder_model.onnx and decoder_model.onnx) and {SAMPLE}; replays the sample and prints the parity as "
                         "JSON, exit 1 on mismatch (default: this file's folder)")
    args = ap.parse_args(argv)
    if not (Path(args.export_dir) / SAMPLE).is_file():
        print(f"error: {args.export_dir} has no {SAMPLE} (run `compot-deploy validate` on it first)",
              file=sys.stderr)
        return 2
    res = {"onnxruntime": ort.__version__, "numpy": np.__version__, **replay(args.export_dir)}
    print(json.dumps(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
