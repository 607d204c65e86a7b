"""Gradient reduction of the expert slots over the data-parallel ranks that hold copies of them.

The groups come from the process grid (`twinpipe.parallel.grid.build_grid`): inside a data-parallel
(DP) group, an EP group is `ep` consecutive DP ranks (they shard the experts and exchange tokens) and
an expert-data-parallel (EDP) group is the DP ranks at the same EP position (they hold the same slots).

Gradient convention (the same as DeepSpeed's data-parallel average): every DP rank back-propagates its
own loss; dense gradients are averaged over DP; an expert slot's gradient already holds the
contributions of all tokens of its EP group, so it is *summed* over the ranks holding the same logical
expert and divided by `dp`. With redundant EPLB replicas the copies of one logical expert sit on
different slots (and ranks), so their gradients are summed per logical expert over the whole DP group
and written back to every copy, which keeps the replicas identical (what `rebalance.py` relies on).

The trainer's ZeRO-1 optimizer (`twinpipe.trainer.optim.optimizer`) leaves the expert parameters
(`layer.is_expert_param`) to a local AdamW and calls `reduce_expert_grads` after the backward. A slot
parameter's gradient is its FP32 `main_grad` where it has one (BF16 parameters), else `p.grad`. With
optim.shard_experts the reduction stays an all-reduce, every member keeping the whole reduced gradient
(the optimizer updates its 1/edp chunk from it): the global norm (`expert_grad_sq`) needs each slot's
whole gradient to stay bit for bit the unsharded run's (a norm summed from chunks would add in another
order, and the clip coefficient with it), and with EPLB replicas the reduction runs over the dp group,
not the edp group a reduce-scatter would split over.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.experts.layer import ExpertParallelExperts, expert_parallel_layers


def _fp32_grad(p: nn.Parameter) -> torch.Tensor | None:
    """A slot parameter's FP32 gradient: its `main_grad` where the optimizer keeps one (BF16 parameters),
    else `p.grad`."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def _local_grads(layer: nn.Module) -> list[torch.Tensor]:
    """Gradients of a layer's local expert params ([S, ...] each), zeros where none was produced."""
    grads = []
    for p in layer.local.parameters():
        if hasattr(p, "main_grad"):
            grads.append(p.main_grad)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, edp_group: dist.ProcessGroup | None,
                        dp_group: dist.ProcessGroup | None, dp_size: int) -> None:
    """Sum expert gradients over the copies of each logical expert and divide by `dp_size`.

    Without redundant replicas (R = E) a slot's copies are exactly its EDP group: one all-reduce of the
    local slots. With replicas, the local slots are summed per logical expert into an [E, ...]
    buffer, all-reduced over the DP group and written back to every local copy."""
    for layer in expert_parallel_layers(model):
        grads = _local_grads(layer)
        if layer.num_slots == layer.num_experts:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=edp_group)
            flat.div_(dp_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            continue
        ids = layer.local_logical_ids()                                       # [S]
        per_expert = [torch.zeros((layer.num_experts,) + g.shape[1:], dtype=g.dtype).index_add_(0, ids, g)
                      for g in grads]                                         # [E, ...] each
        flat = torch.cat([b.flatten() for b in per_expert])
        dist.all_reduce(flat, group=dp_group)
        flat.div_(dp_size)
        offset = 0
        for g, b in zip(grads, per_expert):
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
            g.copy_(b[ids])


def expert_grad_sq(model: nn.Module, counted: Callable[[str], bool] = lambda name: True) -> torch.Tensor:
    """Squared gradient norm of this rank's expert slots, each *logical* expert counted once: a slot
    whose expert has c replicas (EPLB) weighs 1/c, so the global norm (summed over the ep group)
    equals the one of the same model without expert parallelism. Only layers whose module name
    `counted(name)` accepts contribute (pipeline copies are counted on one rank).

    A 0-d float64 tensor on the gradients' device (on the host where no layer counts): summed there,
    in float64 and parameter by parameter, so the step reads it back with its other values."""
    total = None
    for name, layer in model.named_modules():
        if not isinstance(layer, ExpertParallelExperts) or not counted(name):
            continue
        weight = 1.0 / layer.logcnt[layer.local_logical_ids()].double()  # [S]
        for p in layer.local.parameters():
            grad = _fp32_grad(p)
            if grad is not None:
                if total is None:
                    total = torch.zeros((), dtype=torch.float64, device=grad.device)
                per_slot = grad.double().pow(2).flatten(1).sum(1)  # [S]
                total += (per_slot * weight.to(grad.device)).sum()
    return torch.zeros((), dtype=torch.float64) if total is None else total
