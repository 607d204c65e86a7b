"""FP8Linear: the three FP8 GEMMs against autograd, the weight cache, and the saved activation bytes."""

import pytest
import torch
from torch import nn

from twinpipe.fp8 import FP8Linear, act_dequant, act_quant, attach_to_optimizer, weight_dequant, weight_quant


def _pair(in_f=300, out_f=200, bias=True, backend="emulate", seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias)
    fp8 = FP8Linear(in_f, out_f, bias=bias, backend=backend)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _run(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


def test_each_gemm_is_the_product_of_its_quantized_operands():
    """Fprop, Dgrad and Wgrad equal FP64 products of exactly the operands the recipe prescribes."""
    ref, fp8 = _pair(bias=False)
    torch.manual_seed(1)
    x, g = torch.randn(3, 50, 300), torch.randn(3, 50, 200)
    y, dx = _run(fp8, x, g)
    xq, xs = act_quant(x.reshape(-1, 300))
    w = weight_dequant(*weight_quant(fp8.weight.detach())).double()                 # [N, K]
    gq, gs = act_quant(g.reshape(-1, 200))                                           # 1×128 along N
    dw_expected = (act_dequant(*act_quant(g.reshape(-1, 200).t())).double()         # dYᵀ along tokens
                   @ act_dequant(*act_quant(act_dequant(xq, xs).t())).double().T)   # Xᵀ along tokens
    # fp32 accumulation of <= 384 exact products: relative 1e-5 is far above rounding, far below FP8
    torch.testing.assert_close(y.reshape(-1, 200).double(), act_dequant(xq, xs).double() @ w.T,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.reshape(-1, 300).double(), act_dequant(gq, gs).double() @ w,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.weight.grad.double(), dw_expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_close_to_fp32_autograd(bias):
    ref, fp8 = _pair(bias=bias)
    torch.manual_seed(2)
    x, g = torch.randn(4, 33, 300), torch.randn(4, 33, 200)
    y_ref, dx_ref = _run(ref, x, g)
    y, dx = _run(fp8, x, g)
    # two E4M3-rounded operands per GEMM (<= 2^-4 relative each, ~3.6% RMS for uniform rounding);
    # measured 3.6% (Y, dX) and 4.5% (dW, whose X passes through a second 1×128 -> 128×1 quantization).
    assert _rel(y, y_ref) < 0.05
    assert _rel(dx, dx_ref) < 0.05
    assert _rel(fp8.weight.grad, ref.weight.grad) < 0.06
    if bias:
        torch.testing.assert_close(fp8.bias.grad, ref.bias.grad)   # the bias gradient is not quantized


def test_bf16_module_keeps_dtypes():
    ref, fp8 = _pair()
    fp8.to(torch.bfloat16)
    x = torch.randn(8, 300, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert fp8.weight.grad.dtype == torch.bfloat16


def test_weight_quantized_once_per_optimizer_step():
    _, fp8 = _pair(bias=False)
    cache = fp8.fp8_weight_caches["weight"]
    opt = torch.optim.SGD(fp8.parameters(), lr=0.1)
    for step in range(2):
        for _ in range(3):                       # three micro-batches share one FP8 weight
            fp8(torch.randn(4, 300)).sum().backward()
        assert cache.num_quantizations == step + 1
        opt.step()                               # in-place update bumps weight._version
        opt.zero_grad()
    assert cache.num_quantizations == 2


def test_in_place_copy_into_the_parameter_requantizes():
    """The trainer's ZeRO-1 publishes updated weights with `param.copy_` under no_grad: a version bump."""
    _, fp8 = _pair(bias=False)
    x = torch.randn(4, 300)
    y0 = fp8(x)
    with torch.no_grad():
        fp8.weight.copy_(fp8.weight * 2)
    torch.testing.assert_close(fp8(x), 2 * y0, rtol=2 ** -6, atol=1e-6)
    assert fp8.fp8_weight_caches["weight"].num_quantizations == 2


def test_writes_through_data_need_the_hook_and_get_it():
    _, fp8 = _pair(bias=False)
    x = torch.randn(4, 300)
    y0 = fp8(x)
    opt = torch.optim.SGD(fp8.parameters(), lr=0.0)
    attach_to_optimizer(fp8, opt)
    fp8.weight.data.copy_(fp8.weight.data * 2)   # like DeepSpeed's copy back: no version bump
    assert torch.equal(fp8(x), y0)               # stale without invalidation ...
    opt.step()                                   # ... the step post-hook invalidates
    torch.testing.assert_close(fp8(x), 2 * y0, rtol=2 ** -6, atol=1e-6)


def _saved_activation_bytes(module, x):
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


def test_saved_activation_is_fp8_and_about_half_of_bf16():
    ref, fp8 = _pair(in_f=512, out_f=256, bias=False)
    ref.to(torch.bfloat16)
    fp8.to(torch.bfloat16)
    x = torch.randn(64, 512, dtype=torch.bfloat16, requires_grad=True)
    bf16_bytes = _saved_activation_bytes(ref, x)
    fp8_bytes = _saved_activation_bytes(fp8, x)
    assert bf16_bytes == 64 * 512 * 2
    # 1 byte per element plus one fp32 scale per 128 elements: (1 + 4/128) / 2 of the BF16 bytes
    assert fp8_bytes == 64 * 512 + 64 * 4 * 4
    assert fp8_bytes < 0.52 * bf16_bytes


def test_linears_reading_one_input_share_its_fp8_copy():
    """Two FP8 Linears on the same x (MLA's q_a and kv_a, an MLP's gate and up) save one FP8 copy of
    it, not one each, with outputs and gradients bit-identical to quantising it apart; x changed in
    place is quantised again."""
    _, a = _pair(in_f=256, out_f=64, bias=False, seed=0)
    _, b = _pair(in_f=256, out_f=96, bias=False, seed=1)
    torch.manual_seed(2)
    x = torch.randn(32, 256, requires_grad=True)
    ptrs = []

    def pack(t):
        ptrs.append((t.untyped_storage().data_ptr(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ya, yb = a(x), b(x)
    fp8_copies = {p for p, dtype in ptrs if dtype == torch.float8_e4m3fn}
    assert len(fp8_copies) == 1
    (ya.square().sum() + yb.square().sum()).backward()
    x_apart = x.detach().clone().requires_grad_()
    ya2, yb2 = a(x_apart), b(x_apart.clone())  # a different tensor: its own quantisation
    assert torch.equal(ya, ya2) and torch.equal(yb, yb2)
    grads = [x.grad.clone(), a.weight.grad.clone(), b.weight.grad.clone()]
    a.weight.grad = b.weight.grad = None
    (ya2.square().sum() + yb2.square().sum()).backward()
    assert all(torch.equal(g, h) for g, h in zip(grads, [x_apart.grad, a.weight.grad, b.weight.grad]))
    with torch.no_grad():
        y_before = a(x)
        x.mul_(2.0)  # in place: the version counter moves, the cached tiles are not reused
        assert torch.equal(a(x), 2.0 * y_before)
    with torch.inference_mode():  # inference tensors have no version counter: quantised each time
        x_inf = x.detach().clone()
        assert torch.equal(a(x_inf), a(x)) and torch.equal(b(x_inf), b(x))


def test_triton_linear_equals_emulate():
    _, emu = _pair(bias=True, backend="emulate", seed=3)
    _, tri = _pair(bias=True, backend="triton", seed=3)
    torch.manual_seed(4)
    x, g = torch.randn(40, 300), torch.randn(40, 200)
    y_e, dx_e = _run(emu, x, g)
    y_t, dx_t = _run(tri, x, g)
    # bit-identical quantization, same per-block promotion; only FP32 order within a 128-block differs
    # (relative ~1e-7 per sum; 1e-5 leaves margin and is 1000x below an FP8 rounding step)
    torch.testing.assert_close(y_t, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_t, dx_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.weight.grad, emu.weight.grad, rtol=1e-5, atol=1e-5)


def test_from_linear_keeps_parameters():
    lin = nn.Linear(16, 8)
    w = lin.weight
    FP8Linear.from_linear(lin, "emulate")
    assert isinstance(lin, FP8Linear) and lin.weight is w and list(lin.state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match="allowed values"):
        FP8Linear(4, 4, backend="fast")


def test_output_dtype_follows_autocast_like_nn_linear():
    ref, fp8 = _pair(bias=False)
    x = torch.randn(8, 300, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), fp8(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
