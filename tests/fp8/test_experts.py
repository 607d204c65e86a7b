"""FP8Experts: grouped FP8 SwiGLU against the model's Experts, FP8 saved tensors, Triton vs emulate."""

import pytest
import torch

from twinpipe.fp8 import FP8Experts
from twinpipe.model.experts import Experts

E, H, I = 4, 200, 130


def _pair(backend="emulate"):
    torch.manual_seed(0)
    ref = Experts(E, H, I)
    ref.reset_parameters(0.05)
    fp8 = Experts(E, H, I)
    fp8.load_state_dict(ref.state_dict())
    return ref, FP8Experts.from_experts(fp8, backend)


def _routing(n, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    # expert 3 never picked: an empty segment
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(n)])   # [n, k]
    return x, idx, torch.rand(n, k, generator=g)


def _run(module, x, idx, w, g):
    x = x.clone().requires_grad_()
    y = module(x, idx, w)
    y.backward(g)
    return y.detach(), x.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_close_to_fp32_experts_and_empty_expert_gets_zero_grad():
    ref, fp8 = _pair()
    x, idx, w = _routing(40)
    g = torch.randn(40, H)
    y_ref, dx_ref = _run(ref, x, idx, w, g)
    y, dx = _run(fp8, x, idx, w, g)
    # three chained FP8 GEMMs (each ~3.6% from two rounded operands) plus the FP8-cached SwiGLU input:
    # measured 6.3% (y), 7.0% (dx), 7.3-7.6% (weights); 10% bounds them, a wrong scale gives > 50%.
    assert _rel(y, y_ref) < 0.10
    assert _rel(dx, dx_ref) < 0.10
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert _rel(getattr(fp8, name).grad, getattr(ref, name).grad) < 0.10
        assert torch.all(getattr(fp8, name).grad[3] == 0)


def test_saved_activations_are_fp8():
    _, fp8 = _pair()
    x, idx, w = _routing(40)
    params = {p.data_ptr() for p in fp8.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    x = x.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_sorted = x[torch.arange(40).repeat_interleave(2)]                  # [80, H]
        saved.clear()
        fp8.grouped_swiglu(x_sorted, torch.tensor([20, 30, 30, 0]))
    big = [t for t in saved if t.numel() >= 80 * 64]
    # x (the expert input) and the SwiGLU input (gate, up) — all FP8; the rest are scales and offsets
    assert sorted(t.shape[-1] for t in big) == [I, I, H]
    assert all(t.dtype == torch.float8_e4m3fn for t in big)


def test_select_keeps_fp8_with_fresh_caches():
    _, fp8 = _pair()
    sub = fp8.select([2, 0, 2])
    assert isinstance(sub, FP8Experts) and sub.fp8_backend == "emulate" and sub.num_experts == 3
    assert sub.fp8_weight_caches["gate_proj"] is not fp8.fp8_weight_caches["gate_proj"]
    torch.testing.assert_close(sub.up_proj[0], fp8.up_proj[2])


def test_state_dict_names_unchanged():
    ref, fp8 = _pair()
    assert list(fp8.state_dict()) == list(ref.state_dict())
    with pytest.raises(ValueError, match="allowed values"):
        FP8Experts.from_experts(Experts(2, 8, 8), "tensorcore")


def test_triton_experts_equal_emulate():
    _, emu = _pair("emulate")
    _, tri = _pair("triton")
    x, idx, w = _routing(12, seed=2)
    g = torch.randn(12, H)
    y_e, dx_e = _run(emu, x, idx, w, g)
    y_t, dx_t = _run(tri, x, idx, w, g)
    # identical quantization; FP32 order within a 128-block differs (~1e-7 relative): an intermediate
    # (gate, up, dh) may land on the other side of an E4M3 rounding boundary, moving that element by one
    # FP8 step (2^-3 relative); over the outputs that stays below 1e-3 relative (Frobenius)
    assert _rel(y_t, y_e) < 1e-3
    assert _rel(dx_t, dx_e) < 1e-3
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert _rel(getattr(tri, name).grad, getattr(emu, name).grad) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_inside_equals_weight_after_and_keeps_h_not_y(dtype):
    """The gate weight applied inside `FP8GroupedSwiGLU`: output and every gradient equal to the former
    `(y * w).to(x.dtype)` after the experts, bit for bit (y is recomputed from the kept FP8 down-GEMM
    input and the same cached weight); saved: h in FP8 (I bytes and a scale per 128 per row, whole
    tiles) instead of y (H in x's dtype)."""
    from tests.model.test_experts_weight import inputs, old_forward, run

    _, fp8 = _pair()
    fp8.to(dtype)
    x, idx, weight = inputs(fp8, 40, dtype)
    probe = torch.randn(40, H)
    new = run(type(fp8).forward, fp8, x, idx, weight, probe)
    old = run(old_forward, fp8, x, idx, weight, probe)
    for got, want in zip(new[:3], old[:3]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for name, want in old[3].items():
        assert torch.equal(new[3][name], want), name
    rows, h_fp8 = 40 * idx.shape[1], (128 + 4) * -(-I // 128)
    assert old[4] - new[4] == rows * (H * x.element_size() - h_fp8), (old[4], new[4])


def _grouped_wgrad_before(backend, grad, x_q, x_s, offsets, out_dtype, block_size=128):
    """The experts' Wgrad before issue 16's memory work (`_grouped_wgrad`): both operands built whole."""
    from twinpipe.fp8.experts import _aligned_layout
    from twinpipe.fp8.quant import GRAD_AMAX_FLOOR, act_dequant

    pos, aligned, length = _aligned_layout(offsets, grad.shape[0], block_size)
    n, k = grad.shape[1], x_q.shape[1]
    grad_t = grad.new_zeros(n, length, dtype=torch.float32)
    grad_t[:, pos] = grad.float().t()
    x_t = grad.new_zeros(k, length, dtype=torch.float32)
    x_t[:, pos] = act_dequant(x_q, x_s).t()
    g_q, g_s = backend.act_quant(grad_t, amax_floor=GRAD_AMAX_FLOOR)
    xt_q, xt_s = backend.act_quant(x_t)
    return backend.k_grouped_gemm(g_q, g_s, xt_q, xt_s, aligned, out_dtype, block_size)


def _backward_before(ctx, grad_y):
    """`FP8GroupedSwiGLU.backward` before issue 16's memory work: every [M, ·] tensor held to the end,
    the two Dgrad outputs and their sum at once. The oracle the new backward must equal bit for bit."""
    import torch.nn.functional as F  # noqa: F401

    from twinpipe.fp8.linear import deferred
    from twinpipe.fp8.quant import GRAD_AMAX_FLOOR, act_dequant
    from twinpipe.model.experts import scale_rows_grads

    x_q, x_s, g_q, g_s, u_q, u_s, w_gate, w_up, w_down, offsets, *weighted = ctx.saved_tensors
    backend, caches = ctx.backend, ctx.caches
    grad_weight = None
    if weighted:
        weight, h_q, h_s = weighted
        y = None
        if ctx.needs_input_grad[8]:
            wd = caches["down_proj"].get(w_down, backend)
            y = backend.grouped_gemm(h_q, h_s, wd.q, wd.s, offsets, ctx.x_dtype)
        grad_y, grad_weight = scale_rows_grads(grad_y, weight, ctx.x_dtype, y)
    gate, up = act_dequant(g_q, g_s), act_dequant(u_q, u_s)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    dy_q, dy_s = backend.act_quant(grad_y, amax_floor=GRAD_AMAX_FLOOR)
    wd_t = caches["down_proj"].get_transposed(w_down, backend)
    dh = backend.grouped_gemm(dy_q, dy_s, wd_t.q, wd_t.s, offsets, torch.float32)
    d_gate = dh * up * sig * (1 + gate * (1 - sig))
    d_up = dh * silu
    grad_x = None
    if ctx.needs_input_grad[0]:
        dg_q, dg_s = backend.act_quant(d_gate, amax_floor=GRAD_AMAX_FLOOR)
        du_q, du_s = backend.act_quant(d_up, amax_floor=GRAD_AMAX_FLOOR)
        wg_t = caches["gate_proj"].get_transposed(w_gate, backend)
        wu_t = caches["up_proj"].get_transposed(w_up, backend)
        grad_x = (backend.grouped_gemm(dg_q, dg_s, wg_t.q, wg_t.s, offsets, torch.float32)
                  + backend.grouped_gemm(du_q, du_s, wu_t.q, wu_t.s, offsets, torch.float32)).to(ctx.x_dtype)
    p_gate, p_up, p_down = ctx.params
    wgrads = {
        1: (p_gate, lambda: _grouped_wgrad_before(backend, d_gate, x_q, x_s, offsets, w_gate.dtype)),
        2: (p_up, lambda: _grouped_wgrad_before(backend, d_up, x_q, x_s, offsets, w_up.dtype)),
        3: (p_down, lambda: _grouped_wgrad_before(backend, grad_y, *backend.act_quant(h), offsets, w_down.dtype)),
    }
    grad_w = {i: compute() for i, (w, compute) in wgrads.items()
              if ctx.needs_input_grad[i] and not deferred(ctx.defer, w, compute)}
    return grad_x, grad_w.get(1), grad_w.get(2), grad_w.get(3), None, None, None, None, grad_weight


def _swiglu_step(function, fp8, x_sorted, counts, weight, probe, wants, defer=None):
    """function.apply's output, the gradients of what `wants` marks (x, gate/up/down, weight) and the
    peak live bytes of the backward above what is held when it starts (`bench.memory.LiveBytes`, each
    FP8 kernel counted as on a GPU: its outputs, not the emulation's temporaries)."""
    import torch.nn.functional as F

    from bench.memory import LiveBytes, as_kernels
    from twinpipe.fp8.backend import get_backend

    fp8.zero_grad(set_to_none=True)
    for name, want in zip(("gate_proj", "up_proj", "down_proj"), wants[1:4]):
        getattr(fp8, name).requires_grad_(want)
    x = x_sorted.clone().requires_grad_(wants[0])
    w = None if weight is None else weight.clone().requires_grad_(wants[4])
    offsets = F.pad(counts.cumsum(0), (1, 0))
    y = function.apply(x, fp8.gate_proj, fp8.up_proj, fp8.down_proj, offsets, fp8.fp8_weight_caches,
                       as_kernels(get_backend("emulate")), defer, w)
    g = probe.to(y.dtype)
    with LiveBytes() as mem:
        start = mem.live
        y.backward(g)
    later = {}
    if defer is not None:  # run what the zero-bubble split took away
        for param, compute in defer.taken:
            later[id(param)] = compute()
    grads = [x.grad, *(getattr(fp8, n).grad if getattr(fp8, n).grad is not None else later.get(id(getattr(fp8, n)))
                       for n in ("gate_proj", "up_proj", "down_proj")), None if w is None else w.grad]
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(fp8, name).requires_grad_(True)
    return y.detach(), grads, mem.peak - start


class _Defer:
    """A zero-bubble split that takes the gate's and the down projection's Wgrad away."""

    def __init__(self, fp8):
        self.params, self.taken = {id(fp8.gate_proj), id(fp8.down_proj)}, []

    def __call__(self, param, compute):
        if id(param) in self.params:
            self.taken.append((param, compute))
            return True
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("wants", [(True,) * 5, (False, True, False, True, False), (True, False, True, False, True)])
def test_backward_equals_the_former_bit_for_bit_with_less_working_memory(dtype, weighted, wants):
    """The backward that drops each [M, ·] tensor once read, quantizes the Wgrad operands as soon as
    they exist (x's once for gate and up) and adds the second Dgrad GEMM's output into the first's:
    output and every gradient torch.equal to the former backward (`_backward_before`, the same
    operations on the same operands), with or without the gate weights, for every subset of inputs
    needing a gradient, and with a zero-bubble split deferring two Wgrads; and its working memory
    (LiveBytes peak above the backward's start, emulate's own temporaries included) is lower."""
    from twinpipe.fp8.experts import FP8GroupedSwiGLU

    class Before(FP8GroupedSwiGLU):
        backward = staticmethod(_backward_before)

    _, fp8 = _pair()
    fp8.to(dtype)
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([70, 0, 130, 57])  # an empty expert, segments not multiples of 128
    m = int(counts.sum())
    x_sorted = torch.randn(m, H, generator=g).to(dtype)
    weight = torch.rand(m, generator=g) if weighted else None
    probe = torch.randn(m, H, generator=g)
    results = {}
    for function in (Before, FP8GroupedSwiGLU):
        for defer in (None, _Defer(fp8)):
            results[function, defer is None] = _swiglu_step(function, fp8, x_sorted, counts, weight, probe, wants,
                                                            defer)
    for plain in (True, False):
        (y0, grads0, peak0), (y1, grads1, peak1) = results[Before, plain], results[FP8GroupedSwiGLU, plain]
        assert torch.equal(y0, y1)
        for i, (a, b) in enumerate(zip(grads0, grads1)):
            assert (a is None) == (b is None), i
            assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), i
    # the working memory without a split, lower; with one, what runs in the backward is a part of that
    # (it quantizes the deferred Wgrads' gradient operands at once: they are held in FP8, not fp32)
    peak_before, peak_now, peak_split = (results[Before, True][2], results[FP8GroupedSwiGLU, True][2],
                                         results[FP8GroupedSwiGLU, False][2])
    assert peak_now < peak_before and peak_split <= peak_now, (peak_now, peak_before, peak_split)
