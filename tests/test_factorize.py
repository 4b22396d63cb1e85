import pytest
import torch

from compot_deploy.errors import CompotError
from compot_deploy.storage.record import plan
from compot_deploy.factorize import (compot, compot_whitened, cospadi, damped_cholesky, relative_error,
                                     SpectralErrorEstimate, svd_llm, unwhiten, whiten)
from compot_deploy.factorize.compot import procrustes, refit_support
from compot_deploy.factorize.cospadi import batch_omp

f64 = torch.float64


def _problem(d_in=96, d_out=160, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=f64) @ torch.diag(torch.logspace(0, -1.5, d_in, dtype=f64))
    W = torch.randn(d_in, d_out, generator=g, dtype=f64) @ torch.diag(torch.logspace(0, -1, d_out, dtype=f64))
    return X, W


def test_whitening_turns_output_error_into_frobenius_error():
    X, W = _problem()
    L = damped_cholesky(X.T @ X, eps=1e-12)
    E = torch.randn_like(W)
    assert torch.linalg.norm(X @ E) == pytest.approx(float(torch.linalg.norm(L.T @ E)), rel=1e-6)
    D = torch.randn(W.shape[0], 7, dtype=f64)
    assert torch.allclose(L.T @ unwhiten(D, L), D, atol=1e-9)


def test_damping_raises_eps_and_logs(caplog):
    G = torch.ones(8, 8, dtype=f64) * 1e-3  # rank one: fails at tiny eps
    G[0, 0] -= 1e-3 * 1e-3
    with caplog.at_level("INFO", logger="compot_deploy"):
        L = damped_cholesky(G, eps=1e-12, name="x")
    assert torch.isfinite(L).all()
    assert "raising damping" in caplog.text


def test_inplace_cholesky_factors_in_the_grams_memory_and_recovers_from_failures():
    X = torch.randn(40, 300, dtype=f64)  # rank 40 of 300: eps 1e-18 fails, the retries need the Gram intact
    G = X.T @ X
    expected = damped_cholesky(G, eps=1e-14)
    A = G.clone()
    L = damped_cholesky(A, eps=1e-18, inplace=True)
    assert L.data_ptr() == A.data_ptr()
    assert torch.equal(L, L.tril())
    assert torch.allclose(L, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    assert float((L @ L.T - G).abs().max()) < 1e-9 * float(G.abs().max())


@pytest.mark.parametrize("G", [-torch.eye(4, dtype=f64), torch.zeros(4, 4, dtype=f64),
                               torch.full((4, 4), float("nan"), dtype=f64)])
def test_damping_gives_up_with_a_clear_error(G):
    with pytest.raises(CompotError, match="Gram of"):
        damped_cholesky(G, name="layer.q")


def test_procrustes_matches_svd_polar_factor():
    B = torch.randn(200, 30, dtype=f64)
    P, _, Qh = torch.linalg.svd(B, full_matrices=False)
    assert torch.allclose(procrustes(B), P @ Qh, atol=1e-10)
    B[:, 0] = 0  # rank-deficient: falls back to the SVD and stays orthonormal
    D = procrustes(B)
    assert torch.allclose(D.T @ D, torch.eye(30, dtype=f64), atol=1e-10)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_compot_structure_and_monotone_error(shape):
    M = torch.randn(*shape, dtype=f64) @ torch.diag(torch.logspace(0, -1, shape[1], dtype=f64))
    k, s = 40, 20
    D, values, indices, hist = compot_whitened(M, k, s, iters=15, tol=0.0)
    assert D.shape == (shape[0], k) and values.shape == indices.shape == (s, shape[1])
    assert torch.allclose(D.T @ D, torch.eye(k, dtype=f64), atol=1e-10)
    assert all(b <= a + 1e-12 for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] < hist[0] - 0.005  # the alternation does real work
    C = torch.zeros(k, shape[1], dtype=f64).scatter_(0, indices, values)
    assert ((C != 0).sum(0) <= s).all()
    assert float(torch.linalg.norm(M - D @ C) / torch.linalg.norm(M)) == pytest.approx(hist[-1], rel=1e-9)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_refit_solves_least_squares_on_the_fixed_support(shape):
    M = torch.randn(*shape, dtype=f64) @ torch.diag(torch.logspace(0, -1, shape[1], dtype=f64))
    k, s = 40, 20
    D0, v0, idx, hist = compot_whitened(M, k, s, iters=8, tol=0.0)
    D, v = refit_support(M, D0, v0, idx, rtol=1e-13)
    C = torch.zeros(k, shape[1], dtype=f64).scatter_(0, idx, v)
    err = float(torch.linalg.norm(M - D @ C) / torch.linalg.norm(M))
    assert err < hist[-1] * 0.99  # cannot rise; here it buys more than 1 %
    # each column's values are the least-squares solution on its support with the refitted dictionary
    for j in (0, shape[1] // 2, shape[1] - 1):
        sol = torch.linalg.lstsq(D[:, idx[:, j]], M[:, j:j + 1]).solution.squeeze(1)
        assert torch.allclose(sol, v[:, j], atol=1e-8)
    # and the dictionary is the least-squares one for those codes' support pattern before the value refit
    C0 = torch.zeros(k, shape[1], dtype=f64).scatter_(0, idx, v0)
    D_ls = torch.linalg.lstsq(C0.T, M.T).solution.T
    assert torch.allclose(D, D_ls, atol=1e-8)
    f, h = compot(unwhiten(M, torch.eye(shape[0], dtype=f64)), torch.eye(shape[0], dtype=f64), k, s, 8, 0.0,
                  refit=True)
    assert h[-1] == pytest.approx(err, rel=1e-6) and h[-2] == pytest.approx(hist[-1], rel=1e-9)
    assert relative_error(M, f.dense(), torch.eye(shape[0], dtype=f64)) == pytest.approx(h[-1], rel=1e-9)


def test_spectral_estimate_is_compot_at_iteration_zero():
    M = torch.randn(80, 120, dtype=f64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    rec = plan("compot", 80, 120, False, 0.6 * 80 * 120 * 2, "float16")
    hist = compot_whitened(M, rec.k, rec.s, iters=0)[3]
    est = SpectralErrorEstimate(S, Vh)
    assert rec.storage.spectral_error(est, rec) == pytest.approx(hist[0] ** 2, rel=1e-5)
    lr = plan("svd-llm", 80, 120, False, 0.6 * 80 * 120 * 2, "float16")
    assert lr.storage.spectral_error(est, lr) == pytest.approx(
        float(torch.linalg.norm(M - (U[:, :lr.r] * S[:lr.r]) @ Vh[:lr.r]) ** 2 / torch.linalg.norm(M) ** 2))


def test_compot_beats_svd_llm_at_equal_bytes_on_sparse_structured_weights():
    X, _ = _problem()
    L = damped_cholesky(X.T @ X)
    g = torch.Generator().manual_seed(1)
    # whitened target made of 80 orthonormal atoms, 4 per column: what COMPOT models, beyond any rank-54 fit
    basis = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=f64)).Q[:, :80]
    codes = torch.zeros(80, 160, dtype=f64)
    for j in range(160):
        codes[torch.randperm(80, generator=g)[:4], j] = torch.randn(4, generator=g, dtype=f64)
    W = unwhiten(basis @ codes, L)
    budget = 0.9 * 96 * 160 * 2
    pc = plan("compot", 96, 160, False, budget, "float16", k_over_s=4.0)
    pr = plan("svd-llm", 96, 160, False, budget, "float16")
    assert pc.bytes <= budget and pr.bytes <= budget
    fc, _ = compot(W, L, pc.k, pc.s, iters=30)
    fr = svd_llm(W, L, pr.r)
    ec, er = relative_error(W, fc.dense(), L), relative_error(W, fr.dense(), L)
    assert ec < 0.5 * er, (ec, er)


def test_batch_omp_solves_least_squares_on_its_support():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(50, 80, generator=g, dtype=f64)
    D /= D.norm(dim=0)
    X = torch.randn(50, 9, generator=g, dtype=f64)
    values, idx = batch_omp(D, X, 6)
    assert all(len(set(idx[:, j].tolist())) == 6 for j in range(9))
    for j in range(9):
        sol = torch.linalg.lstsq(D[:, idx[:, j]], X[:, j : j + 1]).solution.squeeze(1)
        assert torch.allclose(sol, values[:, j], atol=1e-8)


def _omp_one_column(D, m, s):
    """Textbook OMP for one column: pick the atom most correlated with the residual, re-solve least squares."""
    chosen, r = [], m.clone()
    for _ in range(s):
        score = (D.T @ r).abs()
        score[chosen] = -1.0
        chosen.append(int(score.argmax()))
        g = torch.linalg.lstsq(D[:, chosen], m[:, None]).solution[:, 0]
        r = m - D[:, chosen] @ g
    return g, chosen


def test_batch_omp_picks_textbook_omps_atoms_in_order_across_chunks():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(40, 70, generator=g, dtype=f64)
    D /= D.norm(dim=0)
    X = torch.randn(40, 23, generator=g, dtype=f64)
    s = 30  # dense enough codes that later atoms are nearly dependent on the chosen ones
    values, idx = batch_omp(D, X, s, chunk_bytes=5 * s * (70 + s) * 8)  # 5 columns per chunk: 5 chunks
    for j in range(23):
        ref_values, ref_idx = _omp_one_column(D, X[:, j], s)
        assert idx[:, j].tolist() == ref_idx
        assert torch.allclose(values[:, j], ref_values, atol=1e-8)


def test_cospadi_improves_on_its_init_and_keeps_sparsity():
    X, W = _problem()
    L = damped_cholesky(X.T @ X)
    f, hist = cospadi(W, L, 40, 20, iters=3)
    assert hist[-1] < hist[0]
    assert f.values.shape == (20, 160)
    assert relative_error(W, f.dense(), L) == pytest.approx(hist[-1], rel=1e-6)


def test_whiten_roundtrip():
    X, W = _problem()
    L = damped_cholesky(X.T @ X)
    assert torch.allclose(unwhiten(whiten(W, L), L), W, atol=1e-8)
