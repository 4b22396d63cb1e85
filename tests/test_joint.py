"""The joint allocator: candidates with exact bytes, a knapsack within the byte target, the picks built and saved."""

import json

import pytest
from safetensors import safe_open

from compot_deploy.storage.budget import Budget
from compot_deploy.allocate import knapsack as alloc
from compot_deploy.config import AllocationConfig, CalibrationConfig, CompressConfig, JointConfig

from test_cli import assert_clean_failure, run

CALIB = ["--samples", "8", "--seq-len", "48", "--batch-size", "4"]


def test_refine_spends_the_bytes_rounding_left():
    # 3 layers whose "good" candidates sum to exactly the budget: ceil-rounded units cannot fit them all
    cands = [[alloc.Candidate(1001, 0.0), alloc.Candidate(500, 1.0)] for _ in range(3)]
    picks = alloc.mckp(cands, budget=3003, resolution=10)
    assert picks == [0, 0, 0]
    assert alloc.refine(cands, [1, 1, 1], 2501) == [0, 1, 1]  # 1001 + 500 + 500: a second upgrade would not fit


def test_joint_choices_fit_the_budget_and_are_saved(tiny_dirs, tmp_path):
    out = tmp_path / "j"
    res = run("compress", tiny_dirs["llama"], "--target-ratio", "0.2", *CALIB, "-o", out)
    assert res.returncode == 0, res.stderr
    assert "joint allocation within 0.2 of the linears' dense bytes kept (fits)" in res.stdout
    rep = json.loads((out / "compression_report.json").read_text())
    lin = rep["linears"]
    assert lin["file_bytes"] <= 0.2 * lin["dense_bytes"] and lin["planned_bytes"] == lin["file_bytes"]
    assert lin["file_bytes"] > 0.19 * lin["dense_bytes"]  # the budget is spent, not left on the table
    section = json.loads((out / "config.json").read_text())["compot"]
    assert section["config"]["allocation"]["strategy"] == "joint"
    layers = section["layers"]
    assert sum(rep["joint"]["choices"].values()) == len(layers) == lin["count"]
    # config.json holds the specs only; what was measured is in the report
    assert not any(k in e for e in layers.values() for k in ("rel_error", "seconds", "joint"))
    for lay in rep["layers"]:  # what the file holds is what the layer's entry says it chose
        e = layers[lay["name"]]
        assert "choice" in lay["joint"] and lay["joint"]["sensitivity"] > 0
        assert lay["file_bytes"] == lay["joint"]["bytes"] == e["bytes"], lay["name"]
        assert e["method"] == lay["joint"]["choice"].split()[0]
        assert ("quant" in e) == ("gptq" in lay["joint"]["choice"])


def test_joint_model_exports_through_the_gate(tiny_dirs, tmp_path):
    import compot_deploy
    from compot_deploy.config import ExportConfig, ValidateConfig
    from compot_deploy.exporters.onnx_export import export_dir
    from compot_deploy.exporters.validate import validate_export

    cfg = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=48, batch_size=4),
                         allocation=AllocationConfig(strategy="joint", budget=Budget(kept=0.15)))
    compot_deploy.compress(tiny_dirs["gpt2"], tmp_path / "j", cfg, progress=False)
    export_dir(tmp_path / "j", tmp_path / "onnx", ExportConfig())
    rep = validate_export(tmp_path / "onnx", ValidateConfig(eval_texts=4))
    assert rep["passed"] and rep["parity"]["overall"]["max_abs"] < 1e-4
    assert rep["parity"]["tokens"]["mismatches"] == 0


def test_method_compot_forces_compot_everywhere(tiny_dirs, tmp_path):
    out = tmp_path / "j"
    res = run("compress", tiny_dirs["bert"], "--target-ratio", "0.3", "--method", "compot", *CALIB, "-o", out)
    assert res.returncode == 0, res.stderr
    layers = json.loads((out / "config.json").read_text())["compot"]["layers"]
    assert {e["method"] for e in layers.values()} == {"compot"}


def test_target_bytes_bounds_the_weights_file(tiny_dirs, tmp_path):
    from compot_deploy.models import find_targets, load_model

    src = tiny_dirs["qwen3"]
    dense_file = (src / "model.safetensors").stat().st_size // 2  # float32 checkpoint → float16 size
    linears = sum(t.d_in * t.d_out * 2 for t in find_targets(load_model(src)[0]))
    target = dense_file - int(0.7 * linears)  # the linears keep ~30 % (less the header reserve)
    out = tmp_path / "j"
    res = run("compress", src, "--target-bytes", target, *CALIB, "-o", out)
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").stat().st_size <= target
    rep = json.loads((out / "compression_report.json").read_text())
    assert rep["joint"]["fits"] and 0.7 < rep["linears"]["file_ratio"] < 0.8
    with safe_open(out / "model.safetensors", "pt") as f:  # the embeddings are untouched, at float16
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"


@pytest.mark.parametrize("args,pattern", [
    (["--target-bytes", "1MB"], "below the"),
    (["--target-bytes", "12 parsecs"], "not a byte size"),
    (["--target-ratio", "0.001"], "below the smallest this candidate set reaches"),
    (["--target-ratio", "0.2", "--gptq-bits", "4"], "pick every layer's bits itself"),
    (["--target-ratio", "0.2", "--method", "cospadi"], "cospadi cannot take a byte target"),
    (["--target-ratio", "0.2", "--target-bytes", "9MB"], "give one budget"),
    (["--ratio", "0.3", "--target-ratio", "0.2"], "give one budget"),
    (["--gptq-group", "32"], "need --gptq-bits"),
])
def test_bad_targets_fail_cleanly(args, pattern, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    # 24 samples: enough tokens (4 per dimension) that no calibration warning precedes the error line
    res = run("compress", tiny_dirs["bert"], *args, "--samples", "24", *CALIB[2:], "-o", out)
    assert res.returncode == 2
    assert_clean_failure(res, out, pattern)


def test_joint_config_rejects_ratios_outside_the_unit_interval():
    with pytest.raises(ValueError):
        JointConfig(factor_ratios=(0.5, 1.0))


@pytest.mark.slow
def test_minilm_joint_beats_dense_gptq_where_it_cannot_fit(minilm_dir, heldout_texts, tmp_path):
    """At 0.2 × fp16 uniform 3-bit GPTQ g128 (0.2001 ×, cosine 0.920) does not fit; the allocator, from a reduced
    candidate set, must still beat it."""
    import compot_deploy
    from compot_deploy.evaluate import embedding_agreement, mean_pooled_embeddings
    from compot_deploy.models import load_model

    space = JointConfig(methods=("dense", "compot"), dense_quant=((2, 128), (3, 128), (4, 128)),
                        factor_ratios=(0.6, 0.8), factor_bits=(4,))
    cfg = CompressConfig(allocation=AllocationConfig(strategy="joint", budget=Budget(kept=0.2), joint=space))
    rep = compot_deploy.compress(minilm_dir, tmp_path / "j", cfg, progress=False)
    assert 0.795 < rep["linears"]["file_ratio"] and rep["joint"]["fits"]
    orig, tok = load_model(minilm_dir)
    q = embedding_agreement(mean_pooled_embeddings(orig, tok, heldout_texts),
                            mean_pooled_embeddings(compot_deploy.load(tmp_path / "j"), tok, heldout_texts))
    assert q["mean_cosine"] > 0.925, q


def test_joint_families_and_probe_batches_from_the_command_line(tiny_dirs, tmp_path):
    """--joint-methods dense --joint-probe-batches 1: every layer dense (float16 or GPTQ), both saved in the config;
    the options without a --target-*, beside --method, or naming no family: one error line before any work."""
    from click.testing import CliRunner

    from compot_deploy.cli import main

    runner = CliRunner()
    out = tmp_path / "d"
    res = runner.invoke(main, ["compress", str(tiny_dirs["llama"]), "--target-ratio", "0.3", "--joint-methods",
                               "dense", "--joint-probe-batches", "1", *CALIB, "-q", "-o", str(out)])
    assert res.exit_code == 0, res.output
    section = json.loads((out / "config.json").read_text())["compot"]
    joint = section["config"]["allocation"]["joint"]
    assert joint["methods"] == ["dense"] and joint["sensitivity_batches"] == 1
    assert {e["method"] for e in section["layers"].values()} == {"dense"}
    assert any("quant" in e for e in section["layers"].values())  # 0.3 kept: GPTQ, not float16
    bad = [(["--joint-methods", "dense"], "--joint-methods set the joint allocator"),
           (["--ratio", "0.3", "--joint-probe-batches", "2"], "--joint-probe-batches set the joint allocator"),
           (["--target-ratio", "0.3", "--joint-methods", "dense", "--method", "compot"], "not both"),
           (["--target-ratio", "0.3", "--joint-methods", "dense,lora"], "--joint-methods")]
    for argv, message in bad:
        res = runner.invoke(main, ["compress", str(tiny_dirs["llama"]), *argv, "-o", str(tmp_path / "x")])
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert message in lines[0], lines[0]
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradient_sensitivities_match_the_noise_probes(kind, tiny_dirs):
    """The first-order sensitivities (a few backward passes for every layer and the embedding table's lookups)
    agree with the noisy forward probes (one pass per layer) layer by layer, up to the probes' own noise; and the
    model is left as it was."""
    import numpy as np
    import torch

    from compot_deploy.allocate import joint
    from compot_deploy.calibrate.data import calibration_batches
    from compot_deploy.calibrate.runner import calibrate
    from compot_deploy.models import find_targets, load_model

    model, tok = load_model(tiny_dirs[kind])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    targets = find_targets(model)
    batches = calibration_batches(tok, CalibrationConfig(samples=8, seq_len=48, batch_size=4), model, False)
    grams = calibrate(model, batches, targets, progress=False)
    table = joint.TableStats.of(model, batches, 32)  # the embedding table's lookups: the last entry
    probe = np.mean([joint.sensitivities(model, targets, grams, batches, seed=s, progress=False, table=table)
                     for s in range(4)], 0)
    grad = np.array(joint.gradient_sensitivities(model, targets, grams, batches, probes=4, progress=False,
                                                 table=table))
    assert len(grad) == len(targets) + 1 and table.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    ratio = np.log(grad / probe)
    assert np.corrcoef(np.log(probe), np.log(grad))[0, 1] > 0.95
    assert abs(np.median(ratio)) < 0.15 and np.abs(ratio).max() < 0.6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_the_embedding_table_is_a_joint_candidate(tiny_dirs, tmp_path):
    """--embedding-bits joint: the allocator stores the table dense, 8- or 4-bit with the linears, within the whole
    file's bytes (GPT-2: a tied table, 95 % of the tiny model's weights); the saved file says what it chose."""
    import torch

    import compot_deploy
    from compot_deploy.config import EmbeddingConfig
    from compot_deploy.models import load_model
    from compot_deploy.storage.budget import dense_model_bytes

    model, _ = load_model(tiny_dirs["gpt2"])
    dense = dense_model_bytes(model, 2)
    del model
    cal = CalibrationConfig(samples=8, seq_len=48, batch_size=4)
    for frac, bits in ((1.1, None), (0.6, 8), (0.45, 4)):
        budget = int(frac * dense)
        cfg = CompressConfig(calibration=cal, allocation=AllocationConfig(strategy="joint",
                                                                          budget=Budget(file_bytes=budget)),
                             embeddings=EmbeddingConfig(bits="joint"))
        out = tmp_path / f"j{frac}"
        rep = compot_deploy.compress(tiny_dirs["gpt2"], out, cfg, progress=False)
        assert rep["joint"]["fits"] and rep["model_file"]["bytes"] <= budget, frac
        table = rep["joint"]["table"]
        if bits is None:
            assert table["choice"] == "table dense" and "embeddings" not in rep
            assert set(rep["joint"]["choices"]) == {"dense fp"}, rep["joint"]["choices"]  # every linear unquantized
        else:
            assert table["choice"] == f"table {bits}-bit g32" and rep["embeddings"]["bits"] == bits, frac
            assert table["bytes"] == rep["embeddings"]["bytes"] and rep["embeddings"]["tied_head"]
        m = compot_deploy.load(out)
        with torch.no_grad():
            assert torch.isfinite(m(input_ids=torch.arange(1, 17)[None]).logits).all()


def test_embedding_bits_joint_needs_a_file_budget(tiny_dirs):
    from pydantic import ValidationError

    from compot_deploy.config import EmbeddingConfig
    from compot_deploy.errors import CompotError
    from compot_deploy.models import load_model
    from compot_deploy.quantize.embeddings import resolve_bits

    for allocation in (AllocationConfig(), AllocationConfig(strategy="joint", budget=Budget(kept=0.3))):
        with pytest.raises(ValidationError, match="--target-bytes"):
            CompressConfig(allocation=allocation, embeddings=EmbeddingConfig(bits="joint"))
    model, _ = load_model(tiny_dirs["gpt2"])
    with pytest.raises(CompotError, match="compress --target-bytes"):  # quantize has no allocator to pick it
        resolve_bits(model, "joint", 32)
