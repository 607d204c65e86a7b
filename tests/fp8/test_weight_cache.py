"""FP8 weight caches without the transposes (`fp8.cache_transposed: false`, `cache_transposes`).

Dgrad's FP8 Wᵀ is then made from the cached W in every backward and dropped after its GEMM: the same
bytes as the kept transpose (a transpose of the same blocks and scales), so outputs and gradients are
bit-identical (torch.equal) to the kept ones, over several micro-batches of one step; W itself is
still quantised once per step and stays cached.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from twinpipe.fp8 import FP8Experts, FP8Linear
from twinpipe.fp8.weight_cache import cache_transposes
from twinpipe.model.experts import Experts


class _Layer(nn.Module):
    """An FP8 Linear feeding FP8 experts: both users of the weight cache."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = FP8Linear(200, 300, bias=False, backend="emulate")
        experts = Experts(4, 300, 130)
        experts.reset_parameters(0.05)
        self.experts = FP8Experts.from_experts(experts, "emulate")

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.experts(self.proj(x), idx, w)                                # [n, 300]


def _micro_batches(layer: _Layer, num: int = 3):
    """Outputs, input gradients and the accumulated weight gradients of `num` micro-batches."""
    g = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(num):
        x = torch.randn(24, 200, generator=g).requires_grad_()                   # [n, 200]
        idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)])  # [n, 2]
        y = layer(x, idx, torch.rand(24, 2, generator=g))
        y.backward(torch.randn(y.shape, generator=g))
        outs += [y.detach(), x.grad]
    return outs + [p.grad for p in layer.parameters()]


def _caches(layer: nn.Module):
    return [c for m in layer.modules() for c in getattr(m, "fp8_weight_caches", {}).values()]


def test_transposes_not_kept_are_bit_identical():
    kept = _Layer()
    dropped = copy.deepcopy(kept)
    want = _micro_batches(kept)
    assert all(c._w_t is not None for c in _caches(kept))  # the default keeps them: the check can fail
    cache_transposes(dropped, False)
    got = _micro_batches(dropped)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    caches = _caches(dropped)
    assert len(caches) == 4 and all(c._w is not None and c._w_t is None for c in caches)
    assert all(c.num_quantizations == 1 for c in caches)  # W still quantised once for the three


def test_switching_off_drops_kept_transposes():
    layer = _Layer()
    _micro_batches(layer, num=1)
    cache_transposes(layer, False)
    assert all(c._w_t is None and c._w is not None for c in _caches(layer))
    cache_transposes(layer, True)
    _micro_batches(layer, num=1)
    assert all(c._w_t is not None for c in _caches(layer))
