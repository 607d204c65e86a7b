"""Split the weight gradients off every V3 layer for zero-bubble schedules, applied from outside.

DualPipe and DualPipeV run some backward chunks as B only (input gradients, which the previous stage
waits for) and fill bubbles later with W chunks (weight gradients, `WeightGradStore`). That pays only
if the layers can defer their weight-gradient GEMMs. `split_weight_gradients(model)` swaps, in place,
the class of every layer that has such GEMMs for a subclass that defers them while the store is
enabled; parameters, state-dict names, hooks and devices stay, the model holds no pipeline code:

    nn.Linear    -> SplitLinear        attention projections, dense MLP, shared experts, MTP eh_proj,
                                       lm_head: dW = dYᵀ·X deferred (`weight_grad_store.linear`)
    Experts      -> SplitExperts       the three grouped expert GEMMs: dW[e] = dY_eᵀ·X_e deferred
    FP8Linear    -> SplitFP8Linear     the FP8 Wgrad GEMM deferred (`FP8Linear.defer_weight_grad`)
    FP8Experts   -> SplitFP8Experts    the k-grouped FP8 Wgrad GEMMs deferred

Only these exact classes are swapped (a subclass we do not know keeps its own backward). Apply it
after the FP8 swap (which looks for plain `nn.Linear`) and after expert parallelism or not (the local
experts keep their class through `Experts.select`). Not split: the MoE router's gate (an fp32
F.linear inside `Gate`), the embedding and norms; their gradients are computed in B, which is
correct, only not deferred. Outside a zero-bubble B chunk every split layer computes both gradients at
once; forwards are the original ones to the bit, gradients equal up to summation order.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from twinpipe.fp8.experts import FP8Experts
from twinpipe.fp8.linear import FP8Linear
from twinpipe.model.experts import Experts, _grouped_mm_ok, scaled_rows, segment_mm
from twinpipe.model.experts import grouped_mm as model_grouped_mm
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore, compute_dtype, linear

log = logging.getLogger(__name__)

def _padded_rows(counts: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert of each sorted row [M], its index within its expert [M], max rows of an expert)."""
    experts = torch.arange(counts.numel(), device=counts.device)
    expert_of_row = torch.repeat_interleave(experts, counts, output_size=num_rows)      # [M]
    starts = counts.cumsum(0) - counts                                                   # [E]
    row_in_expert = torch.arange(num_rows, device=counts.device) - starts[expert_of_row]  # [M]
    return expert_of_row, row_in_expert, int(counts.max()) if num_rows else 0


def segment_outer(g: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per expert e, g_eᵀ · x_e over its counts[e] contiguous rows: g [M, N], x [M, K] -> [E, N, K].

    The weight gradient of `grouped_mm(x, wᵀ, counts)` (equal to autograd's up to summation order):
    torch._grouped_mm's k-grouped form where it takes the operands, else one padded bmm.
    """
    num_experts = counts.numel()
    if _grouped_mm_ok(g.t(), x) and (g.shape[1] * g.element_size()) % 16 == 0:  # M, K and N aligned
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(g.t(), x, offs=offs)                                   # [E, N, K]
    expert_of_row, row_in_expert, max_count = _padded_rows(counts, x.shape[0])
    gp = g.new_zeros(num_experts, max_count, g.shape[1])                                 # [E, C, N]
    xp = x.new_zeros(num_experts, max_count, x.shape[1])                                 # [E, C, K]
    gp[expert_of_row, row_in_expert] = g
    xp[expert_of_row, row_in_expert] = x
    return torch.bmm(gp.transpose(1, 2), xp)                                             # [E, N, K]


class _SplitGroupedMM(torch.autograd.Function):
    """y = x · w[e]ᵀ per contiguous expert segment (the model's `grouped_mm(x, wᵀ, counts)`), whose
    weight gradient goes to WeightGradStore when it is enabled."""

    @staticmethod
    def forward(ctx, x, weight, counts):  # x [M, K], weight [E, N, K], counts [E]
        dtype = compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc, counts)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return model_grouped_mm(xc, wc.transpose(1, 2), counts)                          # [M, N]

    @staticmethod
    def backward(ctx, grad_y):  # [M, N]
        xc, wc, counts = ctx.saved_tensors
        weight = ctx.weight
        grad_y = grad_y.to(wc.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = model_grouped_mm(grad_y, wc, counts).to(ctx.x_dtype)                # [M, K]
        if ctx.needs_input_grad[1] and not WeightGradStore.defer(
                weight, lambda: segment_outer(grad_y, xc, counts)):
            grad_w = segment_outer(grad_y, xc, counts).to(weight.dtype)                  # [E, N, K]
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The model's `grouped_mm(x, weight.transpose(1, 2), counts)` with a deferrable weight gradient:
    x [M, K], weight [E, N, K] -> [M, N]."""
    return _SplitGroupedMM.apply(x, weight, counts)


class SplitLinear(nn.Linear):
    """nn.Linear whose weight gradient is deferred in zero-bubble B chunks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class SplitExperts(Experts):
    """`Experts` whose three grouped GEMMs defer their weight gradients in zero-bubble B chunks."""

    def grouped_swiglu(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """[M, H] tokens sorted by expert, counts [E] -> [M, H], with `weight` [M] scaled by the gate
        weights (as `Experts.grouped_swiglu`; the down GEMM is recomputed for their gradient)."""
        gate = grouped_mm(x_sorted, self.gate_proj, counts)                              # [M, I]
        up = grouped_mm(x_sorted, self.up_proj, counts)                                  # [M, I]
        h = torch.nn.functional.silu(gate) * up                                          # [M, I]
        y = grouped_mm(h, self.down_proj, counts)                                        # [M, H]
        if weight is None:
            return y
        recompute = functools.partial(_down_again, compute_dtype(h))
        return scaled_rows(y, weight, x_sorted.dtype, recompute, h, self.down_proj, counts)


def _down_again(dtype: torch.dtype, h: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The down GEMM's output as `_SplitGroupedMM` computed it in the forward (in `dtype`)."""
    return segment_mm(h.to(dtype), w_down.to(dtype).transpose(1, 2), counts)


class SplitFP8Linear(FP8Linear):
    """FP8Linear whose FP8 Wgrad GEMM is deferred in zero-bubble B chunks."""

    defer_weight_grad = staticmethod(WeightGradStore.defer)


class SplitFP8Experts(FP8Experts):
    """FP8Experts whose k-grouped FP8 Wgrad GEMMs are deferred in zero-bubble B chunks."""

    defer_weight_grad = staticmethod(WeightGradStore.defer)


SPLIT_CLASSES: dict[type, type] = {nn.Linear: SplitLinear, Experts: SplitExperts,
                                   FP8Linear: SplitFP8Linear, FP8Experts: SplitFP8Experts}


def split_weight_gradients(model: nn.Module) -> dict[str, int]:
    """Swap, in place, every layer of `model` with weight-gradient GEMMs for its W-deferring class
    (module docstring). Returns how many modules of each original class were swapped."""
    swapped: dict[str, int] = {}
    for module in model.modules():
        split = SPLIT_CLASSES.get(type(module))
        if split is not None:
            swapped[type(module).__name__] = swapped.get(type(module).__name__, 0) + 1
            module.__class__ = split
    log.info("zero bubble: weight gradients split off in %s",
             ", ".join(f"{n} {name}" for name, n in sorted(swapped.items())) or "no layer")
    return swapped
