"""The parity gate: the compressed PyTorch model and the exported ONNX Runtime session on the same inputs.

Encoders: several batch × sequence shapes of held-out text (padded rows included) → last_hidden_state, compared
at the real (unpadded) positions.
Decoders: prompts of several shapes, prefill then greedy decode steps through the KV cache on both sides; the
tokens must match and every call's logits are compared.
Image encoders: batches of generated images (calibrate.data.gate_images: there is no held-out image set) through
the model's own image processor → last_hidden_state at every position.
Encoder-decoders: held-out inputs of the decoder prompts' shapes (padded rows included) through both graphs,
greedy generation from the decoder's start token; the tokens must match, the encoder's output (real positions) and
every decoder call's logits are compared. The gate fails closed: any threshold missed, or any
error while checking, leaves the export marked invalid.

Also reported, not gated: the task-level change against the original (uncompressed) model on held-out text —
embedding cosine for encoders, next-token agreement and perplexity for decoders.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GateFailed  # noqa: F401 - raised here, re-exported for callers

from ..runtimes.loader import SAMPLE  # the sample runtimes/loader.py replays

VALIDATION = "validation.json"


# ------------------------------------------------------------------------------------------------ pure numbers


def parity_stats(pairs) -> dict:
    """pairs: [(reference, candidate)] arrays of equal shape → error statistics over all elements together."""
    import numpy as np

    ref = np.concatenate([np.asarray(r, np.float64).ravel() for r, _ in pairs])
    out = np.concatenate([np.asarray(o, np.float64).ravel() for _, o in pairs])
    d = np.abs(ref - out)
    cos = float(ref @ out / max(np.linalg.norm(ref) * np.linalg.norm(out), 1e-300))
    return {"elements": int(d.size), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "over_1e-2": int((d > 1e-2).sum()), "over_1e-3": int((d > 1e-3).sum()), "cosine": cos,
            "nonfinite": int((~np.isfinite(out)).sum())}


def gate_failures(stats: dict, tokens: dict | None, cfg) -> list[str]:
    """Why the gate fails (empty list: it passes)."""
    fails = []
    if stats["nonfinite"]:
        fails.append(f"{stats['nonfinite']} non-finite outputs")
    if not stats["max_abs"] <= cfg.max_abs:
        fails.append(f"max abs error {stats['max_abs']:.3g} > {cfg.max_abs:g}")
    if not stats["cosine"] >= cfg.min_cosine:
        fails.append(f"cosine {stats['cosine']:.7f} < {cfg.min_cosine}")
    if tokens is not None and tokens["mismatches"] > cfg.max_token_mismatches:
        fails.append(f"{tokens['mismatches']} of {tokens['total']} greedy tokens differ from PyTorch's")
    return fails


def next_token_metrics(logits, ids) -> tuple[float, "np.ndarray"]:  # noqa: F821
    """logits: (L, V), ids: (L,) → (summed NLL of ids[1:], argmax predictions (L-1,))."""
    import numpy as np

    lg = np.asarray(logits[:-1], np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = float((lse - lg[np.arange(len(lg)), ids[1:]]).sum())
    return nll, lg.argmax(-1)


# --------------------------------------------------------------------------------------------------- the cases


def encoder_feeds(tokenizer, texts: list[str], shapes, input_names: list[str]) -> list[dict]:
    """One feed per (batch, seq) shape, cut from `texts`; short texts leave padded rows."""
    feeds, i = [], 0
    for b, L in shapes:
        chunk = [" ".join(texts[i : i + 20])] + [texts[(i + j) % len(texts)] for j in range(1, b)]
        i += b
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=L, return_tensors="np")
        feeds.append({n: enc[n].astype("int64") if n in enc else _zeros_like(enc["input_ids"]) for n in input_names})
    return feeds


def _zeros_like(a):
    import numpy as np

    return np.zeros_like(a, dtype=np.int64)


def decoder_prompts(tokenizer, texts: list[str], prompts) -> list:
    """One (B, L) int64 prompt per shape, without padding (each row cut to L tokens of a long text)."""
    import numpy as np

    long = " ".join(texts)
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    out = []
    for b, L in prompts:
        rows = [ids[(r * 97) % max(1, len(ids) - L):][:L] for r in range(b)]
        out.append(np.asarray(rows, np.int64))
    return out


def gate_prompts(prompts, config) -> tuple:
    """The configured (batch, length) prompts, plus one 16 tokens longer than the sliding attention window when
    some blocks slide (Gemma 3: 512) and no prompt reaches past it: past the window the exported cache and mask
    differ most from PyTorch's sliding cache."""
    text = config.get_text_config()
    window, types = getattr(text, "sliding_window", None), getattr(text, "layer_types", None) or []
    if window and "sliding_attention" in types and all(L <= window for _, L in prompts):
        return (*prompts, (1, window + 16))
    return tuple(prompts)


def torch_encoder(model, feed: dict):
    import torch

    with torch.no_grad():
        kw = {k: torch.from_numpy(v) for k, v in feed.items()}
        return getattr(model, "base_model", model)(**kw).last_hidden_state.numpy()


def image_feeds(processor, batches, seed: int = 0) -> list[dict]:
    """One {pixel_values} feed per batch size, of generated images (batch i drawn with seed + i) through the model's
    image processor."""
    import numpy as np

    from ..calibrate.data import gate_images

    return [{"pixel_values": np.asarray(processor(images=gate_images(b, seed=seed + i),
                                                  return_tensors="np")["pixel_values"], np.float32)}
            for i, b in enumerate(batches)]


def torch_greedy(model, ids, steps: int):
    """PyTorch's prefill + `steps` greedy decode calls, the same loop as ORT's (runtimes.loader.greedy)."""
    from ..runtimes import torch_step
    from ..runtimes.loader import greedy

    return greedy(torch_step(model), ids, steps)


def seq2seq_feeds(model, processor, texts: list[str], shapes, seed: int = 0) -> list[dict]:
    """Encoder inputs for an encoder-decoder's gate, one per (batch, length) of `shapes`: held-out text
    (input_ids, attention_mask; short rows padded), or for a speech model (Whisper) `batch` generated clips
    through its feature extractor (input_features)."""
    from ..models import AUDIO, main_input

    if main_input(model.config) != AUDIO:
        return encoder_feeds(processor, texts, shapes, ["input_ids", "attention_mask"])
    from ..calibrate.data import audio_features, feature_extractor, gate_audio

    rate = feature_extractor(processor).sampling_rate
    return [audio_features(processor, gate_audio(b, rate, seed=seed + i), numpy=True) for i, (b, _) in enumerate(shapes)]


def seq2seq_parity(model, s2s, tokenizer, cfg, texts: list[str]) -> tuple[list, list, dict, dict]:
    """Greedy generation of the encoder-decoder `model` and of its export `s2s` (OrtSeq2Seq) on held-out inputs.
    Returns (cases, (reference, export) pairs, token counts, the first case for the replay sample)."""
    import numpy as np

    from ..runtimes import torch_seq2seq

    cases, pairs, sample, mism, total = [], [], {}, 0, 0
    for feed in seq2seq_feeds(model, tokenizer, texts, cfg.decoder_prompts):
        t_ref, l_ref, h_ref = torch_seq2seq(model, feed, cfg.decode_steps)
        t_out, l_out, h_out = s2s.greedy(feed, cfg.decode_steps)
        real = feed["attention_mask"].astype(bool) if "attention_mask" in feed else np.ones(h_ref.shape[:2], bool)
        sample = sample or {**feed, "decode_steps": cfg.decode_steps, "tokens": t_ref, "first_logits": l_ref[0],
                            "encoder_hidden": h_ref}
        case = [(h_ref[real], h_out[real])] + list(zip(l_ref, l_out, strict=True))
        pairs += case
        m = int((t_ref != t_out).sum())
        mism, total = mism + m, total + t_ref.size
        cases.append({"prompt": list(next(iter(feed.values())).shape), "decode_steps": cfg.decode_steps,
                      "token_mismatches": m,
                      "tokens_pytorch": t_ref.tolist(), "tokens_ort": t_out.tolist(), **parity_stats(case)})
    return cases, pairs, {"mismatches": mism, "total": total}, sample


def check_parity(model, sess, tokenizer, kind: str, cfg, texts: list[str]) -> tuple[dict, dict]:
    """Run both sides on every case (`sess`: the session, or an encoder-decoder's OrtSeq2Seq). Returns
    (per-case and overall statistics, and tokens for decoders; the first case's inputs and PyTorch outputs, for
    runtimes/loader.py to replay)."""
    from ..runtimes.ort import OrtDecoder

    cases, pairs, tokens, sample = [], [], None, {}
    if kind == "seq2seq":
        cases, pairs, tokens, sample = seq2seq_parity(model, sess, tokenizer, cfg, texts)
    elif kind == "image":
        for feed in image_feeds(tokenizer, sorted({b for b, _ in cfg.encoder_shapes})):
            ref = torch_encoder(model, feed)
            (out,) = sess.run(["last_hidden_state"], feed)
            sample = sample or {**feed, "last_hidden_state": ref}
            pairs.append((ref, out))
            cases.append({"shape": list(feed["pixel_values"].shape), **parity_stats([(ref, out)])})
    elif kind == "encoder":
        names = [i.name for i in sess.get_inputs()]
        for feed in encoder_feeds(tokenizer, texts, cfg.encoder_shapes, names):
            real = feed["attention_mask"].astype(bool)  # padded positions' outputs are never read downstream
            full = torch_encoder(model, feed)
            sample = sample or {**feed, "last_hidden_state": full}
            ref = full[real]
            (out,) = sess.run(["last_hidden_state"], feed)
            out = out[real]
            pairs.append((ref, out))
            cases.append({"shape": list(feed["input_ids"].shape), **parity_stats([(ref, out)])})
    else:
        dec = OrtDecoder(sess)
        mism = total = 0
        for ids in decoder_prompts(tokenizer, texts, gate_prompts(cfg.decoder_prompts, model.config)):
            t_ref, l_ref = torch_greedy(model, ids, cfg.decode_steps)
            t_out, l_out = dec.greedy(ids, cfg.decode_steps)
            sample = sample or {"prompt": ids, "decode_steps": cfg.decode_steps, "tokens": t_ref,
                                "prefill_logits": l_ref[0]}
            pairs += list(zip(l_ref, l_out))
            m = int((t_ref != t_out).sum())
            mism, total = mism + m, total + t_ref.size
            cases.append({"prompt": list(ids.shape), "decode_steps": cfg.decode_steps, "token_mismatches": m,
                          "tokens_pytorch": t_ref.tolist(), "tokens_ort": t_out.tolist(),
                          **parity_stats(list(zip(l_ref, l_out)))})
        tokens = {"mismatches": mism, "total": total}
    return {"cases": cases, "overall": parity_stats(pairs), "tokens": tokens}, sample


def task_level(reference, sess, tokenizer, kind: str, texts: list[str]) -> dict:
    """The exported (compressed) model against the original PyTorch model on held-out text."""
    import numpy as np
    import torch

    from ..evaluate import embedding_agreement
    from ..runtimes.loader import mean_pool

    if kind == "encoder":
        names = [i.name for i in sess.get_inputs()]
        emb_ref, emb_out = [], []
        for i in range(0, len(texts), 16):
            enc = tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
            feed = {n: enc[n].astype(np.int64) if n in enc else _zeros_like(enc["input_ids"]) for n in names}
            (h,) = sess.run(["last_hidden_state"], feed)
            emb_out.append(mean_pool(h, feed["attention_mask"]))
            emb_ref.append(mean_pool(torch_encoder(reference, feed), feed["attention_mask"]))
        res = embedding_agreement(torch.from_numpy(np.concatenate(emb_ref)), torch.from_numpy(np.concatenate(emb_out)))
        return {"metric": "mean-pooled embedding vs original", "texts": len(texts), **res}
    if kind == "seq2seq":
        return seq2seq_task_level(reference, sess, tokenizer, texts)
    if kind == "image":
        ref, out = [], []
        for feed in image_feeds(tokenizer, [8] * max(1, len(texts) // 8), seed=1000):  # as many images as texts
            (h,) = sess.run(["last_hidden_state"], feed)
            ones = np.ones(h.shape[:2])
            out.append(mean_pool(h, ones))
            ref.append(mean_pool(torch_encoder(reference, feed), ones))
        res = embedding_agreement(torch.from_numpy(np.concatenate(ref)), torch.from_numpy(np.concatenate(out)))
        return {"metric": "mean-pooled image features vs original (generated images)", "images": len(out) * 8,
                **res}
    from ..runtimes.ort import OrtDecoder

    dec = OrtDecoder(sess)
    nll_out = nll_ref = agree = n = 0
    for text in texts:
        ids = np.asarray([tokenizer(text)["input_ids"][:128]], np.int64)  # with <bos> where the model expects it
        if ids.shape[1] < 2:
            continue
        L = ids.shape[1]
        lo, _ = dec.step(ids, np.ones_like(ids), np.arange(L, dtype=np.int64)[None], None)
        with torch.no_grad():
            lr = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
        a, pa = next_token_metrics(lo[0], ids[0])
        b, pb = next_token_metrics(lr[0], ids[0])
        nll_out, nll_ref, agree, n = nll_out + a, nll_ref + b, agree + int((pa == pb).sum()), n + L - 1
    return {"metric": "teacher-forced next token vs original", "texts": len(texts), "tokens": n,
            "next_token_agreement": agree / max(n, 1), "perplexity": float(np.exp(nll_out / max(n, 1))),
            "perplexity_original": float(np.exp(nll_ref / max(n, 1)))}


def seq2seq_task_level(reference, s2s, processor, texts: list[str]) -> dict:
    """The export `s2s` against the original PyTorch encoder-decoder, teacher-forced: text models reconstruct each
    held-out text (the calibration's task: the text in, the same text as the decoder's target); speech models
    (generated clips, one per text) score the original's own greedy transcription."""
    import numpy as np
    import torch

    from ..models import AUDIO, main_input
    from ..runtimes import torch_seq2seq
    from ..runtimes.loader import start_token

    speech = main_input(reference.config) == AUDIO
    feeds = seq2seq_feeds(reference, processor, texts, [(1, 0)] * len(texts), seed=1000) if speech else [
        {"input_ids": (ids := np.asarray([processor(t, truncation=True, max_length=128)["input_ids"]], np.int64)),
         "attention_mask": np.ones_like(ids)} for t in texts]
    nll_out = nll_ref = agree = n = 0
    for feed in feeds:
        if speech:  # the original's transcription, from after its start token
            labels = torch_seq2seq(reference, feed, 31)[0]
        else:
            labels = feed["input_ids"]
        start = np.full((1, 1), start_token(reference.config.to_dict()), np.int64)
        dec_in = np.concatenate([start, labels[:, :-1]], 1)  # the labels shifted right
        lo, _ = s2s.stepper(s2s.encode(feed), feed.get("attention_mask"))(dec_in, None, None, None)
        with torch.no_grad():
            lr = reference(**{k: torch.from_numpy(v) for k, v in feed.items()},
                           decoder_input_ids=torch.from_numpy(dec_in)).logits.numpy()
        target = np.concatenate([dec_in[0, :1], labels[0]])  # next_token_metrics scores ids[1:] from logits[:-1]
        pad = np.zeros((1, lo.shape[-1]))
        a, pa = next_token_metrics(np.concatenate([lo[0], pad]), target)
        b, pb = next_token_metrics(np.concatenate([lr[0], pad]), target)
        nll_out, nll_ref, agree, n = nll_out + a, nll_ref + b, agree + int((pa == pb).sum()), n + labels.shape[1]
    metric = ("teacher-forced original's transcription of generated clips" if speech else
              "teacher-forced reconstruction of the text") + " vs original"
    return {"metric": metric, "texts": len(texts), "tokens": n,
            "next_token_agreement": agree / max(n, 1), "perplexity": float(np.exp(nll_out / max(n, 1))),
            "perplexity_original": float(np.exp(nll_ref / max(n, 1)))}


# ------------------------------------------------------------------------------------------------ orchestration


def validate_export(export_dir: str | Path, cfg, source: str | Path | None = None,
                    reference: str | Path | None = None, texts: list[str] | None = None,
                    out: str | Path | None = None) -> dict:
    """Check `export_dir` (written by `export`) against its PyTorch model. Writes only its own report: validation.json
    and .md (passed or failed) and the parity sample, into `out` (default: the export folder). Raises GateFailed
    when a threshold is missed."""
    from ..storage.artifact import load as load_compressed
    from ..storage.artifact import write_json_atomic
    from ..calibrate.data import heldout_texts
    from ..models import load_model, load_tokenizer, read_hf_config
    from ..runtimes.ort import export_session
    from .onnx_export import read_manifest

    export_dir = Path(export_dir)
    out = Path(out or export_dir)
    manifest = read_manifest(export_dir)
    source = Path(source or manifest["source"])
    texts = texts or heldout_texts()
    section = read_hf_config(source).get("compot")
    model = load_compressed(source) if section else load_model(source)[0]
    tokenizer = load_tokenizer(export_dir)
    kind = manifest["graph"]["kind"]
    sess = export_session(export_dir, cfg.device)
    providers = (sess.decoder if kind == "seq2seq" else sess).get_providers()
    report = {"export_dir": str(export_dir), "source": str(source), "device": cfg.device,
              "providers": providers, "thresholds": cfg.model_dump(mode="json")}
    try:
        report["parity"], sample = check_parity(model, sess, tokenizer, kind, cfg, texts)
        fails = gate_failures(report["parity"]["overall"], report["parity"]["tokens"], cfg)
        _save_npz(out / SAMPLE, sample)
    except Exception as e:  # noqa: BLE001 - fail closed on anything that stops the check
        report["parity"] = {"error": f"{type(e).__name__}: {e}"}
        fails = [f"parity check raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    report["passed"], report["failures"] = not fails, fails
    ref_dir = reference or (section or {}).get("source_model")
    if cfg.eval_texts and ref_dir and Path(ref_dir).is_dir() and section:
        report["task"] = task_level(load_model(ref_dir)[0], sess, tokenizer, kind, texts[: cfg.eval_texts])
        report["task"]["reference"] = str(ref_dir)
    elif cfg.eval_texts:
        report["task"] = {"skipped": "no original model to compare with" if section else "the source is the original"}
    write_json_atomic(out / VALIDATION, report)
    (out / "validation.md").write_text(markdown(report))
    if fails:
        raise GateFailed(f"validation failed for {export_dir}: " + "; ".join(fails))
    return report


def _save_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def markdown(report: dict) -> str:
    par = report.get("parity", {})
    lines = [f"# Validation of `{report['export_dir']}`", "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}** on {report['device']} "
             f"({', '.join(report['providers'])}); source `{report['source']}`.", ""]
    if report["failures"]:
        lines += [f"- {f}" for f in report["failures"]] + [""]
    if "cases" in par:
        lines += ["| case | max abs | mean abs | >1e-2 | >1e-3 | cosine | tokens differing |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in par["cases"] + [{"overall": True, **par["overall"]}]:
            name = ("overall" if c.get("overall") else
                    f"batch×seq {c['shape']}" if "shape" in c else f"prompt {c['prompt']} + {c['decode_steps']} steps")
            tok = c.get("token_mismatches", "")
            lines.append(f"| {name} | {c['max_abs']:.2e} | {c['mean_abs']:.2e} | {c['over_1e-2']} | {c['over_1e-3']} "
                         f"| {c['cosine']:.8f} | {tok} |")
        lines.append("")
    task = report.get("task")
    if task:
        lines += ["## Against the original model", "", "```", json.dumps(task, indent=2), "```", ""]
    return "\n".join(lines)
