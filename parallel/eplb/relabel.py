"""Keep experts where they are: relabel a balanced EPLB plan to overlap the current placement.

A plan's balance depends only on which experts share a GPU, not on which GPU that is. So the nodes
(hierarchical policy, right after groups are packed), then the GPUs within each node, are matched to
the current ones by the experts they already hold (a greedy maximum-overlap matching improved by
pairwise exchanges, vectorized over layers), and within each GPU an expert that stays keeps its old
slot. `home_counts` feeds the optional stickier packing (`keep_tolerance`), which also changes which
replicas share a GPU. Every replica that lands on a GPU which did not hold that expert before is a
"moved" expert: its weights (and during training its optimizer state) must be copied in.
"""

from __future__ import annotations

import torch


def _histogram(phy2log: torch.Tensor, num_bins: int, num_experts: int) -> torch.Tensor:
    """phy2log [X, R] -> replicas of each expert in each of num_bins equal slot ranges [X, bins, E]."""
    num_rows = phy2log.size(0)
    per_bin = phy2log.view(num_rows, num_bins, -1)  # [X, bins, R/bins]
    counts = torch.zeros(num_rows, num_bins, num_experts, dtype=torch.float32)
    return counts.scatter_add_(-1, per_bin, torch.ones_like(per_bin, dtype=torch.float32))


def _overlap(new_counts: torch.Tensor, old_counts: torch.Tensor) -> torch.Tensor:
    """Multiset overlap sum_e min(new[a, e], old[b, e]) for all bin pairs: [X, K, E] x2 -> [X, K, K].

    min(x, y) = sum_{k >= 1} [x >= k][y >= k] for counts, so this is a few exact fp32 batched matmuls
    instead of a [X, K, K, E] tensor.
    """
    overlap = torch.zeros(new_counts.size(0), new_counts.size(1), old_counts.size(1))
    top = int(torch.minimum(new_counts.max(), old_counts.max()).item())
    for k in range(1, top + 1):
        overlap += torch.bmm((new_counts >= k).float(), (old_counts >= k).float().transpose(1, 2))
    return overlap


def _greedy_matching(score: torch.Tensor) -> torch.Tensor:
    """score [X, K, K] >= 0 -> perm [X, K]: new bin a goes to old bin perm[a]; repeatedly takes the
    highest-scoring unmatched pair (lowest indices on ties)."""
    num_rows, k, _ = score.shape
    score = score.clone()
    perm = torch.empty(num_rows, k, dtype=torch.int64)
    rows = torch.arange(num_rows)
    for _ in range(k):
        best = score.view(num_rows, -1).argmax(-1)  # [X]
        a, b = best // k, best % k
        perm[rows, a] = b
        score[rows, a, :] = -1.0
        score[rows, :, b] = -1.0
    return perm


def _improve_matching(score: torch.Tensor, perm: torch.Tensor, max_rounds: int = 64) -> torch.Tensor:
    """2-opt on a matching: while exchanging the targets of two bins raises the total score, make the
    best such exchange (per row, vectorized). score [X, K, K], perm [X, K] -> improved perm."""
    num_rows, k, _ = score.shape
    perm = perm.clone()
    rows = torch.arange(num_rows)
    for _ in range(max_rounds):
        own = score.gather(-1, perm.unsqueeze(-1)).squeeze(-1)  # [X, K] score[a, perm[a]]
        cross = score.gather(-1, perm.unsqueeze(1).expand(-1, k, -1))  # [X, K, K] score[a, perm[b]]
        gain = cross + cross.transpose(1, 2) - own[:, :, None] - own[:, None, :]  # [X, a, b]
        best = gain.view(num_rows, -1).argmax(-1)  # [X]
        better = gain.view(num_rows, -1)[rows, best] > 0.5  # scores are integers
        if not better.any():
            break
        r, a, b = rows[better], best[better] // k, best[better] % k
        pa, pb = perm[r, a].clone(), perm[r, b].clone()
        perm[r, a], perm[r, b] = pb, pa
    return perm


def _move_bins(phy2log: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Move slot range a of each row to position perm[a]: [X, R], [X, K] -> [X, R]."""
    num_rows, num_bins = perm.shape
    per_bin = phy2log.view(num_rows, num_bins, -1)  # [X, K, R/K]
    index = perm.unsqueeze(-1).expand_as(per_bin)
    return torch.empty_like(per_bin).scatter_(1, index, per_bin).view(num_rows, -1)


def _match_bins(new: torch.Tensor, old: torch.Tensor, num_bins: int, num_experts: int) -> torch.Tensor:
    score = _overlap(_histogram(new, num_bins, num_experts), _histogram(old, num_bins, num_experts))
    perm = _improve_matching(score, _greedy_matching(score))
    return _move_bins(new, perm)


def _keep_slots(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Reorder each row of new [X, S] so items also in old [X, S] keep old's positions."""
    num_rows, num_slots = new.shape
    rows = torch.arange(num_rows)
    out = torch.full_like(new, -1)
    used = torch.zeros_like(new, dtype=torch.bool)
    for s in range(num_slots):
        same = (new == old[:, s : s + 1]) & ~used  # [X, S]
        found = same.any(-1)  # [X]
        pick = same.int().argmax(-1)  # [X]
        out[:, s] = torch.where(found, new[rows, pick], out[:, s])
        used[rows[found], pick[found]] = True
    # The remaining items fill the remaining slots in their original order.
    free_slots = (out >= 0).int().argsort(dim=-1, stable=True)  # free slots first
    unused = used.int().argsort(dim=-1, stable=True)  # unused items first
    fill = torch.empty_like(new).scatter_(-1, free_slots, new.gather(-1, unused))
    return torch.where(out >= 0, out, fill)


def check_placement(
    current_phy2log: torch.Tensor, num_layers: int, num_replicas: int, num_experts: int
) -> torch.Tensor:
    """Validate a current placement [L, R] of expert ids; returns it as a CPU int64 tensor."""
    if tuple(current_phy2log.shape) != (num_layers, num_replicas):
        raise ValueError(
            f"current_phy2log: shape {tuple(current_phy2log.shape)} must equal the plan's "
            f"[num_layers, num_replicas] = {(num_layers, num_replicas)}"
        )
    current = current_phy2log.detach().cpu().to(torch.int64)
    if current.min() < 0 or current.max() >= num_experts:
        raise ValueError(
            f"current_phy2log: expert ids must lie in [0, {num_experts}), got "
            f"[{int(current.min())}, {int(current.max())}]"
        )
    return current


def match_group_nodes(
    group_node: torch.Tensor, current: torch.Tensor, group_size: int, num_nodes: int
) -> torch.Tensor:
    """Renumber the nodes of a group packing group_node [L, groups] so each new node is the current
    node holding most of its experts now (current [L, R]); returns the renumbered [L, groups]."""
    num_layers, num_groups = group_node.shape
    num_experts = num_groups * group_size
    expert_node = group_node.repeat_interleave(group_size, dim=-1)  # [L, E]
    new = torch.zeros(num_layers, num_nodes, num_experts)  # [L, N, E] 1 where the expert will live
    new.scatter_(1, expert_node.unsqueeze(1), 1.0)
    old = (_histogram(current, num_nodes, num_experts) > 0).float()  # [L, N, E]
    score = torch.bmm(new, old.transpose(1, 2))  # [L, N, N]
    perm = _improve_matching(score, _greedy_matching(score))  # [L, N]
    return perm.gather(-1, group_node)


def home_counts(current: torch.Tensor, log2mlog: torch.Tensor, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Copies of each node-local expert on each GPU now: [L*N, GPUs/N, R/N].

    current [L, R] holds logical ids; log2mlog [L, E] maps them to the node-major numbering of the new
    plan, where node n's experts are n*E/N + (0 .. E/N-1). Experts that now belong to another node
    count nowhere. The last dimension is R/N (>= E/N) so it can index item labels of the packing.
    """
    num_layers, num_slots = current.shape
    experts_per_node = log2mlog.size(1) // num_nodes
    gpus_per_node = num_gpus // num_nodes
    mlog = log2mlog.gather(-1, current).view(num_layers, num_nodes, -1)  # [L, N, R/N]
    local = mlog - (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)  # [L, N, R/N]
    here = (local >= 0) & (local < experts_per_node)
    local = torch.where(here, local, torch.zeros_like(local))
    per_gpu = local.view(num_layers * num_nodes, gpus_per_node, -1)  # [L*N, GPUs/N, R/G]
    counts = torch.zeros(num_layers * num_nodes, gpus_per_node, num_slots // num_nodes, dtype=torch.int64)
    return counts.scatter_add_(-1, per_gpu, here.view_as(per_gpu).to(torch.int64))


def keep_placement(
    phy2log: torch.Tensor,
    current: torch.Tensor,
    num_experts: int,
    num_nodes: int,
    num_gpus: int,
) -> torch.Tensor:
    """Relabel the GPUs within each node, then the slots within each GPU, of a plan phy2log [L, R] to
    overlap the current placement [L, R] (nodes were matched before, by `match_group_nodes`).

    num_nodes: the node count the plan was made with (1 for the global policy: then GPUs are matched
    across the whole layer).
    """
    num_layers, num_slots = phy2log.shape
    node_rows = num_layers * num_nodes
    plan = _match_bins(
        phy2log.reshape(node_rows, -1), current.reshape(node_rows, -1), num_gpus // num_nodes, num_experts
    )
    slots_per_gpu = num_slots // num_gpus
    plan = _keep_slots(plan.reshape(-1, slots_per_gpu), current.reshape(-1, slots_per_gpu))
    return plan.view(num_layers, num_slots)


def replica_ranks(phy2log: torch.Tensor) -> torch.Tensor:
    """Replica index of each slot among its expert's slots, counted in slot order: [L, R] -> [L, R]."""
    order = phy2log.sort(dim=-1, stable=True).indices  # [L, R]
    sorted_experts = phy2log.gather(-1, order)
    positions = torch.arange(phy2log.size(-1)).expand_as(phy2log)
    starts = torch.ones_like(sorted_experts, dtype=torch.bool)
    starts[:, 1:] = sorted_experts[:, 1:] != sorted_experts[:, :-1]
    run_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(-1).values
    return torch.empty_like(order).scatter_(-1, order, positions - run_start)


def moved_experts(current_phy2log: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Replicas per layer that land on a GPU which did not hold that expert before ([L] int64)."""
    num_experts = int(max(phy2log.max().item(), current_phy2log.max().item())) + 1
    new = _histogram(phy2log, num_gpus, num_experts)  # [L, G, E]
    old = _histogram(current_phy2log.to(torch.int64), num_gpus, num_experts)
    return (new - old).clamp(min=0).sum((-1, -2)).to(torch.int64)
