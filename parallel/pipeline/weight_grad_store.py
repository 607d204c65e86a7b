"""Deferred weight gradients for zero-bubble pipeline schedules (the "W" of F/B/W).

A backward pass splits into B (gradients of the stage inputs, which the previous stage waits for) and W
(gradients of the weights, which nobody waits for). While `WeightGradStore.enabled` is set, layers that
support the split compute only their input gradient and hand the weight gradient to `defer`, which
queues it; `flush()` closes the queue of one backward chunk and `pop()` later runs one closed chunk,
where the schedule has a bubble to fill. Layers that do not support it compute both at once, which
stays correct and only forgoes the gain.

Layers with the split: `linear` below, the grouped expert GEMMs (`zero_bubble.grouped_mm`) and the FP8
Linear/experts (their Wgrad GEMMs, through `defer`); `zero_bubble.split_weight_gradients` puts them in
a model from outside.
"""

from __future__ import annotations

import queue
from typing import Callable

import torch
import torch.nn.functional as F


class WeightGradStore:
    """Process-wide queue of deferred weight-gradient closures (one schedule runs at a time)."""

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: "queue.Queue[list[Callable[[], None]]]" = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

    @classmethod
    def defer(cls, param: torch.Tensor, compute: Callable[[], torch.Tensor]) -> bool:
        """Queue `param.grad += compute()` when the store is enabled (True); else do nothing (False)
        and the caller returns the gradient to autograd itself."""
        if not cls.enabled:
            return False
        cls.put(lambda: accumulate(param, compute()))
        return True

    @classmethod
    def flush(cls) -> None:
        """Close the closures queued since the last flush as one W chunk."""
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest closed W chunk."""
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop(): no deferred weight-gradient chunk is queued")
        with torch.no_grad():  # outside autograd's backward: a gradient must not record a graph
            for func in cls.funcs_queue.get():
                func()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (in the parameter's dtype), as autograd's AccumulateGrad does; a parameter
    with an FP32 `main_grad` (a BF16 parameter, trainer/optim/zero.py) gets `main_grad += grad` rounded
    to its dtype first, as its post-accumulate-grad hook adds autograd's gradient."""
    grad = grad.to(param.dtype)
    if hasattr(param, "main_grad"):
        param.main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def fold_into_main_grads(params: list[torch.Tensor]) -> None:
    """The gradients left in `.grad` of parameters with an FP32 `main_grad` (BF16 parameters) by code
    that accumulates leaves itself instead of autograd's AccumulateGrad (whose hook would have moved
    them), added into main_grad and freed."""
    for p in params:
        if p.grad is not None and hasattr(p, "main_grad"):
            accumulate(p, p.grad)
            p.grad = None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for its device."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _SplitLinear(torch.autograd.Function):
    """F.linear whose weight gradient goes to WeightGradStore when it is enabled.

    Under autocast the operands are cast first and the cast copies saved, as autocast's F.linear does,
    so the forward is F.linear's to the bit and the gradients are those of autograd up to summation
    order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(xc, wc)
        # The parameters themselves, so a deferred W can write into their .grad.
        ctx.params = (weight, bias)
        ctx.x_dtype = x.dtype
        return F.linear(xc, wc, bc)  # [..., out]

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: [..., out]
        xc, wc = ctx.saved_tensors
        weight, bias = ctx.params
        grad_y = grad_y.to(wc.dtype)
        grad_x = (grad_y @ wc).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None  # [..., in]
        x2 = xc.reshape(-1, xc.shape[-1])  # [tokens, in]
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [tokens, out]
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] and not WeightGradStore.defer(weight, lambda: g2.t() @ x2):
            grad_w = (g2.t() @ x2).to(weight.dtype)  # [out, in]
        if bias is not None and ctx.needs_input_grad[2] and not WeightGradStore.defer(bias, lambda: g2.sum(0)):
            grad_b = g2.sum(0).to(bias.dtype)  # [out]
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` whose weight gradient can be deferred (zero-bubble W); same values as F.linear."""
    return _SplitLinear.apply(x, weight, bias)
