"""Eq. 1 quantizer, the DGQ format (Eq. 5 interval) and nibble packing: exact checks."""

import itertools

import pytest
import torch

from dgqtool.quant.dual_grained import (
    DualGrainedWeight,
    code_interval,
    dual_grained_codes,
    format_violations,
    make_dual_grained,
    pack_nibbles,
    split_scales,
    unpack_nibbles,
)
from dgqtool.quant.quantizer import alpha_grid, asym_params, fake_quantize, quantize_codes, quantize_per_token, sym_params


def test_alpha_grid_matches_authors_code():
    grid = alpha_grid(20)
    assert len(grid) == 20
    assert grid[0].item() == pytest.approx(1.02 - 1 / 20 * 0.22)
    assert grid[-1].item() == pytest.approx(0.80)
    assert alpha_grid(1).tolist() == [1.0]


def test_eq1_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(64, 128) * 3
    scale, zero = asym_params(w.amin(1, keepdim=True), w.amax(1, keepdim=True), 1.0, bits=4)
    codes = quantize_codes(w, scale, zero, 4)
    assert codes.min() >= 0 and codes.max() <= 15
    err = (fake_quantize(w, scale, zero, 4) - w).abs()
    # zero-point rounding can shift the grid by at most half a step at the range ends
    assert (err <= scale * 1.0 + 1e-6).all()
    assert (err <= scale / 2 + 1e-6).float().mean() > 0.9


def test_eq1_clipping_shrinks_the_range():
    w = torch.linspace(-1, 1, 101).unsqueeze(0)
    s_full, _ = asym_params(w.amin(1), w.amax(1), 1.0, 4)
    s_clip, _ = asym_params(w.amin(1), w.amax(1), 0.8, 4)
    assert s_clip.item() == pytest.approx(0.8 * s_full.item())


def test_symmetric_params_fix_the_zero_point_at_8_and_span_minus_8_to_7():
    """compressed-tensors' symmetric int4: s = max|w| / 7.5; the larger side reaches a code's end."""
    w_min, w_max = torch.tensor([-7.5, -1.5, -15.0]), torch.tensor([3.0, 3.75, 0.0])  # exact scales 1, 0.5, 2
    scale, zero = sym_params(w_min, w_max, 1.0, bits=4)
    assert torch.equal(zero, torch.full((3,), 8.0)) and torch.equal(scale, torch.tensor([1.0, 0.5, 2.0]))
    codes = quantize_codes(torch.stack([w_min, w_max], -1), scale.unsqueeze(-1), zero.unsqueeze(-1), bits=4)
    assert codes.tolist() == [[0.0, 11.0], [5.0, 15.0], [0.0, 8.0]]  # -7.5 rounds to -8; +7.5 to 8, clamped to 7
    assert torch.allclose(sym_params(w_min, w_max, 0.8, bits=4)[0], scale * 0.8)


def test_per_token_int8_error_bound():
    x = torch.randn(10, 256) * torch.logspace(-2, 2, 10).unsqueeze(1)
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_code_interval_is_exact_and_maximal_for_every_s2_and_zero():
    """Exhaustive over S2 in [1, 127] and zp in [0, 15]: every code in the interval gives an int8
    product, and every code outside it in [0, 15] would overflow."""
    s2 = torch.arange(1, 128).repeat_interleave(16)
    zero = torch.arange(16).repeat(127)
    lo, hi = code_interval(zero, s2)
    for code in range(16):
        product = s2 * (code - zero)
        inside = (code >= lo) & (code <= hi)
        assert (product[inside].abs() <= 127).all()
        assert (product[~inside].abs() > 127).all()


def test_requantized_codes_stay_in_the_interval():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 5
    zero = torch.randint(0, 16, (32, 2)).float()
    s2 = torch.randint(1, 128, (32, 2)).float()
    s1 = torch.rand(32) * 0.1 + 1e-3
    codes = dual_grained_codes(w, zero, s2, s1).reshape(32, 64)
    weight = DualGrainedWeight(codes.to(torch.uint8), zero.to(torch.uint8), s2.to(torch.int8), s1)
    assert format_violations(weight) == []
    assert weight.int8_weight().abs().max() <= 127


def test_make_dual_grained_int8_weight_equals_dequantized_over_s1():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    gs, zero = asym_params(w.view(16, 2, 64).amin(-1), w.view(16, 2, 64).amax(-1), 1.0, 4)
    s1 = w.abs().amax(1) / 127
    q = make_dual_grained(w, split_scales(gs, s1), zero, s1)
    assert format_violations(q) == []
    torch.testing.assert_close(q.dequantize(), q.int8_weight().float() * q.s1.unsqueeze(1))
    # the dual-grained weight approximates w to within one int8 step per group
    assert ((q.dequantize() - w).abs().amax(1) <= (q.s2.float().amax(1) * s1) * 1.01 + 1e-6).all()


@pytest.mark.parametrize("bad", ["s2_zero", "overflow", "nan_scale"])
def test_format_violations_detects_illegal_weights(bad):
    codes = torch.full((2, 8), 8, dtype=torch.uint8)
    zero = torch.full((2, 1), 8, dtype=torch.uint8)
    s2 = torch.full((2, 1), 10, dtype=torch.int8)
    s1 = torch.ones(2)
    if bad == "s2_zero":
        s2[0, 0] = 0
    elif bad == "overflow":
        codes[0, 0] = 0  # 10 * (0 - 8) = -80 is fine; make S2 large instead
        s2[0, 0] = 127
    else:
        s1[1] = float("nan")
    assert format_violations(DualGrainedWeight(codes, zero, s2, s1))


def test_nibble_pack_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 6)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


@pytest.mark.parametrize("k", [1000, 1023, 3000])
def test_cpu_int8_matmul_is_exact_at_the_extremes(k):
    """The CPU path multiplies in fp32 below K = 1024 and fp64 above: all-(-128) operands make every
    partial sum as large as it can be (K * 2^14); random ones exercise ordinary sums."""
    from dgqtool.gemm import int8_matmul

    gen = torch.Generator().manual_seed(k)
    x = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=gen)])
    w = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.randint(-128, 128, (7, k), dtype=torch.int8, generator=gen)])
    expected = (x.long() @ w.long().T).to(torch.int32)
    got = int8_matmul(x, w)
    assert got.dtype == torch.int32 and torch.equal(got, expected) and int(got[0, 0]) == k * 2**14
