"""Shared fixtures: the real MiniLM and tiny random decoders/encoders built from real transformers configs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


PROGRESS_LINE = re.compile(r"^[^|]*: +\d+%\|.*\]$")  # what progress.bar writes when stderr is not a terminal


def message_lines(stderr: str) -> list[str]:
    """The non-blank lines of a command's stderr that are not progress lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from compot_deploy.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def heldout_texts() -> list[str]:
    from compot_deploy.calibrate.data import heldout_texts as texts

    return texts()


TINY_KINDS = ("llama", "qwen3", "gpt2", "bert", "gemma2")


def build_tiny(kind: str, path: Path, minilm: Path, layers: int = 2) -> Path:
    """A `layers`-block random model of `kind` (TINY_KINDS, "t5-encoder", "t5" or "bart") with MiniLM's tokenizer, saved like any HF
    checkpoint."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm)
    V = len(tok)
    common = dict(vocab_size=V, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_key_value_heads=2,
                                                   pad_token_id=0, **common))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(hidden_size=64, intermediate_size=160, num_key_value_heads=2,
                                                   head_dim=16, pad_token_id=0, **common))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                                                 pad_token_id=0))
    elif kind == "gemma2":  # a sliding window (16) shorter than the gate's prompts + decode steps
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(hidden_size=64, intermediate_size=160, num_key_value_heads=2,
                                                     head_dim=16, sliding_window=16, pad_token_id=0, **common))
    elif kind == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=160, **common))
    elif kind == "t5-encoder":  # reads `.weight` of its linears; threads block 0's position bias to the others
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=160, num_layers=layers, num_heads=4,
                                              decoder_start_token_id=0))
    elif kind == "t5":  # an encoder-decoder: relative position biases, cross-attention, `.weight` reads
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=160,
                                                          num_layers=layers, num_heads=4, decoder_start_token_id=0))
    elif kind == "bart":  # an encoder-decoder with learned positions and biases
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=V, d_model=64, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=160, decoder_ffn_dim=160, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=101))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: build_tiny(k, root / k, minilm_dir) for k in TINY_KINDS}
