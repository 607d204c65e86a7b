"""Deferred weight gradients for zero-bubble pipeline schedules (the "W" of F/B/W).

A backward pass splits into B (gradients of the stage inputs, which the previous stage waits for) and W
(gradients of the weights, which nobody waits for). While `WeightGradStore.enabled` is set, layers that
support the split (`linear` below) compute only their input gradient and queue a closure for the weight
gradient; `flush()` closes the queue of one backward chunk and `pop()` later runs one closed chunk, where
the schedule has a bubble to fill. Layers that do not support it compute both at once, which stays
correct and only forgoes the gain.
"""

from __future__ import annotations

import queue
from typing import Callable

import torch


class WeightGradStore:
    """Process-wide queue of deferred weight-gradient closures (one schedule runs at a time)."""

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: "queue.Queue[list[Callable[[], None]]]" = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

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
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _SplitLinear(torch.autograd.Function):
    """y = x W^T + b whose weight gradient is deferred to WeightGradStore when it is enabled."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        # The parameters themselves, so a deferred W can write into their .grad.
        ctx.params = (weight, bias)
        ctx.has_bias = bias is not None
        y = x @ weight.t()  # [..., out]
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: [..., out]
        x, weight = ctx.saved_tensors
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None  # [..., in]
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        g2 = grad_y.reshape(-1, grad_y.shape[-1])  # [tokens, out]
        if WeightGradStore.enabled:
            # Write straight into .grad later; autograd gets None for the weight now.
            w_param, b_param = ctx.params
            need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]

            def weight_grad():
                if need_w:
                    _accumulate(w_param, g2.t() @ x2)
                if need_b:
                    _accumulate(b_param, g2.sum(0))
            WeightGradStore.put(weight_grad)
            return grad_x, None, None
        grad_w = g2.t() @ x2 if ctx.needs_input_grad[1] else None  # [out, in]
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` whose weight gradient can be deferred (zero-bubble W); same values as F.linear."""
    return _SplitLinear.apply(x, weight, bias)
