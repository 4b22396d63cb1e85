"""Run an exported model with numpy and onnxruntime alone (tokenizers for text). This file imports neither torch
nor compot_deploy: `build` copies it into every package as loader.py, and compot-deploy itself uses its decoder
loop and pooling, so the package and the tool run the same code.

    from loader import Model
    m = Model()                       # this folder; Model(providers=["CUDAExecutionProvider"]) on a GPU
    m.embed(["a sentence"])           # encoders: mean-pooled sentence embeddings, (n, hidden)
    m.generate("Once upon", 8)        # decoders: the greedy continuation through the KV cache, as text

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


def open_session(model, providers=("CPUExecutionProvider",)):
    """An InferenceSession on `model` (a path, or a serialized ModelProto as bytes) that logs errors only (ORT's
    warnings come with terminal colour codes)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=list(providers))


class Model:
    """A package folder: model.onnx, tokenizer.json and config.json."""

    def __init__(self, folder=HERE, providers=("CPUExecutionProvider",)):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.session = open_session(folder / "model.onnx", providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
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

    def generate(self, text, max_new_tokens=16):
        """The greedy continuation of `text`, decoded to a string (decoders)."""
        return self.tokenizer.decode(self.generate_ids(text, max_new_tokens), skip_special_tokens=True)

    def generate_ids(self, text, max_new_tokens=16):
        """Token ids of the greedy continuation of `text`, through the KV cache; the prompt gets the tokenizer's
        special tokens (e.g. Gemma's <bos>)."""
        self.tokenizer.no_truncation()
        ids = np.array([self.tokenizer.encode(text).ids], np.int64)
        tokens, _ = OrtDecoder(self.session).greedy(ids, max_new_tokens - 1)
        return tokens[0].tolist()


def replay(folder: str | Path, tol: float = 1e-3) -> dict:
    """Run the sample the gate stored (inputs and PyTorch's outputs) through model.onnx on the CPU EP."""
    folder = Path(folder)
    sample = dict(np.load(folder / SAMPLE))
    sess = open_session(folder / "model.onnx")
    if "prompt" in sample:
        tokens, logits = OrtDecoder(sess).greedy(sample["prompt"], int(sample["decode_steps"]))
        err = float(np.abs(logits[0] - sample["prefill_logits"]).max())
        ok = bool((tokens == sample["tokens"]).all()) and err <= tol
        return {"kind": "decoder", "tokens_match": bool((tokens == sample["tokens"]).all()), "prefill_max_abs": err,
                "passed": ok}
    feed = {i.name: sample[i.name] for i in sess.get_inputs()}
    (out,) = sess.run(["last_hidden_state"], feed)
    real = sample["attention_mask"].astype(bool)
    err = float(np.abs(out[real] - sample["last_hidden_state"][real]).max())
    return {"kind": "encoder", "max_abs": err, "passed": err <= tol}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="loader.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", nargs="?", default=str(HERE),
                    help=f"a folder with model.onnx and {SAMPLE}; replays the sample and prints the parity as "
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
