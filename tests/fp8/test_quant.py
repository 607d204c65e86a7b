"""Block quantization: round trip, error bounds, odd shapes, zero tiles, power-of-two scales."""

import math

import pytest
import torch

from twinpipe.fp8 import act_dequant, act_quant, weight_dequant, weight_quant
from twinpipe.model.fp8_format import FP8_MAX, round_scale_pow2

# E4M3 keeps 3 mantissa bits: round-to-nearest puts a normal value within 2^-4 of itself (relative);
# values below the smallest normal (2^-6 in quantized units) are within half a subnormal step, 2^-10.
REL_BOUND = 2.0 ** -4
SUBNORMAL_HALF_STEP = 2.0 ** -10


def _bound(x, s_full):
    return REL_BOUND * x.abs() + SUBNORMAL_HALF_STEP * s_full


@pytest.mark.parametrize("shape", [(4, 128), (3, 5, 300), (7, 1), (2, 129)])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_round_trip_within_e4m3_bound(shape, pow2):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])
    q, s = act_quant(x, pow2=pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(shape[-1] / 128))
    s_full = s.repeat_interleave(128, dim=-1)[..., : shape[-1]]
    err = (act_dequant(q, s) - x).abs()
    assert torch.all(err <= _bound(x, s_full))


def test_act_quant_scale_definition_and_tile_max_hits_448():
    torch.manual_seed(1)
    x = torch.randn(6, 384)
    q, s = act_quant(x)
    amax = x.view(6, 3, 128).abs().amax(-1)
    torch.testing.assert_close(s, amax / 448, rtol=0, atol=0)
    # the element that sets amax lands exactly on ±448
    assert torch.all(q.float().view(6, 3, 128).abs().amax(-1) == FP8_MAX)


def test_partial_tile_uses_only_real_elements():
    x = torch.zeros(1, 130)
    x[0, 128] = 3.0
    x[0, 129] = -1.5
    _, s = act_quant(x)
    assert s[0, 1] == torch.tensor(3.0) / 448


@pytest.mark.parametrize("pow2", [False, True])
def test_gradient_floor_keeps_small_tiles_scaled_to_their_own_range(pow2):
    """Gradient tiles far below DeepSeek's 1e-4 floor (common once the loss is divided by the
    micro-batch count) keep E4M3's relative precision with GRAD_AMAX_FLOOR. With 1e-4 the scale is
    pinned at 2.2e-7, so values under ~3.5e-9 (2^-6 in quantized units) fall into E4M3's subnormals."""
    from twinpipe.fp8.quant import GRAD_AMAX_FLOOR

    torch.manual_seed(3)
    g = torch.randn(8, 256) * 1e-9                          # amax ~ 3e-9 << 1e-4
    q, s = act_quant(g, pow2=pow2, amax_floor=GRAD_AMAX_FLOOR)
    s_full = s.repeat_interleave(128, dim=-1)
    err = (act_dequant(q, s) - g).abs()
    assert torch.all(err <= _bound(g, s_full))
    assert (err.norm() / g.norm()) < 0.05
    q_floor, s_floor = act_quant(g, pow2=pow2)              # DeepSeek's floor: a fixed, coarse grid
    assert (act_dequant(q_floor, s_floor) - g).norm() / g.norm() > 0.1
    zeros_q, zeros_s = act_quant(torch.zeros(2, 128), amax_floor=GRAD_AMAX_FLOOR)
    assert torch.all(zeros_s > 0) and torch.isfinite(zeros_s).all() and torch.all(zeros_q.float() == 0)


@pytest.mark.parametrize("pow2", [False, True])
def test_zero_tiles_are_finite(pow2):
    x = torch.zeros(2, 256)
    x[1, 128:] = 1.0
    q, s = act_quant(x, pow2=pow2)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    assert torch.all(q.float()[0] == 0) and s[0, 0] > 0
    w = torch.zeros(200, 130)
    qw, sw = weight_quant(w, pow2=pow2)
    assert torch.isfinite(sw).all() and torch.all(weight_dequant(qw, sw) == 0)


def test_pow2_scales_are_powers_of_two_rounded_up():
    s = torch.tensor([1.0, 1.5, 3.0, 2.0 ** -20 * 1.01, 448.0 / 448])
    r = round_scale_pow2(s)
    torch.testing.assert_close(r, torch.tensor([1.0, 2.0, 4.0, 2.0 ** -19, 1.0]), rtol=0, atol=0)
    torch.manual_seed(2)
    _, sx = act_quant(torch.randn(5, 300) * 7, pow2=True)
    mant, _ = torch.frexp(sx)
    assert torch.all(mant == 0.5)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (1, 5), (3, 130, 257)])
@pytest.mark.parametrize("pow2", [False, True])
def test_weight_quant_round_trip(shape, pow2):
    torch.manual_seed(3)
    w = torch.randn(shape, dtype=torch.bfloat16)
    q, s = weight_quant(w, pow2=pow2)
    n, k = shape[-2:]
    assert q.shape == w.shape and s.shape == (*shape[:-2], math.ceil(n / 128), math.ceil(k / 128))
    s_full = s.repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]
    err = (weight_dequant(q, s) - w.float()).abs()
    assert torch.all(err <= _bound(w.float(), s_full))


def test_weight_quant_block_scale_is_block_amax():
    torch.manual_seed(4)
    w = torch.randn(260, 140)
    _, s = weight_quant(w)
    assert s[0, 0] == w[:128, :128].abs().max() / 448
    assert s[2, 1] == w[256:, 128:].abs().max() / 448


def test_dequant_rejects_mismatched_scales():
    q, s = weight_quant(torch.randn(256, 256))
    with pytest.raises(ValueError, match="expected"):
        weight_dequant(q, s[:1])
    qa, sa = act_quant(torch.randn(4, 256))
    with pytest.raises(ValueError, match="do not match"):
        act_dequant(qa, sa[:, :1])
