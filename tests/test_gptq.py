"""GPTQ against a direct transcription of the paper's Algorithm 1 (GPTQModel only ships a CUDA sdist here)."""

import pytest
import torch

from compot_deploy.errors import CompotError
from compot_deploy.quantize.gptq import gptq, gptq_sparse_columns, rtn

f64 = torch.float64


def paper_gptq(W, H, bits, group, damp=0.01):
    """Frantar et al. 2022, Algorithm 1, one row (input dim) at a time, no lazy batching. W: (K, N)."""
    W = W.clone().to(f64)
    K, N = W.shape
    maxq = 2**bits - 1
    H = H + damp * H.diagonal().mean() * torch.eye(K, dtype=f64)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    out = torch.zeros_like(W)
    for i in range(K):
        if i % group == 0:
            blk = W[i : i + group]
            lo, hi = blk.min(0).values.clamp(max=0), blk.max(0).values.clamp(min=0)
            scale = (hi - lo) / maxq
            scale[scale == 0] = 1
            zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(W[i] / scale) + zero, 0, maxq)
        out[i] = (q - zero) * scale
        err = (W[i] - out[i]) / Hinv[i, i]
        W[i:] -= torch.outer(Hinv[i, i:], err)
    return out


def _layer(K=96, N=40, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g, dtype=f64) @ torch.randn(K, K, generator=g, dtype=f64) * 0.3
    W = torch.randn(K, N, generator=g, dtype=f64)
    return X, W, 2 * X.T @ X / n


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 96), (8, 32), (3, 16)])
def test_matches_paper_algorithm(bits, group):
    X, W, H = _layer()
    ours = gptq(W, H, bits=bits, group=group, block=64).dequantize()
    ref = paper_gptq(W, H, bits, group)
    # same math, different summation order: agree to rounding (a grid step flip here and there at most)
    assert (ours - ref).abs().max() < 1e-6 or (ours != ref).double().mean() < 0.005
    assert torch.allclose(ours, ref, atol=1e-8)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(act_order):
    X, W, H = _layer()
    e_rtn = torch.linalg.norm(X @ (W - rtn(W, 4, 32).dequantize()))
    e_gptq = torch.linalg.norm(X @ (W - gptq(W, H, 4, 32, act_order=act_order).dequantize()))
    assert e_gptq < 0.8 * e_rtn


def test_codes_are_integers_on_the_grid():
    _, W, H = _layer()
    qz = gptq(W, H, 4, 32, sym=True)
    assert qz.q.dtype == torch.uint8 and int(qz.q.max()) <= 15
    assert torch.all(qz.zeros == 8)


def test_rank_deficient_hessian_recovers_and_logs(caplog):
    X = torch.randn(4, 64, dtype=f64)  # 4 samples for 64 inputs
    H = X.T @ X
    H[:, 3] = H[3, :] = 0  # a dead input too
    W = torch.randn(64, 8, dtype=f64)
    with caplog.at_level("WARNING", logger="compot_deploy"):
        out = gptq(W, H, 4, 32, damp=0.0, n_tokens=4).dequantize()
    assert torch.isfinite(out).all()
    assert "rank-deficient (4 tokens for 64 inputs, 1 dead inputs)" in caplog.text
    assert "failed at damping 0, raising it" in caplog.text
    cache: dict = {}
    caplog.clear()
    with caplog.at_level("WARNING", logger="compot_deploy"):
        for _ in range(3):  # chunks of one matrix (one Hessian, one cache): warned once
            gptq(W, H, 4, 32, n_tokens=4, cache=cache)
    assert caplog.text.count("rank-deficient") == 1


def test_degenerate_hessian_is_a_clear_error():
    with pytest.raises(CompotError, match="degenerate"):
        gptq(torch.randn(8, 4, dtype=f64), torch.full((8, 8), float("nan"), dtype=f64))


def test_sparse_columns_keep_pattern_and_beat_rtn():
    g = torch.Generator().manual_seed(3)
    n, k, s, N = 500, 48, 12, 64
    Z = torch.randn(n, k, generator=g, dtype=f64) @ torch.randn(k, k, generator=g, dtype=f64) * 0.3
    H = 2 * Z.T @ Z / n
    idx = torch.stack([torch.randperm(k, generator=g)[:s].sort().values for _ in range(N)], 1)
    vals = torch.randn(s, N, generator=g, dtype=f64)
    qz = gptq_sparse_columns(vals, idx, H, bits=4)
    deq = qz.dequantize()
    assert deq.shape == (s, N)

    def out_err(v):
        C = torch.zeros(k, N, dtype=f64).scatter_(0, idx, vals - v)
        return torch.linalg.norm(Z @ C)

    r = rtn(vals, 4, s).dequantize()
    assert out_err(deq) < 0.97 * out_err(r)
    # per column, it is exactly dense GPTQ on the s x s sub-Hessian with one grid per column
    j = 5
    ref = paper_gptq(vals[:, j : j + 1], H[idx[:, j]][:, idx[:, j]], 4, s)
    assert torch.allclose(deq[:, j : j + 1], ref, atol=1e-8)
