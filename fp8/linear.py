"""FP8 Linear: all three GEMMs in E4M3 with FP32 accumulation (DeepSeek-V3 §3.3).

    Fprop  Y  = X · Wᵀ     X 1×128 tiles along K,      W 128×128 blocks
    Dgrad  dX = dY · W     dY 1×128 tiles along N,     Wᵀ = the same 128×128 blocks transposed
    Wgrad  dW = dYᵀ · X    dYᵀ and Xᵀ both 1×128 tiles along the token dimension

The input is saved for backward in FP8 (q + 1×128 scales), not in BF16, one copy for the Linears that
read the same input (`quantized_input`); for Wgrad it is dequantized and requantized along the token
dimension (the report's 1×128 -> 128×1 tile conversion). The weight is quantized once per optimizer
step (`twinpipe.fp8.weight_cache`).

Zero-bubble pipelines take the Wgrad GEMM out of the backward: a subclass sets `defer_weight_grad`, a
callable `(param, compute) -> bool` that queues `compute` (the Wgrad GEMM, run later) and says whether
it did (`twinpipe.parallel.pipeline.zero_bubble`); the values are the same either way.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from twinpipe.fp8.backend import BACKENDS, Backend, get_backend
from twinpipe.fp8.quant import GRAD_AMAX_FLOOR, act_dequant
from twinpipe.fp8.weight_cache import WeightCache


def wgrad(backend: Backend, grad_out: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
    """dW = dYᵀ · X in FP8, both operands scaled 1×128 along tokens: dY [T, N], X (q, s) [T, K] -> [N, K]."""
    x_t = act_dequant(x_q, x_s).t()                                 # [K, T] fp32
    xt_q, xt_s = backend.act_quant(x_t)                             # [K, T], [K, ceil(T/128)]
    gt_q, gt_s = backend.act_quant(grad_out.t(), amax_floor=GRAD_AMAX_FLOOR)  # [N, T], [N, ceil(T/128)]
    return backend.gemm(gt_q, gt_s, xt_q, xt_s, torch.float32)     # [N, K]


# input tensor -> ((version, backend), weak refs to its FP8 tiles): see `quantized_input`
_quantized: WeakIdKeyDictionary = WeakIdKeyDictionary()


def quantized_input(x: torch.Tensor, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [T, K] fp8, s [T, nbk]): its 1×128 tiles, shared by the FP8 Linears that read the
    same x (MLA's q_a and kv_a, an MLP's gate and up), so their backward keeps one FP8 copy, not one
    each. Quantisation is deterministic, so sharing changes no value. The entry is found by the tensor
    object and its version counter (an in-place change requantises) and holds the tiles weakly: it
    lives only while a Linear that saved them for backward does (a recomputed region saves nothing,
    so nothing is kept there)."""
    if x.is_inference():  # no version counter to tell an in-place change by (torch.inference_mode)
        return backend.act_quant(x.reshape(-1, x.shape[-1]))
    key = (x._version, backend.name)
    hit = _quantized.get(x)
    if hit is not None and hit[0] == key:
        q, s = hit[1](), hit[2]()
        if q is not None and s is not None:
            return q, s
    q, s = backend.act_quant(x.reshape(-1, x.shape[-1]))            # [T, K] fp8, [T, nbk]
    _quantized[x] = (key, weakref.ref(q), weakref.ref(s))
    return q, s


def deferred(defer: Callable | None, param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> bool:
    """Whether `defer` took the weight gradient `compute` of `param` away to run later."""
    return defer is not None and defer(param, compute)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cache: WeightCache, backend: Backend, defer: Callable | None = None) -> torch.Tensor:
        x_q, x_s = quantized_input(x, backend)                      # [T, K] fp8, [T, nbk]
        w = cache.get(weight, backend)                              # [N, K] fp8, [nbn, nbk]
        device_type = x.device.type
        out_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else x.dtype)                                  # what nn.Linear would return
        y = backend.gemm(x_q, x_s, w.q, w.s, out_dtype)            # [T, N]
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x_q, x_s, weight)
        ctx.cache, ctx.backend, ctx.defer = cache, backend, defer
        ctx.param = weight  # the Parameter itself for a deferred Wgrad (a saved tensor may be a copy)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_q, x_s, weight = ctx.saved_tensors
        backend: Backend = ctx.backend
        g = grad_out.reshape(-1, grad_out.shape[-1])                # [T, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = backend.act_quant(g, amax_floor=GRAD_AMAX_FLOOR)  # [T, N], [T, nbn]
            w_t = ctx.cache.get_transposed(weight, backend)         # [K, N] fp8, [nbk, nbn]
            grad_x = backend.gemm(g_q, g_s, w_t.q, w_t.s, ctx.x_dtype).reshape(ctx.x_shape)

        def weight_grad() -> torch.Tensor:
            return wgrad(backend, g, x_q, x_s).to(weight.dtype)    # [N, K]

        if ctx.needs_input_grad[1] and not deferred(ctx.defer, ctx.param, weight_grad):
            grad_w = weight_grad()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8; same parameters and state dict as nn.Linear."""

    defer_weight_grad: Callable | None = None  # see the module docstring

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(backend)

    def _init_fp8(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"fp8 backend {backend!r}: allowed values are {', '.join(BACKENDS)}")
        self.fp8_backend = backend
        self.fp8_weight_caches = {"weight": WeightCache()}

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str) -> "FP8Linear":
        """Turn `linear` into an FP8Linear in place (its parameters, hooks and device are kept)."""
        linear.__class__ = cls
        linear._init_fp8(backend)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = get_backend(self.fp8_backend, x.device)
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.fp8_weight_caches["weight"], backend,
                                       self.defer_weight_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_backend={self.fp8_backend}"
