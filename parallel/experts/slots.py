"""Physical expert slots: the tables that say which logical expert each slot serves, and where slots live.

An expert-parallel (EP) group of `ep` ranks holds R >= E physical slots, S = R / ep per rank; slot p
lives on EP rank p // S and serves logical expert `phy2log[p]`. Without redundancy R = E and slot p is
expert p; with EPLB replicas (docs/reference.md §5) an expert has `logcnt[e]` slots, listed in
`log2phy[e]`. Every rank of the group holds the same `phy2log`.

Node-limited routing (docs/reference.md §1): with the identity placement, expert e sits on EP rank
e // (E/ep); the gate's group limit (`n_group` groups, `topk_group` kept) is node-limited routing when
each node's ranks hold whole groups, which `group_to_nodes` checks and returns.
"""

from __future__ import annotations

import torch


def group_to_nodes(num_experts: int, n_group: int, ep_size: int, num_nodes: int) -> list[int]:
    """Node of each expert group under the identity placement (expert e on EP rank e // (E/ep)).

    A group must not straddle nodes, otherwise the gate's group limit is not a node limit."""
    if ep_size % num_nodes:
        raise ValueError(f"ep={ep_size} is not a multiple of num_nodes={num_nodes}")
    if num_experts % n_group or num_experts % ep_size:
        raise ValueError(f"n_routed_experts={num_experts} must be divisible by n_group={n_group} "
                         f"and by ep={ep_size}")
    experts_per_node = num_experts // num_nodes
    experts_per_group = num_experts // n_group
    if experts_per_node % experts_per_group:
        raise ValueError(f"n_group={n_group} groups of {experts_per_group} experts straddle the "
                         f"{num_nodes} nodes ({experts_per_node} experts each): node-limited routing "
                         f"needs n_group to be a multiple of num_nodes")
    return [g * experts_per_group // experts_per_node for g in range(n_group)]


def placement_tables(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log[R] -> (log2phy[E, maxcnt] slots of each expert ascending, -1 padded; logcnt[E])."""
    logcnt = torch.bincount(phy2log, minlength=num_experts)                       # [E]
    if int(logcnt.min()) < 1:
        missing = torch.nonzero(logcnt == 0).flatten().tolist()
        raise ValueError(f"placement has no slot for logical experts {missing}")
    maxcnt = int(logcnt.max())
    order = torch.argsort(phy2log, stable=True)                                   # [R] slots by expert
    start = torch.cumsum(logcnt, 0) - logcnt                                      # [E]
    rank_in_expert = torch.arange(phy2log.numel(), device=phy2log.device) - start[phy2log[order]]  # [R]
    log2phy = torch.full((num_experts, maxcnt), -1, dtype=torch.int64, device=phy2log.device)
    log2phy[phy2log[order], rank_in_expert] = order
    return log2phy, logcnt
