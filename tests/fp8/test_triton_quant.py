"""Triton quantization kernels (run by Triton's CPU interpreter) are bit-identical to the torch ones."""

import pytest
import torch

from twinpipe.fp8 import act_quant, weight_quant


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("amax_floor", [1e-4, 1e-30])   # DeepSeek's floor; the gradients' floor
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_bit_exact(pow2, dtype, amax_floor):
    from twinpipe.fp8.triton_quant import triton_act_quant
    torch.manual_seed(0)
    # magnitudes over ten decades, so values land on every E4M3 binade, on subnormals and on ties
    x = torch.randn(37, 300) * torch.logspace(-6, 4, 300)
    x[3, :128] = 0.0                       # a zero tile
    x[5, 10] = -1e-30                      # underflows to -0
    x[6, :128] = torch.arange(128) * (448 / 127) / 64   # values exactly between grid points
    x[7] *= 1e-9                                         # every tile of this row is below 1e-4
    x = x.to(dtype)
    q_ref, s_ref = act_quant(x, pow2=pow2, amax_floor=amax_floor)
    q, s = triton_act_quant(x, pow2=pow2, amax_floor=amax_floor)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_quant_bit_exact_stacked_and_odd(pow2):
    from twinpipe.fp8.triton_quant import triton_weight_quant
    torch.manual_seed(1)
    w = torch.randn(3, 200, 260) * torch.logspace(-3, 2, 260)
    w[1, :128, :128] = 0.0
    q_ref, s_ref = weight_quant(w, pow2=pow2)
    q, s = triton_weight_quant(w, pow2=pow2)
    assert q.shape == w.shape and s.shape == (3, 2, 3)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(s, s_ref)


def test_interpreter_cast_workaround_rounds_carries_exactly():
    """Ties at the top of a binade (15.5 -> 16, 7.75 -> 8) carry into the exponent: the case the
    interpreter's own fp32 -> e4m3 cast gets wrong, fixed by rounding to the grid in fp32 first."""
    from twinpipe.fp8.triton_quant import triton_act_quant
    x = torch.zeros(1, 128)
    x[0, :4] = torch.tensor([448.0, 15.5, 7.75, -0.0029296875])   # ties that carry into the exponent
    q, _ = triton_act_quant(x)
    q_ref, _ = act_quant(x)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert q.float()[0, :3].tolist() == [448.0, 16.0, 8.0]
