import pytest
import torch

import compot_deploy.storage.modules as mods
from compot_deploy.factorize.types import SparseFactors, hard_threshold
from compot_deploy.storage.modules import CompotLinear, LowRankLinear


@pytest.mark.parametrize("k,s,position", [(40, 12, "bitmask"), (40, 3, "uint8"), (300, 12, "uint16"),
                                          (300, 100, "bitmask")])
@pytest.mark.parametrize("densify_from", [1, 10**9])
def test_compot_linear_equals_dense_product(k, s, position, densify_from, monkeypatch):
    monkeypatch.setattr(mods, "DENSIFY_FROM_TOKENS", densify_from)
    torch.manual_seed(0)
    d_in, d_out = 320, 48
    A = torch.randn(d_in, k)
    values, indices = hard_threshold(torch.randn(k, d_out), s)  # any order in, ascending rows stored
    b = torch.randn(d_out)
    m = CompotLinear.from_factors(A, values, indices, b)
    assert m.position == position
    assert torch.equal(m.code_indices(), indices.sort(dim=0).values)
    assert not any(t.shape == (k, d_out) for t in m.state_dict().values())  # no dense code matrix is kept
    x = torch.randn(3, 5, d_in)
    C = SparseFactors(A.double(), values.double(), indices).codes_dense().float()
    torch.testing.assert_close(m(x), x @ A @ C + b, rtol=1e-4, atol=1e-4)


def test_lowrank_linear():
    A, B, b = torch.randn(16, 4), torch.randn(4, 8), torch.randn(8)
    x = torch.randn(2, 16)
    torch.testing.assert_close(LowRankLinear.from_factors(A, B, b)(x), x @ A @ B + b)
    torch.testing.assert_close(LowRankLinear.from_factors(A, B, None)(x), x @ A @ B)
