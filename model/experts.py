"""Routed experts as one grouped GEMM over tokens sorted by expert (no token dropping)."""

from __future__ import annotations

import copy
import functools
import inspect
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands (CPU fp32/bf16, CUDA bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        return False
    align = 16 // x.element_size()
    return ok_dtype and x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and w.shape[-2] % align == 0


def autocast_operands(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w) in the autocast dtype when autocast is on for their device (as a Linear's), else as is."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), w.to(dtype)
    return x, w


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Segment e of x (counts[e] contiguous rows) times w[e]: x [M, K], w [E, K, N] -> [M, N].

    Under autocast both operands take the autocast dtype first (`autocast_operands`)."""
    return segment_mm(*autocast_operands(x, w), counts)


def segment_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` on operands as they are: torch._grouped_mm where it runs, else a padded batched
    matmul (one bmm over [E, max_count, K])."""
    if _grouped_mm_ok(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    E = counts.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # [M]
    starts = counts.cumsum(0) - counts
    row_in_expert = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]  # [M]
    max_count = int(counts.max()) if x.shape[0] else 0
    padded = x.new_zeros(E, max_count, x.shape[1])                                   # [E, C, K]
    padded[expert_of_row, row_in_expert] = x
    return torch.bmm(padded, w)[expert_of_row, row_in_expert]                         # [M, N]


class _SumRows(torch.autograd.Function):
    """zeros_like(like).index_add_(0, index, src) that keeps only `index` for the backward.

    autograd's index_add saves `src` as well (its formula reads the source's shape through
    `expand_as(source)`), though the source's gradient is `grad.index_select(0, index)` and needs no
    values: in the MoE combine `src` is [N*K, H] expert outputs a second time. Same forward and backward
    arithmetic as autograd's, so results and gradients are bit-identical."""

    @staticmethod
    def forward(ctx, like: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return torch.zeros_like(like).index_add_(0, index, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return None, None, grad.index_select(0, index)


def sum_rows(like: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[index[m]] += src[m] into zeros shaped like `like` [N, H]; src [M, H] (its dtype must be
    like's). The backward keeps `index` alone (`_SumRows`)."""
    return _SumRows.apply(like, index, src)


def scale_rows(y: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row of y [M, H] times its gate weight [M], in `dtype`: the combine's product."""
    return (y * weight.unsqueeze(-1)).to(dtype)                                    # [M, H]


def scale_rows_grads(grad: torch.Tensor, weight: torch.Tensor, y_dtype: torch.dtype,
                     y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients autograd computes for `scale_rows(y, weight, dtype)` from the output's gradient,
    with the same arithmetic (the cast back, the product's two gradients, the broadcast's row sum):
    (y's [M, H] in y_dtype, weight's [M]; None without `y`, which only the weight's needs)."""
    g = grad.to(torch.promote_types(y_dtype, weight.dtype))                       # [M, H]
    grad_y = (g * weight.unsqueeze(-1)).to(y_dtype)
    grad_weight = None if y is None else (g * y).sum(-1).to(weight.dtype)          # [M]
    return grad_y, grad_weight


class _ScaledRows(torch.autograd.Function):
    """`scale_rows` that does not keep y for the weight's gradient: the backward recomputes it as
    `recompute(*operands)`, from operands that y's own GEMM keeps anyway (the same tensors, so nothing
    more is held). Forward and gradients are autograd's for `scale_rows`, bit for bit."""

    @staticmethod
    def forward(ctx, y, weight, dtype, recompute, *operands):
        ctx.save_for_backward(weight, *operands)
        ctx.recompute, ctx.y_dtype = recompute, y.dtype
        return scale_rows(y, weight, dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, *operands = ctx.saved_tensors
        y = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                y = ctx.recompute(*operands)                                       # [M, H]
        grad_y, grad_weight = scale_rows_grads(grad, weight, ctx.y_dtype, y)
        return (grad_y, grad_weight, None, None) + (None,) * len(operands)


def scaled_rows(y: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                recompute: Callable[..., torch.Tensor], *operands: torch.Tensor) -> torch.Tensor:
    """`scale_rows(y, weight, dtype)`, whose backward recomputes y = recompute(*operands) for the
    weight's gradient instead of keeping it (`_ScaledRows`)."""
    return _ScaledRows.apply(y, weight, dtype, recompute, *(t.detach() for t in operands))


@functools.lru_cache(maxsize=None)
def _takes_weight(function: Callable) -> bool:
    return "weight" in inspect.signature(function).parameters


def weighted_swiglu(experts: nn.Module, x_sorted: torch.Tensor, counts: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """`experts.grouped_swiglu(x_sorted, counts, weight)`: each output row scaled by its gate weight
    [M] inside. A `grouped_swiglu` that takes no weight (a test's exact row-wise stand-in) gets it
    applied after (`scale_rows`: the same values, but y is kept for the weight's gradient)."""
    function = experts.grouped_swiglu
    if _takes_weight(getattr(function, "__func__", function)):
        return function(x_sorted, counts, weight)
    return scale_rows(function(x_sorted, counts), weight, x_sorted.dtype)


def count_per_expert(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """idx [M] (values in [0, num_experts)) -> [num_experts] int64, how many rows name each expert: the
    values `torch.bincount(idx, minlength=num_experts)` gives, without the host wait bincount makes
    on a GPU (it reads idx's maximum to size its output; here the size is known)."""
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).index_add_(
        0, idx, torch.ones_like(idx, dtype=torch.long))


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate_proj/up_proj [E, I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H], topk_idx [N, K] (local expert ids), topk_weight [N, K] -> y [N, H]."""
        K = topk_idx.shape[1]
        flat_idx = topk_idx.reshape(-1)                                           # [N*K]
        order = flat_idx.argsort(stable=True)                                     # [N*K]
        token = order // K                                                        # [M], M = N*K
        counts = count_per_expert(flat_idx, self.num_experts)                     # [E]
        weight = topk_weight.reshape(-1)[order]                                   # [M]
        y = weighted_swiglu(self, x[token], counts, weight)                       # [M, H], weighted
        return sum_rows(x, token, y)                                              # [N, H]

    def grouped_swiglu(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) per contiguous expert segment: [M, H] -> [M, H]; with `weight`
        [M] each row times its gate weight, in x's dtype (`scale_rows`), recomputing the down GEMM for
        the weight's gradient instead of keeping its output (`scaled_rows`)."""
        gate = grouped_mm(x_sorted, self.gate_proj.transpose(1, 2), counts)      # [M, I]
        up = grouped_mm(x_sorted, self.up_proj.transpose(1, 2), counts)          # [M, I]
        h, w_down = autocast_operands(F.silu(gate) * up, self.down_proj.transpose(1, 2))
        y = segment_mm(h, w_down, counts)                                         # [M, H]; keeps h, w_down
        if weight is None:
            return y
        return scaled_rows(y, weight, x_sorted.dtype, segment_mm, h, w_down, counts)

    def select(self, ids: Sequence[int] | torch.Tensor) -> "Experts":
        """A module of the same class holding copies of expert rows `ids`, in that order (repeats
        allowed: redundant replicas). Other attributes of a subclass (e.g. an FP8 backend) carry over."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.gate_proj.device)
        new = copy.copy(self)
        new._parameters = OrderedDict()
        new._buffers = OrderedDict(self._buffers)
        new._modules = OrderedDict(self._modules)
        for name in ("gate_proj", "up_proj", "down_proj"):
            param = getattr(self, name)
            new.register_parameter(name, nn.Parameter(param.detach()[ids].clone(),
                                                      requires_grad=param.requires_grad))
        new.num_experts = int(ids.numel())
        return new

    def reset_parameters(self, std: float) -> None:
        for param in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(param, std=std)

    def extra_repr(self) -> str:
        e, i, h = self.gate_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={i}"
