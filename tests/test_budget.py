import pytest

from compot_deploy.storage.budget import (compot_bytes, dense_bytes, index_dtype, lowrank_bytes, position_bytes,
                                  position_format, removed_fraction, solve_compot_shape, solve_rank)


def test_index_dtype_boundaries():
    assert index_dtype(256) == "uint8"
    assert index_dtype(257) == "uint16"
    assert index_dtype(65536) == "uint16"
    assert index_dtype(65537) == "int32"


def test_byte_formulas():
    assert dense_bytes(384, 1536, 2, True) == (384 * 1536 + 1536) * 2
    # A: 384x200 fp16, codes: 1536 columns x 100 fp16 values + a 200-bit mask (25 bytes) per column, bias
    assert compot_bytes(384, 1536, 200, 100, 2, True) == 384 * 200 * 2 + 1536 * 100 * 2 + 1536 * 25 + 1536 * 2
    # very sparse columns (s < k/8): one-byte index lists are cheaper than masks
    assert position_format(200, 20) == "uint8"
    assert compot_bytes(384, 1536, 200, 20, 2, False) == 384 * 200 * 2 + 1536 * 20 * 3
    # k > 256 lists would pay two-byte indices
    assert position_format(1000, 50) == "uint16"
    assert position_bytes(10, 1000, 50, "uint16") == 10 * 50 * 2 < position_bytes(10, 1000, 50, "bitmask") == 10 * 125
    assert lowrank_bytes(384, 1536, 10, 4, False) == 10 * (384 + 1536) * 4
    assert removed_fraction(70, 100) == pytest.approx(0.3)


@pytest.mark.parametrize("d_in,d_out,frac,ks", [(384, 384, 0.7, 2.0), (384, 1536, 0.5, 2.0), (1536, 384, 0.8, 3.0),
                                                 (64, 160, 0.6, 1.5)])
def test_solve_compot_shape_is_largest_that_fits(d_in, d_out, frac, ks):
    budget = frac * dense_bytes(d_in, d_out, 2, True)
    sh = solve_compot_shape(d_in, d_out, budget, 2, True, ks)
    assert compot_bytes(d_in, d_out, sh.k, sh.s, 2, True) <= budget
    assert 1 <= sh.s <= sh.k <= min(d_in, d_out)
    k_next = min(min(d_in, d_out), max(sh.s + 1, round(ks * (sh.s + 1))))
    if sh.s + 1 <= k_next:
        assert compot_bytes(d_in, d_out, k_next, sh.s + 1, 2, True) > budget


def test_solve_compot_shape_none_when_nothing_fits():
    assert solve_compot_shape(384, 384, 100, 2, True) is None


def test_solve_rank():
    budget = 0.5 * dense_bytes(384, 384, 2, False)
    r = solve_rank(384, 384, budget, 2, False)
    assert lowrank_bytes(384, 384, r, 2, False) <= budget < lowrank_bytes(384, 384, r + 1, 2, False)


def test_bitmask_spends_the_budget_at_k_over_s_2():
    budget = 0.8 * dense_bytes(384, 1536, 2, True)
    sh = solve_compot_shape(384, 1536, budget, 2, True)
    assert position_format(sh.k, sh.s) == "bitmask" and sh.k > 256
    assert removed_fraction(compot_bytes(384, 1536, sh.k, sh.s, 2, True), dense_bytes(384, 1536, 2, True)) == pytest.approx(0.2, abs=0.005)
