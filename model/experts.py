"""Routed experts as one grouped GEMM over tokens sorted by expert (no token dropping)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

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


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Segment e of x (counts[e] contiguous rows) times w[e]: x [M, K], w [E, K, N] -> [M, N].

    torch._grouped_mm where it runs, else a padded batched matmul (one bmm over [E, max_count, K]).
    Under autocast both operands take the autocast dtype first (as a Linear would).
    """
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
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
        counts = torch.bincount(flat_idx, minlength=self.num_experts)             # [E]
        y = self.grouped_swiglu(x[token], counts)                                 # [M, H]
        y = (y * topk_weight.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)       # [M, H]
        return sum_rows(x, token, y)                                              # [N, H]

    def grouped_swiglu(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) per contiguous expert segment: [M, H] -> [M, H]."""
        gate = grouped_mm(x_sorted, self.gate_proj.transpose(1, 2), counts)      # [M, I]
        up = grouped_mm(x_sorted, self.up_proj.transpose(1, 2), counts)          # [M, I]
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), counts)  # [M, H]

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
