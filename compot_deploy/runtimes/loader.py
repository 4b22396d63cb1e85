"""Run an exported model with numpy and onnxruntime alone (tokenizers for text). This file imports neither torch
nor compot_deploy: `build` copies it into every package as loader.py, and compot-deploy itself uses its decoder
loop and pooling, so the package and the tool run the same code.

    from loader import Model
    m = Model()                       # this folder; Model(providers=["CUDAExecutionProvider"]) on a GPU
    m.embed(["a sentence"])           # encoders: mean-pooled sentence embeddings, (n, hidden)
    m.generate("Once upon", 8)        # decoders: the greedy continuation through the KV cache, as text
                                      # encoder-decoders (T5, BART): the greedy output for the input text
    m.image_features(["cat.png"])     # image models (ViT): last_hidden_state (n, tokens, hidden); needs pillow

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

    def step(self, ids, attention_mask, position_ids, past: dict | None):
        """One call (past None: an empty cache). Returns (logits (B, L, V), next past dict)."""
        past = self.empty_past(ids.shape[0]) if past is None else past
        outs = self.sess.run(None, {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids,
                                    **past})
        present = dict(zip(self.outputs[1:], outs[1:]))
        return outs[0], {p.name: present[p.name.replace("past_key_values", "present")] for p in self.past}

    def greedy(self, ids, steps: int):
        return greedy(self.step, ids, steps)


class OrtSeq2Seq:
    """An encoder-decoder's two exported graphs (Optimum's names): encode once, then decoder calls through the
    self-attention past/present tensors."""

    def __init__(self, encoder, decoder, start_token: int):
        self.encoder, self.decoder, self.start = encoder, decoder, int(start_token)
        self.past = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in (self.past[0].type if self.past else "") else np.float32
        self.outputs = [o.name for o in decoder.get_outputs()]

    def encode(self, ids, attention_mask):
        """ids, attention_mask: (B, S) int64 → last_hidden_state (B, S, H)."""
        return self.encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": attention_mask})[0]

    def stepper(self, hidden, attention_mask):
        """A step for greedy() over the encoder's output; greedy's decoder mask and positions are not inputs
        here (the decoder counts positions from its past)."""
        def step(ids, _mask, _positions, past):
            past = past or {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), self.dtype)
                            for i in self.past}
            outs = self.decoder.run(None, {"input_ids": ids, "encoder_attention_mask": attention_mask,
                                           "encoder_hidden_states": hidden, **past})
            present = dict(zip(self.outputs[1:], outs[1:], strict=True))
            return outs[0], {p.name: present[p.name.replace("past_key_values", "present")] for p in self.past}

        return step

    def greedy(self, ids, attention_mask, steps: int):
        """Greedy decoding for the inputs ids, attention_mask (B, S): the decoder starts from its start token.
        Returns (tokens (B, steps + 1), every call's logits, the encoder's last_hidden_state)."""
        hidden = self.encode(ids, attention_mask)
        start = np.full((ids.shape[0], 1), self.start, np.int64)
        tokens, logits = greedy(self.stepper(hidden, attention_mask), start, steps)
        return tokens, logits, hidden


def open_session(model, providers=("CPUExecutionProvider",)):
    """An InferenceSession on `model` (a path, or a serialized ModelProto as bytes) that logs errors only (ORT's
    warnings come with terminal colour codes)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=list(providers))


def start_token(folder) -> int:
    """The token an encoder-decoder's decoder starts from (config.json's decoder_start_token_id, else its pad)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    start = cfg.get("decoder_start_token_id")
    return cfg.get("pad_token_id") or 0 if start is None else start


def seq2seq(folder, providers=("CPUExecutionProvider",)):
    """OrtSeq2Seq over an export or package folder with encoder_model.onnx and decoder_model.onnx."""
    folder = Path(folder)
    return OrtSeq2Seq(open_session(folder / "encoder_model.onnx", providers),
                      open_session(folder / "decoder_model.onnx", providers), start_token(folder))


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


class Model:
    """A package folder: model.onnx (or encoder_model.onnx + decoder_model.onnx), config.json, and tokenizer.json
    (text) or preprocessor_config.json (images)."""

    def __init__(self, folder=HERE, providers=("CPUExecutionProvider",)):
        folder = Path(folder)
        self.seq2seq = seq2seq(folder, providers) if (folder / "encoder_model.onnx").is_file() else None
        self.session = self.seq2seq.encoder if self.seq2seq else open_session(folder / "model.onnx", providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        if "pixel_values" in self.inputs:
            self.processor = json.loads((folder / "preprocessor_config.json").read_text())
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

    def generate(self, text, max_new_tokens=16):
        """The greedy continuation of `text`, decoded to a string (decoders)."""
        return self.tokenizer.decode(self.generate_ids(text, max_new_tokens), skip_special_tokens=True)

    def generate_ids(self, text, max_new_tokens=16):
        """Token ids of the greedy continuation of `text` (an encoder-decoder: of its output for `text`), through
        the KV cache; the prompt gets the tokenizer's special tokens (e.g. Gemma's <bos>)."""
        self.tokenizer.no_truncation()
        ids = np.array([self.tokenizer.encode(text).ids], np.int64)
        if self.seq2seq:
            tokens, _, _ = self.seq2seq.greedy(ids, np.ones_like(ids), max_new_tokens - 1)
        else:
            tokens, _ = OrtDecoder(self.session).greedy(ids, max_new_tokens - 1)
        return tokens[0].tolist()


def replay(folder: str | Path, tol: float = 1e-3) -> dict:
    """Run the sample the gate stored (inputs and PyTorch's outputs) through model.onnx on the CPU EP."""
    folder = Path(folder)
    sample = dict(np.load(folder / SAMPLE))
    if "encoder_hidden" in sample:
        tokens, logits, hidden = seq2seq(folder).greedy(sample["input_ids"], sample["attention_mask"],
                                                         int(sample["decode_steps"]))
        real = sample["attention_mask"].astype(bool)
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
