"""Run an exported model with nothing but numpy and onnxruntime — this file imports neither torch nor
compot_deploy, so it can be copied next to a model and run on a bare device:

    python standalone.py EXPORT_DIR        # replays parity_sample.npz (written by the gate), exit 1 on mismatch

OrtDecoder drives a decoder's past/present tensors (Optimum's names) for prefill and greedy decoding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

SAMPLE = "parity_sample.npz"


class OrtDecoder:
    """Prefill and greedy decode through an exported decoder's past/present tensors (Optimum's names)."""

    def __init__(self, sess):
        self.sess = sess
        self.past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in (self.past[0].type if self.past else "") else np.float32

    def empty_past(self, batch: int) -> dict:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), self.dtype) for i in self.past}

    def step(self, ids, attention_mask, position_ids, past: dict):
        """One call: returns (logits (B, L, V), next past dict)."""
        outs = self.sess.run(None, {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids,
                                    **past})
        names = [o.name for o in self.sess.get_outputs()]
        present = dict(zip(names[1:], outs[1:]))
        return outs[0], {p.name: present[p.name.replace("past_key_values", "present")] for p in self.past}

    def greedy(self, ids, steps: int):
        """ids: (B, L) int64 prompt without padding; prefill, then `steps` decode calls through the cache.
        Returns (tokens (B, steps + 1), logits of every call [(B, L, V), (B, 1, V) × steps])."""
        B, L = ids.shape
        pos = np.arange(L, dtype=np.int64)[None].repeat(B, 0)
        logits, past = self.step(ids, np.ones((B, L), np.int64), pos, self.empty_past(B))
        all_logits, tokens = [logits], [logits[:, -1].argmax(-1)]
        for t in range(steps):
            n = L + t + 1
            logits, past = self.step(tokens[-1][:, None].astype(np.int64), np.ones((B, n), np.int64),
                                     np.full((B, 1), n - 1, np.int64), past)
            all_logits.append(logits)
            tokens.append(logits[:, -1].argmax(-1))
        return np.stack(tokens, 1), all_logits



def replay(folder: str | Path, tol: float = 1e-3) -> dict:
    """Run the sample the gate stored (inputs and PyTorch's outputs) through model.onnx on the CPU EP."""
    folder = Path(folder)
    sample = dict(np.load(folder / SAMPLE))
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
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
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    if not (Path(argv[0]) / SAMPLE).is_file():
        print(f"error: {argv[0]} has no {SAMPLE} (run `compot-deploy validate` on it first)", file=sys.stderr)
        return 2
    res = {"onnxruntime": ort.__version__, "numpy": np.__version__, **replay(argv[0])}
    print(json.dumps(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
