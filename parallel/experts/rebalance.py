"""EPLB during training: re-plan the physical expert slots and move weights + optimizer state there.

`ExpertRebalancer(model).replan(global_loads_window, optimizer)`:
  1. the planner, `rebalance_experts(loads[L, E], R, n_group, num_nodes, ep, current_phy2log=...)`
     (`twinpipe.parallel.eplb`, docs/reference.md §5), gives every layer's new slot table,
     relabelled to keep as many experts as possible where they are;
  2. each rank works out, from the old and new tables (the same on every rank), which old slot feeds
     each new slot: its own old copy when it has one, else the first rank holding the expert;
  3. one `all_to_all_single` per layer moves the rows — parameters and, for every parameter, each
     optimizer state tensor of the parameter's shape (AdamW's exp_avg and exp_avg_sq, fp32 or bf16),
     packed as bytes so mixed dtypes travel together, bit for bit — and the rows are written in place
     (the Parameter objects, and so the optimizer's references, do not change; a scalar `step` is
     shared by all slots and stays).
Because every copy of a logical expert is identical (replica gradients are summed, see
`grad_reduction`), the model computes the same function after a move: a re-plan changes only which
rank does the work.

Call it between steps (after `optimizer.step()` and `zero_grad()`): expert gradients are dropped.
With optim.shard_experts each member of an expert-data-parallel group keeps the state of its chunk of
every slot (`zero.ExpertAdamW`); the members of the group sit at the same position of their EP groups
and compute the same moves from the same tables, so member k's chunk of a moved slot goes from member k
of the source EP rank to member k of the destination, in that EP group's all-to-all.
ZeRO-1 partitions optimizer state across DP ranks in flat buffers, so a rank cannot move one slot's
moments from its shard alone: the expert parameters' state stays out of those buffers (they are already
sharded by EP) in a plain torch optimizer, passed as `optimizer` (the trainer's `expert_opt`), with one
row (with optim.shard_experts this member's chunk of it, above) per slot.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn

from twinpipe.parallel.eplb import rebalance_experts
from twinpipe.parallel.eplb.planner import balancedness
from twinpipe.parallel.experts.all_to_all import all_to_all
from twinpipe.parallel.experts.layer import ExpertParallelExperts, expert_parallel_layers

logger = logging.getLogger(__name__)


def _state_rows(param: nn.Parameter, optimizer: torch.optim.Optimizer | None,
                followers: Mapping[nn.Parameter, Sequence[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """The per-slot tensors that move with a parameter: itself, its torch-optimizer state with one row
    per slot (AdamW: exp_avg, exp_avg_sq, the parameter's shape, or with optim.shard_experts this
    member's chunk of each slot [S, D/edp, ...]), then its `followers` (tensors of its shape, on any
    device: the CPU EMA's average)."""
    rows = [param.data]
    if optimizer is not None:
        state = optimizer.state.get(param, {})
        rows += [state[k] for k in sorted(state)
                 if torch.is_tensor(state[k]) and state[k].dim() and state[k].shape[0] == param.shape[0]]
    if followers is not None:
        for t in followers.get(param, ()):
            if t.shape != param.shape:
                raise ValueError(f"a tensor following an expert parameter of shape {tuple(param.shape)} "
                                 f"has shape {tuple(t.shape)}")
            rows.append(t)
    return rows


def _pack(tensors: list[torch.Tensor], slots: list[int]) -> torch.Tensor:
    """Rows `slots` of each [S, ...] tensor, as bytes on the first tensor's device: [len(slots), row_bytes] uint8."""
    device = tensors[0].device
    idx = torch.tensor(slots, dtype=torch.int64)
    parts = [t.index_select(0, idx.to(t.device)).reshape(len(slots), -1).contiguous().view(torch.uint8).to(device)
             for t in tensors]
    return torch.cat(parts, dim=1)


def _unpack_into(tensors: list[torch.Tensor], packed: torch.Tensor, slots: list[int]) -> None:
    """Write packed rows into rows `slots` of each tensor (inverse of `_pack`)."""
    offset = 0
    idx = torch.tensor(slots, dtype=torch.int64)
    for t in tensors:
        row_elems = t[0].numel()
        nbytes = row_elems * t.element_size()
        chunk = packed[:, offset:offset + nbytes].contiguous().view(t.dtype).view((len(slots),) + t.shape[1:])
        t.index_copy_(0, idx.to(t.device), chunk.to(t.device))
        offset += nbytes


@torch.no_grad()
def move_slots(layer: ExpertParallelExperts, new_phy2log: torch.Tensor,
               optimizer: torch.optim.Optimizer | None = None,
               followers: Mapping[nn.Parameter, Sequence[torch.Tensor]] | None = None) -> int:
    """Move one layer to the placement `new_phy2log[R]` (its parameters, their `optimizer` state and
    `followers`); returns the number of slots received from other ranks (rows that crossed the network)."""
    old = layer.phy2log.clone()
    new = new_phy2log.to(torch.int64).flatten()
    ep, s, me = layer.ep_size, layer.slots_per_rank, layer.ep_rank
    # Source of every new slot: (rank, local slot) of an old copy, preferring the destination itself.
    sources: list[tuple[int, int]] = []
    for p in range(layer.num_slots):
        dest, expert = p // s, int(new[p])
        holders = torch.nonzero(old == expert).flatten().tolist()
        on_dest = [q for q in holders if q // s == dest]
        src = on_dest[0] if on_dest else holders[0]
        sources.append((src // s, src % s))

    tensors = [t for p in layer.local.parameters() for t in _state_rows(p, optimizer, followers)]
    send_slots = [[] for _ in range(ep)]                 # my local slots to send, per destination
    recv_slots = [[] for _ in range(ep)]                 # my new local slots to fill, per source
    local_moves: list[tuple[int, int]] = []              # (old local slot, new local slot) on me
    for p, (src_rank, src_slot) in enumerate(sources):
        dest = p // s
        if dest == me and src_rank == me:
            local_moves.append((src_slot, p % s))
        elif src_rank == me:
            send_slots[dest].append(src_slot)
        elif dest == me:
            recv_slots[src_rank].append(p % s)

    row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
    flat_send = [q for d in range(ep) for q in send_slots[d]]
    send = (_pack(tensors, flat_send) if flat_send
            else torch.empty(0, row_bytes, dtype=torch.uint8, device=tensors[0].device))
    received = all_to_all(send, [len(r) for r in recv_slots], [len(q) for q in send_slots],
                                  layer.ep_group)                               # [num_recv, row_bytes]
    if local_moves:
        old_rows = _pack(tensors, [a for a, _ in local_moves])
        _unpack_into(tensors, old_rows, [b for _, b in local_moves])
    flat_recv = [q for r in range(ep) for q in recv_slots[r]]
    if flat_recv:
        _unpack_into(tensors, received, flat_recv)
    for p in layer.local.parameters():
        p.grad = None
    layer.set_placement(new)
    return len(flat_recv)


class ExpertRebalancer:
    """Periodic EPLB re-plans of every expert-parallel layer of a model."""

    def __init__(self, model: nn.Module, num_nodes: int = 1, num_groups: int | None = None) -> None:
        self.layers = list(expert_parallel_layers(model))
        if not self.layers:
            raise ValueError("ExpertRebalancer: the model has no ExpertParallelExperts "
                             "(call apply_expert_parallel first)")
        first = self.layers[0]
        self.num_experts, self.num_slots, self.ep_size = first.num_experts, first.num_slots, first.ep_size
        config = getattr(model, "config", None)
        self.num_groups = num_groups or getattr(config, "n_group", None) or 1
        self.num_nodes = num_nodes

    def plan(self, loads: torch.Tensor) -> torch.Tensor:
        """loads[L, E] -> new phy2log[L, R] from the EPLB planner."""
        if loads.shape != (len(self.layers), self.num_experts):
            raise ValueError(f"global_loads_window has shape {tuple(loads.shape)}, expected "
                             f"[num_moe_layers={len(self.layers)}, n_routed_experts={self.num_experts}]")
        current = torch.stack([layer.phy2log for layer in self.layers])            # [L, R]
        phy2log, _, _ = rebalance_experts(loads.float(), self.num_slots, self.num_groups, self.num_nodes,
                                          self.ep_size, current_phy2log=current)
        return phy2log.to(torch.int64)

    def replan(self, global_loads_window: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
               followers: Mapping[nn.Parameter, Sequence[torch.Tensor]] | None = None) -> dict[str, float]:
        """Re-plan from the all-reduced loads of a window of steps ([L, E], identical on every rank),
        move weights, optimizer state and each parameter's `followers` (`move_slots`), and return load metrics before/after (max/mean over ranks,
        the worst layer, and the mean over layers), the slots this rank received from other ranks
        (`eplb/slots_received`) and the slots whose expert changed on all ranks together
        (`eplb/slots_rewritten`, from the tables every rank holds, so no communication)."""
        loads = global_loads_window.to(torch.float64)
        new_tables = self.plan(loads)
        old_tables = torch.stack([layer.phy2log for layer in self.layers])              # [L, R]
        rewritten = int((new_tables.to(old_tables.device) != old_tables).sum())
        before = balancedness(loads, old_tables, self.ep_size)
        moved = 0
        for i, layer in enumerate(self.layers):
            moved += move_slots(layer, new_tables[i], optimizer, followers)
        after = balancedness(loads, new_tables, self.ep_size)                      # [L]
        metrics = {
            "eplb/load_max_over_mean_before": float(before.max()),
            "eplb/load_max_over_mean_after": float(after.max()),
            "eplb/load_max_over_mean_before_avg": float(before.mean()),
            "eplb/load_max_over_mean_after_avg": float(after.mean()),
            "eplb/slots_received": float(moved),
            "eplb/slots_rewritten": float(rewritten),
        }
        logger.info("EPLB re-plan: max/mean rank load %.3f -> %.3f (worst layer), %d slots rewritten "
                    "(%d received by this rank)", metrics["eplb/load_max_over_mean_before"],
                    metrics["eplb/load_max_over_mean_after"], rewritten, moved)
        return metrics

