"""Quantize a weight once per optimizer step and reuse it across micro-batches.

A cache entry is valid while the parameter's version counter (`w._version`) and storage pointer are
unchanged. The version counter catches in-place updates done through the parameter itself: every torch
optimizer (`p.add_`, `p.lerp_`, ...) and twinpipe's ZeRO-1 (`param.copy_` under no_grad when it
publishes the updated shards). It does not see writes through `p.data` or through a flat buffer the
parameter views (DeepSpeed ZeRO copies updated weights that way); with such an optimizer call
`invalidate_weight_caches(model)` after every step, for a torch optimizer most simply through
`attach_to_optimizer(model, optimizer)` (a step post-hook).

128×128 blocks are square, so the quantization of Wᵀ is exactly the transpose of the quantization
of W (same blocks, same amax, same per-element division): Dgrad reuses it instead of requantizing.
The transpose is kept with W through the step (one copy per weight: the micro-batches' backwards
reuse it), or, with `cache_transposes(model, False)` (`fp8.cache_transposed: false`), made in each
backward from the cached W and dropped after its GEMM: half the cache's memory for one transposing
copy of each weight per micro-batch's backward; the values are the same either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class QuantizedWeight(NamedTuple):
    q: torch.Tensor        # [..., N, K] float8_e4m3fn
    s: torch.Tensor        # [..., ceil(N/128), ceil(K/128)] fp32


class WeightCache:
    """One parameter's FP8 copy (and its transpose, made on first use in backward; kept too while
    `keep_transposed`)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._w: QuantizedWeight | None = None
        self._w_t: QuantizedWeight | None = None
        self.num_quantizations = 0
        self.keep_transposed = True

    def invalidate(self) -> None:
        self._key = None
        self._w = None
        self._w_t = None

    def get(self, weight: torch.Tensor, backend) -> QuantizedWeight:
        """W quantized per 128×128 block (cached): q [..., N, K], s [..., nbn, nbk]."""
        key = (weight._version, weight.data_ptr(), weight.device, backend.name)
        if key != self._key:
            q, s = backend.weight_quant(weight.detach())
            self._key, self._w, self._w_t = key, QuantizedWeight(q, s), None
            self.num_quantizations += 1
        return self._w

    def get_transposed(self, weight: torch.Tensor, backend) -> QuantizedWeight:
        """Wᵀ in the same blocks: q [..., K, N] (contiguous), s [..., nbk, nbn]."""
        w = self.get(weight, backend)
        if self._w_t is not None:
            return self._w_t
        w_t = QuantizedWeight(w.q.transpose(-1, -2).contiguous(), w.s.transpose(-1, -2).contiguous())
        if self.keep_transposed:
            self._w_t = w_t
        return w_t


def invalidate_weight_caches(model: nn.Module) -> None:
    """Drop every FP8 weight copy in `model` (call after each optimizer step)."""
    for module in model.modules():
        for cache in getattr(module, "fp8_weight_caches", {}).values():
            cache.invalidate()


def cache_transposes(model: nn.Module, keep: bool) -> None:
    """Whether `model`'s FP8 weight caches keep each weight's transpose through the step (True, the
    default) or make it in every backward and drop it after use (`fp8.cache_transposed`). Call after
    the FP8 swap (`parallelize`); drops the transposes already kept when `keep` is False."""
    for module in model.modules():
        for cache in getattr(module, "fp8_weight_caches", {}).values():
            cache.keep_transposed = keep
            if not keep:
                cache._w_t = None


def attach_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Invalidate `model`'s FP8 weight caches after every `optimizer.step()`; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: invalidate_weight_caches(model))
