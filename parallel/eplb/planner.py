"""The EPLB planner: redundant expert replicas and their placement on GPUs (DeepSeek's expert-parallel
load balancer, docs/reference.md §5: same inputs, outputs and tie-breaking, vectorized over layers).

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)` takes per-layer expert
loads and returns, for every layer, which logical expert each of the `num_replicas` physical slots
holds; slot p lives on GPU p // (num_replicas // num_gpus), and GPU g on node g // (num_gpus //
num_nodes).

- Hierarchical policy (num_groups % num_nodes == 0): pack whole expert groups onto nodes so node loads
  are balanced (group-limited routing then keeps traffic inside nodes), replicate the heaviest experts
  within each node, pack each node's replicas onto its GPUs.
- Global policy (otherwise): the same with one group and one node, i.e. replicate globally and pack
  onto all GPUs.

Options beyond the reference (all off by default, and then the output equals the reference's):
- `avoid_colocation=True`: while packing, a replica avoids GPUs that already hold a replica of the same
  expert whenever a GPU with room does not (a second copy on one GPU balances nothing).
- `refine=True`: after each greedy packing (groups onto nodes, replicas onto GPUs), swap items out of
  the heaviest bin while that lowers it (`refine.py`). The GPU step is never worse than the
  greedy's; after the node step, nodes replicate for their new groups, so only the heaviest node is
  guaranteed no heavier.
- `current_phy2log=[L, R]`: the placement the experts have now. The balanced plan is kept, but nodes,
  GPUs and slots are relabelled to keep as many experts where they already are, so fewer expert
  weights (and optimizer states, during training) move (`relabel.py`). Balancedness is unchanged by
  construction.
- `keep_tolerance=t` (with `current_phy2log`): a replica stays on a GPU that holds its expert now
  unless that GPU's load would pass (1 + t) x the mean; trades a little balance for fewer moves. Best
  with `refine`, which then works only on GPUs above that bound (bench/eplb.py, "drift", has figures).
"""

from __future__ import annotations

import torch

from twinpipe.parallel.eplb.greedy import balanced_packing, inverse_permutation, replicate_experts
from twinpipe.parallel.eplb.refine import refine_packing
from twinpipe.parallel.eplb.relabel import (
    check_placement,
    home_counts,
    keep_placement,
    match_group_nodes,
    replica_ranks,
)


def _check_arguments(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [num_layers, num_experts], got shape {tuple(weight.shape)}")
    num_experts = weight.size(1)
    for name, value in (
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if weight.size(0) < 1 or num_experts < 1:
        raise ValueError(
            f"weight: needs at least one layer and one expert, got shape {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("weight: loads must be finite and non-negative")
    if num_replicas < num_experts:
        raise ValueError(
            f"num_replicas={num_replicas}: fewer replicas than experts ({num_experts}); every expert "
            "needs at least one slot"
        )
    if num_replicas % num_gpus != 0:
        raise ValueError(
            f"num_replicas={num_replicas}: must be divisible by num_gpus={num_gpus} "
            "(every GPU gets the same number of slots)"
        )
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus={num_gpus}: must be divisible by num_nodes={num_nodes}")
    if num_groups % num_nodes == 0 and num_experts % num_groups != 0:
        raise ValueError(
            f"num_groups={num_groups}: the hierarchical policy (num_groups divisible by "
            f"num_nodes={num_nodes}) needs num_groups to divide the number of experts ({num_experts})"
        )


def _rebalance_hierarchical(
    weight: torch.Tensor,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    avoid_colocation: bool,
    refine: bool,
    current: torch.Tensor | None,
    keep_tolerance: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [L, E] fp32 -> phy2log [L, R], phyrank [L, R], logcnt [L, E].

    "mlog" numbers logical experts node-major after group packing: node n holds mlog ids
    n*E/N .. (n+1)*E/N - 1, so each node's experts form one contiguous row for the next two steps.
    current [L, R]: the placement now; nodes are then numbered to overlap it, and with keep_tolerance
    each node's replicas prefer the GPUs that hold their expert now.
    """
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: groups onto nodes, balancing node loads.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)  # [L, groups]
    group_node, group_rank = balanced_packing(group_load, num_nodes)  # [L, groups] each
    if refine:
        group_node, group_rank = refine_packing(group_load, group_node, group_rank, num_nodes)
    if current is not None and num_nodes > 1:
        group_node = match_group_nodes(group_node, current, group_size, num_nodes)
    first_mlog = (group_node * groups_per_node + group_rank) * group_size  # [L, groups]
    log2mlog = (first_mlog.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)  # [L, E]
    mlog2log = inverse_permutation(log2mlog)  # [L, E]

    # Step 2: replicate within each node.
    node_load = weight.gather(-1, mlog2log).view(-1, experts_per_node)  # [L*N, E/N]
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, num_physical // num_nodes)  # [L*N, R/N]

    # Step 3: each node's replicas onto its GPUs.
    replica_load = (node_load / mlogcnt).gather(-1, phy2mlog)  # [L*N, R/N]
    home = home_cap = None
    if keep_tolerance is not None:
        home = home_counts(current, log2mlog, num_nodes, num_gpus)  # [L*N, GPUs/N, R/N]
        home_cap = (1 + keep_tolerance) * node_load.sum(-1) / (num_gpus // num_nodes)  # [L*N]
    gpu, rank_in_gpu = balanced_packing(  # [L*N, R/N] each
        replica_load, num_gpus // num_nodes, phy2mlog,
        separate=avoid_colocation, home=home, home_cap=home_cap,
    )
    if refine:
        labels = phy2mlog if avoid_colocation else None
        gpu, rank_in_gpu = refine_packing(
            replica_load, gpu, rank_in_gpu, num_gpus // num_nodes, labels, good_enough=home_cap
        )
    phy2slot = gpu * slots_per_gpu + rank_in_gpu  # [L*N, R/N]
    slot2phy = inverse_permutation(phy2slot)  # [L*N, R/N]

    slot2mlog = phy2mlog.gather(-1, slot2phy).view(num_layers, num_nodes, -1)  # [L, N, R/N]
    node_offset = torch.arange(0, num_experts, experts_per_node).view(1, -1, 1)  # [1, N, 1]
    slot2mlog = (slot2mlog + node_offset).flatten(-2)  # [L, R]
    phy2log = mlog2log.gather(-1, slot2mlog)  # [L, R]
    rank = phyrank.gather(-1, slot2phy).view(num_layers, -1)  # [L, R]
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)  # [L, E]
    return phy2log, rank, logcnt


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    avoid_colocation: bool = False,
    refine: bool = False,
    current_phy2log: torch.Tensor | None = None,
    keep_tolerance: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan expert replicas for every layer.

    weight: [L, E] load of each logical expert (token counts or a moving average; any real dtype).
    num_replicas: physical expert slots R (a multiple of num_gpus, at least E).
    num_groups: expert groups of the group-limited router; num_nodes, num_gpus: the EP layout.
    avoid_colocation, refine, current_phy2log, keep_tolerance: see the module docstring.

    Returns (CPU, int64):
        phy2log [L, R]: logical expert held by each physical slot;
        log2phy [L, E, R - E + 1]: physical slots of each logical expert, padded with -1;
        logcnt [L, E]: number of replicas of each logical expert.
    """
    _check_arguments(weight, num_replicas, num_groups, num_nodes, num_gpus)
    weight = weight.detach().float().cpu()
    num_layers, num_experts = weight.shape
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    current = None
    if current_phy2log is not None:
        current = check_placement(current_phy2log, num_layers, num_replicas, num_experts)
    elif keep_tolerance is not None:
        raise ValueError("keep_tolerance: needs current_phy2log (the placement to keep)")
    if keep_tolerance is not None and not keep_tolerance >= 0:
        raise ValueError(
            f"keep_tolerance={keep_tolerance}: must be >= 0 (a fraction of the mean GPU load)"
        )
    phy2log, rank, logcnt = _rebalance_hierarchical(
        weight, num_replicas, num_groups, num_nodes, num_gpus,
        avoid_colocation, refine, current, keep_tolerance,
    )
    if current is not None:
        phy2log = keep_placement(phy2log, current, num_experts, num_nodes, num_gpus)
        rank = replica_ranks(phy2log)

    max_count = num_replicas - num_experts + 1
    log2phy = torch.full((num_layers, num_experts * max_count), -1, dtype=torch.int64)
    slots = torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1)  # [L, R]
    log2phy.scatter_(-1, phy2log * max_count + rank, slots)
    return phy2log, log2phy.view(num_layers, num_experts, max_count), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load of each GPU when every expert's load splits evenly over its replicas.

    weight [L, E], phy2log [L, R] -> [L, num_gpus] fp64 (fp64 so metrics do not depend on summation
    order).
    """
    weight = weight.detach().double().cpu()
    num_layers, num_experts = weight.shape
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    logcnt.scatter_add_(-1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    per_slot = (weight / logcnt.clamp(min=1)).gather(-1, phy2log)  # [L, R]
    return per_slot.view(num_layers, num_gpus, -1).sum(-1)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max over mean GPU load per layer ([L] fp64; 1.0 is perfect; layers with no load give 1.0)."""
    loads = gpu_loads(weight, phy2log, num_gpus)  # [L, G]
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.max(-1).values / mean.clamp(min=1e-300), torch.ones_like(mean))


def colocated_replicas(phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Number of redundant same-expert copies sharing a GPU, per layer ([L] int64): a GPU holding
    three replicas of one expert counts 2."""
    num_layers, num_slots = phy2log.shape
    per_gpu = phy2log.view(num_layers * num_gpus, -1).sort(-1).values  # [L*G, R/G]
    repeats = (per_gpu[:, 1:] == per_gpu[:, :-1]).sum(-1)  # [L*G]
    return repeats.view(num_layers, num_gpus).sum(-1)
