"""Which Hugging Face architectures go through `compot-deploy build`: one tiny random model per family (real
transformers configs and classes, MiniLM's tokenizer; their quality means nothing), each built with
`build --ratio 0.3 --no-bench` in its own process. The build's log says how far each stage got; where build refuses
a family before any work, `compress` alone says whether it compresses. Image models calibrate on 16 random images,
Whisper on 8 one-second clips (its processor's window set to one second).

    python benchmarks/architectures.py [--only NAME,...] [--out benchmarks/results]

Writes architectures.json and architectures.md: one row per family with compress / export / gate / package
(`ok`, `failed`, `refused` (one error line before any work), or `-` when not reached) and the one error line the CLI printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
STAGES = ("compress", "export", "validate", "package")


def families(V: int) -> dict:
    """name → (model class name, config class name, config kwargs): 2 blocks, hidden 64."""
    dec = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    enc = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, pad_token_id=0)
    s2s = dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=160, decoder_ffn_dim=160, pad_token_id=0,
               bos_token_id=101, eos_token_id=102, decoder_start_token_id=101)
    t5 = dict(vocab_size=V, d_model=64, d_kv=16, d_ff=160, num_layers=2, num_heads=4, pad_token_id=0,
              decoder_start_token_id=0)
    return {
        "llama": ("LlamaForCausalLM", "LlamaConfig", dec),
        "phi3 (fused qkv, gate_up)": ("Phi3ForCausalLM", "Phi3Config", dec),
        "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {**dec, "num_key_value_heads": None}),
        "mistral": ("MistralForCausalLM", "MistralConfig", dec),
        "gemma": ("GemmaForCausalLM", "GemmaConfig", {**dec, "head_dim": 16}),
        "gemma2 (window 16)": ("Gemma2ForCausalLM", "Gemma2Config", {**dec, "head_dim": 16, "sliding_window": 16}),
        "gemma3 (window 16)": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**dec, "head_dim": 16,
                                                                          "sliding_window": 16}),
        "distilbert": ("DistilBertModel", "DistilBertConfig", dict(vocab_size=V, dim=64, hidden_dim=160, n_layers=2,
                                                                   n_heads=4, pad_token_id=0)),
        "roberta": ("RobertaModel", "RobertaConfig", {**enc, "max_position_embeddings": 258, "pad_token_id": 1}),
        "modernbert": ("ModernBertModel", "ModernBertConfig", {**enc, "pad_token_id": 0}),
        "t5-encoder": ("T5EncoderModel", "T5Config", t5),
        "t5": ("T5ForConditionalGeneration", "T5Config", t5),
        "bart": ("BartForConditionalGeneration", "BartConfig", {**s2s, "max_position_embeddings": 256}),
        "whisper": ("WhisperForConditionalGeneration", "WhisperConfig", {**s2s, "num_mel_bins": 80,
                                                                         "max_source_positions": 50,  # 1 s window
                                                                         "max_target_positions": 64}),
        "vit": ("ViTModel", "ViTConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8)),
    }


def make(name: str, spec, tok, folder: Path) -> None:
    import torch
    import transformers as tf

    model_cls, cfg_cls, kw = spec
    torch.manual_seed(0)
    kw = {k: v for k, v in kw.items() if v is not None}
    model = getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw))
    model.save_pretrained(folder)
    if model.main_input_name == "pixel_values":  # an image model: its processor, and images to calibrate on
        import numpy as np
        from PIL import Image

        size = model.config.image_size
        tf.ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
        (folder / "images").mkdir()
        rng = np.random.default_rng(0)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    elif model.main_input_name == "input_features":  # a speech model: its feature extractor, and audio clips
        import numpy as np
        import soundfile

        tf.WhisperFeatureExtractor(feature_size=model.config.num_mel_bins, chunk_length=1).save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "audio").mkdir()
        rng = np.random.default_rng(0)
        for i in range(8):
            t = np.arange(16000) / 16000
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * t) + rng.normal(0, 0.05, t.size)
            soundfile.write(folder / "audio" / f"{i}.wav", x.astype(np.float32), 16000)
    else:
        tok.save_pretrained(folder)


def build(folder: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    media = [folder / m for m in ("images", "audio") if (folder / m).is_dir()]
    calib = ["--calib", str(media[0])] if media else []
    res = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "build", str(folder), "-o", str(out), "-q",
                          "--no-bench", "--samples", "8", "--seq-len", "48", *calib], capture_output=True, text=True)
    status = dict.fromkeys(STAGES, "-")
    log = out / "build.log.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        e = json.loads(line)
        if e.get("stage") in status and e["status"] in ("done", "failed"):
            status[e["stage"]] = "ok" if e["status"] == "done" else "failed"
    if res.returncode and "failed" not in status.values():  # refused before a stage started
        status[next(s for s in STAGES if status[s] == "-")] = "refused" if res.returncode == 2 else "failed"
    if status["compress"] == "refused":  # a family build refuses (export) may still compress on its own
        alone = subprocess.run([sys.executable, "-m", "compot_deploy.cli", "compress", str(folder), "-o",
                                str(out.with_name(out.name + "-compress")), "-q", "--samples", "8", "--seq-len", "48",
                                *calib],
                               capture_output=True, text=True)
        if alone.returncode == 0:
            status.update(compress="ok", export="refused")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return {**status, "exit": res.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "one_line_error": len(lines) == 1 and lines[0].startswith("error: ") if res.returncode else None,
            "message": (lines[-1] if lines else "")[:300]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated family names (default: all)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import transformers as tf

    from compot_deploy.models import default_model_dir, quiet_transformers

    quiet_transformers()

    tok = tf.AutoTokenizer.from_pretrained(default_model_dir())
    fams = families(len(tok))
    names = [n for n in fams if not args.only or n.split(" ")[0] in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name.split(" ")[0]
            try:
                make(name, fams[name], tok, folder)
            except Exception as e:  # noqa: BLE001 - a config transformers itself refuses is a row too
                rows.append({"family": name, **dict.fromkeys(STAGES, "-"), "exit": None,
                             "message": f"transformers: {e}"[:300]})
                continue
            row = {"family": name, **build(folder, Path(tmp) / f"{folder.name}-build")}
            rows.append(row)
            print(f"{name:28s} " + " ".join(f"{row[s]:7s}" for s in STAGES) + f" exit {row['exit']}  "
                  f"{row['message'][:100]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "architectures.json").write_text(json.dumps({"transformers": tf.__version__, "rows": rows}, indent=2) + "\n")
    md = ["# Architectures through `build --ratio 0.3 --no-bench` (tiny random models)", "",
          f"transformers {tf.__version__}. `refused`: one `error:` line, exit 2, before any work (compress: `compress` "
          "alone ran where build refused). `-`: not reached.", "",
          "| family | compress | export | gate | package | exit | message |", "|---|---|---|---|---|---:|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|") if r["exit"] else ""
        md.append(f"| {r['family']} | {r['compress']} | {r['export']} | {r['validate']} | {r['package']} | "
                  f"{r['exit']} | {msg} |")
    (out / "architectures.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
