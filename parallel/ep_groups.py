"""Process groups of expert parallelism and the gradient reduction of expert parameters.

Inside one data-parallel (DP) group of `dp` ranks (global ranks d_0 .. d_{dp-1}):
  - EP groups: consecutive blocks of `ep` ranks, [d_0 .. d_{ep-1}], [d_ep .. d_{2ep-1}], ...;
    they shard the experts and exchange tokens;
  - expert-data-parallel (EDP) groups: ranks at the same position of every EP group,
    [d_i, d_{i+ep}, d_{i+2ep}, ...]; they hold the same slots and average their gradients.

Gradient convention (the same as DeepSpeed's data-parallel average): every DP rank back-propagates its
own loss; dense gradients are averaged over DP; an expert slot's gradient already holds the
contributions of all tokens of its EP group, so it is *summed* over the ranks holding the same logical
expert and divided by `dp`. With redundant EPLB replicas the copies of one logical expert sit on
different slots (and ranks), so their gradients are summed per logical expert over the whole DP group
and written back to every copy, which keeps the replicas identical.

DeepSpeed ZeRO-1: the expert parameters carry `allreduce = False` (DeepSpeed's `is_moe_param`), so give
the optimizer `expert_param_groups(model)` — dense params in one group, expert params in another with
`moe=True` — or keep the expert params out of the ZeRO optimizer entirely (a plain torch AdamW over
them): their optimizer state is then local, which EPLB needs to move it (see `ep_eplb`). In both
cases call `reduce_expert_grads` after the backward and before the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.expert_parallel import expert_parallel_layers, is_expert_param


@dataclass
class ExpertGroups:
    """This rank's EP and EDP groups, with their global ranks."""
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    ep_ranks: list[int]
    edp_ranks: list[int]


def expert_group_ranks(dp_ranks: list[int], ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """The EP groups and EDP groups (global ranks) of one DP group."""
    dp = len(dp_ranks)
    if ep < 1 or dp % ep:
        raise ValueError(f"parallel.ep={ep} must divide the data-parallel size dp={dp}")
    ep_groups = [dp_ranks[i:i + ep] for i in range(0, dp, ep)]
    edp_groups = [dp_ranks[i::ep] for i in range(ep)]
    return ep_groups, edp_groups


def new_expert_groups(dp_groups: list[list[int]], ep: int) -> ExpertGroups:
    """Create (collectively, on every rank of the world) the EP and EDP groups of all DP groups and
    return this rank's. `dp_groups`: the global ranks of every DP group (one per pipeline stage)."""
    me = dist.get_rank()
    mine: dict[str, tuple[dist.ProcessGroup, list[int]]] = {}
    for dp_ranks in dp_groups:
        ep_groups, edp_groups = expert_group_ranks(list(dp_ranks), ep)
        for kind, groups in (("ep", ep_groups), ("edp", edp_groups)):
            for ranks in groups:
                group = dist.new_group(ranks)
                if me in ranks:
                    mine[kind] = (group, ranks)
    if set(mine) != {"ep", "edp"}:
        raise ValueError(f"rank {me} is in none of the data-parallel groups {dp_groups}")
    return ExpertGroups(mine["ep"][0], mine["edp"][0], mine["ep"][1], mine["edp"][1])


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
