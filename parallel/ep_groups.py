"""Expert parameters: which they are, and the reduction of their gradients.

The groups come from the process grid (`twinpipe.parallel.grid.build_grid`): inside a data-parallel
(DP) group, an EP group is `ep` consecutive DP ranks (they shard the experts and exchange tokens) and
an expert-data-parallel (EDP) group is the DP ranks at the same EP position (they hold the same slots).

Gradient convention (the same as DeepSpeed's data-parallel average): every DP rank back-propagates its
own loss; dense gradients are averaged over DP; an expert slot's gradient already holds the
contributions of all tokens of its EP group, so it is *summed* over the ranks holding the same logical
expert and divided by `dp`. With redundant EPLB replicas the copies of one logical expert sit on
different slots (and ranks), so their gradients are summed per logical expert over the whole DP group
and written back to every copy, which keeps the replicas identical.

Composition with ZeRO-1 (DeepSpeed's or the trainer's): the expert parameters carry `allreduce =
False` (DeepSpeed's `is_moe_param` marker); `expert_param_groups(model)` splits them off. Give the
ZeRO optimizer the dense parameters only, and the expert parameters a local torch AdamW — they are
already sharded by EP, and a local state is what EPLB can move (`ep_eplb`). Per step: backward, ZeRO's
dense reduction, `reduce_expert_grads(model, grid.edp_group, grid.dp_group, grid.dp)`, global norm² =
dense part + `expert_grad_norm_sq(model)` (+ sum over pipeline stages), clip, both steps.
(`deepspeed_param_groups` gives DeepSpeed's own MoE grouping, `moe=True`, for engines that create
DeepSpeed's expert groups themselves.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.expert_parallel import expert_parallel_layers, is_expert_param


def expert_param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense params, expert params) of a model after `apply_expert_parallel`."""
    dense, expert = [], []
    for p in model.parameters():
        (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def deepspeed_param_groups(model: nn.Module, **group_options) -> list[dict]:
    """Optimizer param groups for DeepSpeed ZeRO with MoE: the expert group is flagged `moe=True`."""
    dense, expert = expert_param_groups(model)
    groups = [dict(params=dense, **group_options)]
    if expert:
        name = expert[0].group_name
        groups.append(dict(params=expert, moe=True, name=name, **group_options))
    return groups


def _local_grads(layer: nn.Module) -> list[torch.Tensor]:
    """Gradients of a layer's local expert params ([S, ...] each), zeros where none was produced."""
    grads = []
    for p in layer.local.parameters():
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


@torch.no_grad()
def expert_grad_norm_sq(model: nn.Module) -> torch.Tensor:
    """Squared L2 norm (fp64) of the expert gradients after `reduce_expert_grads`, each logical expert
    counted once however many replicas it has: the expert part of the global norm for clipping
    (collective over each EP group; add the dense part, and sum over pipeline stages)."""
    total = torch.zeros((), dtype=torch.float64)
    for layer in expert_parallel_layers(model):
        per_slot = torch.zeros(layer.slots_per_rank, dtype=torch.float64)    # [S]
        for p in layer.local.parameters():
            if p.grad is not None:
                per_slot += p.grad.double().pow(2).flatten(1).sum(1).cpu()
        copies = layer.logcnt[layer.local_logical_ids()].to(torch.float64).cpu()  # [S]
        sq = (per_slot / copies).sum()
        dist.all_reduce(sq, group=layer.ep_group)
        total += sq
    return total
