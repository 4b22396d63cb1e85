"""ReplaceMe depth pruning: the maths, the exact folds into each architecture's MLP branch, and `--prune-blocks`
through compress, transformers' own loader, export and the gate."""

import json
import subprocess
import sys

import pytest
import torch

from compot_deploy.calibrate.data import calibration_batches
from compot_deploy.config import CalibrationConfig
from compot_deploy.models import find_blocks, load_model
from compot_deploy.prune import _fit_stats, drop_blocks, fold_diagonal, fold_full, mlp_branch
from compot_deploy.prune.depth import MapStats, choose_windows, diagonal_map, full_map, residual_fraction

from conftest import build_tiny

CLI = [sys.executable, "-m", "compot_deploy.cli"]
TINY = ["--samples", "8", "--seq-len", "48"]


def test_windows_are_chosen_by_distance_and_never_touch():
    d = {1: 0.30, 2: 0.10, 3: 0.12, 4: 0.11, 5: 0.50, 6: 0.20}
    assert choose_windows(d, 1, 1) == [2]
    assert choose_windows(d, 1, 2) == [2, 4]  # 3 touches 2 (block 2 holds the map of window 3)
    assert choose_windows(d, 2, 2) == [2, 6]  # 4 would need block 3, which window 2 removes
    with pytest.raises(ValueError):
        choose_windows(d, 2, 3)


def test_maps_are_least_squares_and_their_residuals_exact():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(500, 6, generator=g, dtype=torch.float64)
    R = M @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(500, 6, generator=g,
                                                                                    dtype=torch.float64) + 0.7
    s = MapStats.zeros(6)
    s.add(M[:200], R[:200])
    s.add(M[200:], R[200:])  # statistics accumulate over batches
    T = full_map(s, ridge=0.0)
    assert torch.allclose(T, torch.linalg.lstsq(M, R).solution, atol=1e-10)
    rel = lambda P: float(((P - R) ** 2).sum() / (R ** 2).sum())  # noqa: E731
    assert residual_fraction(s, T=T) == pytest.approx(rel(M @ T), rel=1e-9)
    assert residual_fraction(s) == pytest.approx(rel(M), rel=1e-9)
    t, b = diagonal_map(s, bias=True)
    for j in range(6):
        slope, icpt = torch.linalg.lstsq(torch.stack([M[:, j], torch.ones(500, dtype=torch.float64)], 1),
                                         R[:, j:j + 1]).solution.flatten()
        assert float(t[j]) == pytest.approx(float(slope), rel=1e-9) and float(b[j]) == pytest.approx(float(icpt), rel=1e-9)
    assert residual_fraction(s, t=t, b=b) == pytest.approx(rel(M * t + b), rel=1e-9)
    t0, b0 = diagonal_map(s, bias=False)
    assert float(b0.abs().max()) == 0.0 and residual_fraction(s, t=t0) == pytest.approx(rel(M * t0), rel=1e-9)


def _block_inputs(model, batches, i):
    _, blocks = find_blocks(model)
    got = []
    h = blocks[i].register_forward_pre_hook(lambda m, a, kw: got.append(a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    return got


@pytest.mark.parametrize("kind,branch", [("llama", "mlp"), ("gpt2", "mlp"), ("gemma2", "norm"), ("bert", "norm")])
def test_the_folded_map_gives_the_fitted_hidden_states(kind, branch, tmp_path, minilm_dir):
    """Blocks 1-2 of 4 removed: the pruned model's input to its block 1 misses the original's input to block 3 by
    exactly the fit's residual (full map into Llama's down_proj and GPT-2's Conv1D c_proj, diagonal into Gemma2's
    (1 + w) RMSNorm and BERT's LayerNorm with its shift)."""
    model, tok = load_model(build_tiny(kind, tmp_path / kind, minilm_dir, layers=4))
    batches = calibration_batches(tok, CalibrationConfig(samples=8, seq_len=32), model)
    ref = _block_inputs(model, batches, 3)
    s = _fit_stats(model, batches, 1, 2, progress=False)
    mod, got_branch = mlp_branch(find_blocks(model)[1][0])
    assert got_branch == branch
    if branch == "mlp":
        T = full_map(s, ridge=1e-8)
        fold_full(mod, T)
        predicted = residual_fraction(s, T=T)
    else:
        t, b = diagonal_map(s, bias=getattr(mod, "bias", None) is not None)
        fold_diagonal(mod, t, b)
        predicted = residual_fraction(s, t=t, b=b)
    assert predicted < 0.98 * residual_fraction(s)  # the map explains something
    drop_blocks(model, 1, 2)
    assert len(find_blocks(model)[1]) == model.config.num_hidden_layers == 2
    new = _block_inputs(model, batches, 1)
    err = sum(float(((x - y)[bt["attention_mask"].bool()].double() ** 2).sum())
              for x, y, bt in zip(new, ref, batches, strict=True))
    assert err == pytest.approx(predicted * float(s.rr.sum()), rel=1e-4)


def test_prune_then_compress_saves_a_smaller_model_transformers_loads(tmp_path, minilm_dir):
    import transformers

    import compot_deploy

    src = build_tiny("llama", tmp_path / "llama", minilm_dir, layers=4)
    out = tmp_path / "p"
    res = subprocess.run(CLI + ["compress", str(src), *TINY, "--prune-blocks", "1", "--ratio", "0.2", "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "pruned blocks" in res.stdout
    rep = json.loads((out / "compression_report.json").read_text())
    assert len(rep["prune"]["removed_blocks"]) == 1 and rep["prune"]["windows"][0]["map"] == "full"
    assert rep["linears"]["file_ratio"] == pytest.approx(0.25, abs=1e-3)  # a quarter of the linears gone, no more
    assert all(x["method"] == "dense" for x in rep["layers"])  # pruning alone met --ratio 0.2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    ours = compot_deploy.load(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 300, 2, 41, 9]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_pruned_sliding_window_decoder_builds_and_passes_the_gate(tmp_path, minilm_dir):
    """Gemma2 with a 16-token window: per-layer types and the KV cache's layer indices follow the removal; ORT's
    greedy tokens equal PyTorch's past the window."""
    src = build_tiny("gemma2", tmp_path / "g2", minilm_dir, layers=4)
    (tmp_path / "b.yaml").write_text("gate: {eval_texts: 0}\n")
    out = tmp_path / "b"
    res = subprocess.run(CLI + ["build", str(src), *TINY, "-q", "--no-bench", "--prune-blocks", "1", "--ratio", "0.4",
                                "--config", str(tmp_path / "b.yaml"), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "package" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and len(cfg["layer_types"]) == 3
    gate = json.loads((out / "package" / "validation.json").read_text())
    assert gate["passed"] and gate["parity"]["tokens"]["mismatches"] == 0
    summary = [e for e in map(json.loads, (out / "build.log.jsonl").read_text().splitlines()) if "summary" in e][-1]
    # more than pruning removes (a quarter): the rest is compressed to make up the difference
    assert summary["summary"]["byte_ratio"] == pytest.approx(0.4, abs=0.01)
    assert len(summary["summary"]["pruned_blocks"]) == 1


def test_prune_refuses_what_cannot_be_done(tiny_dirs, tmp_path):
    import compot_deploy
    from compot_deploy.config import CompressConfig, PruneConfig, build_config
    from compot_deploy.errors import CompotError

    with pytest.raises(CompotError, match="cannot remove 2 of 2 blocks"):
        compot_deploy.compress(tiny_dirs["llama"], tmp_path / "x", CompressConfig(prune=PruneConfig(blocks=2)),
                               progress=False)
    assert not (tmp_path / "x").exists()
    assert build_config(CompressConfig, prune={"blocks": 1},
                        allocation={"strategy": "joint", "budget": {"kept": 0.3}}).prune.blocks == 1


def _joint_with_depth(src, out, kept: float) -> dict:
    import compot_deploy
    from compot_deploy.config import AllocationConfig, CompressConfig, JointConfig, PruneConfig
    from compot_deploy.storage.budget import Budget

    cfg = CompressConfig(calibration=CalibrationConfig(samples=8, seq_len=48), prune=PruneConfig(blocks=1),
                         allocation=AllocationConfig(strategy="joint", budget=Budget(kept=kept),
                                                     joint=JointConfig(methods=("dense",), sensitivity_batches=1,
                                                                       dense_quant=((2, 32), (4, 32), (8, 0)))))
    return compot_deploy.compress(src, out, cfg, progress=False)


def test_the_joint_allocator_prunes_a_block_only_when_that_beats_spending_its_bytes(tmp_path, minilm_dir):
    """A block whose branches write nothing is free to remove: its bytes go to the others, and the pruned model is
    saved with 3 blocks; at a budget that keeps everything near float16 no removal pays for itself."""
    import compot_deploy
    from compot_deploy.allocate.joint import _final_hidden, final_change
    from compot_deploy.prune import prune_model
    from compot_deploy.config import PruneConfig

    src = build_tiny("llama", tmp_path / "llama", minilm_dir, layers=4)
    model, tok = load_model(src)
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    idle = tmp_path / "idle"
    model.save_pretrained(idle)
    tok.save_pretrained(idle)

    rep = _joint_with_depth(idle, tmp_path / "a", kept=0.3)
    d = rep["joint"]["depth"]
    assert d["pruned"] and d["removed_blocks"] == [2] and d["prune_error"] < 1e-6
    assert d["estimated_error_with_pruning"] < d["estimated_error_without_pruning"]
    assert rep["joint"]["fits"] and rep["prune"]["removed_blocks"] == [2]
    assert rep["linears"]["file_ratio"] == pytest.approx(0.7, abs=0.01)  # of the original's linears
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_hidden_layers"] == 3
    assert len(rep["layers"]) == 21 and all(".layers.3." not in x["name"] for x in rep["layers"])
    assert compot_deploy.load(tmp_path / "a").config.num_hidden_layers == 3

    rep = _joint_with_depth(src, tmp_path / "b", kept=0.95)
    d = rep["joint"]["depth"]
    assert not d["pruned"] and d["estimated_error_without_pruning"] < d["prune_error"]
    assert "prune" not in rep and len(rep["layers"]) == 28
    # the pruning error is the pruned model's measured change of the final hidden states
    model, tok = load_model(src)
    batches = calibration_batches(tok, CalibrationConfig(samples=8, seq_len=48), model)
    y0 = _final_hidden(model, batches[:1])
    prune_model(model, batches, PruneConfig(blocks=1), progress=False)
    assert final_change(model, batches[:1], y0) == pytest.approx(d["prune_error"], rel=1e-6)
