"""Expert parallelism: `moe.experts` sharded over an expert-parallel (EP) group, applied from outside.

`apply_expert_parallel(model, ep_group)` replaces every MoE layer's `experts` (a `twinpipe.model`
`Experts`) with an `ExpertParallelExperts` that has the same forward signature
(`x[N, H], topk_idx[N, K], topk_weight[N, K] -> y[N, H]`) and holds only this rank's *physical slots*.

Physical slots (EPLB): the group holds R >= E slots, S = R / ep per rank; slot p lives on EP rank
p // S and serves logical expert `phy2log[p]`. Without redundancy R = E and slot p is expert p. A
(token, pick) pair routed to logical expert e is served by replica `pair_index % logcnt[e]` of e
(pair_index = token * K + k), so the replicas share the load deterministically.

One forward:
  1. sort the N*K (token, pick) pairs by physical slot; count rows per slot and exchange the counts;
  2. dispatch the rows with one variable-split `all_to_all_single` (FP8 with power-of-2 scales when
     `fp8_dispatch`), reorder them slot-major and run the local `Experts.grouped_swiglu` (the FP8
     subclass when the model was converted to FP8);
  3. combine the outputs back with the reversed splits, scale by the gate weights and scatter-add into
     the tokens in logical-expert order (the order of `Experts.forward`), so the result does not depend
     on the placement. No token is dropped.

Node-limited routing: with the identity placement, expert e sits on EP rank e // (E/ep); the gate's
group limit (`n_group` groups, `topk_group` kept) is node-limited routing when each node's ranks hold
whole groups, which `group_to_nodes` checks and returns.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel import ep_comm, overlap

logger = logging.getLogger(__name__)


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


def _slot_major_permutation(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts[ep, S] (rows from source r for local slot s, received source-major) -> index that
    reorders the received rows slot-major (slot 0 from all sources, then slot 1, ...)."""
    flat = recv_counts.flatten()                                                  # [ep * S]
    start = (torch.cumsum(flat, 0) - flat).view_as(recv_counts)                   # [ep, S]
    counts_t = recv_counts.t().flatten()                                          # [S * ep]
    start_t = start.t().flatten()                                                 # [S * ep]
    total = int(flat.sum())
    seg_start = torch.repeat_interleave(start_t, counts_t)                        # [M]
    seg_offset = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t)
    return seg_start + (torch.arange(total, device=recv_counts.device) - seg_offset)  # [M]


class ExpertParallelExperts(nn.Module):
    """This rank's physical expert slots and the dispatch/combine around them.

    experts: the full (all E logical experts) `Experts` module of this layer; only the rows of this
      rank's slots are kept (`experts.select`), so its class (BF16 or FP8) is kept too.
    phy2log: [R] logical expert of each physical slot of the whole EP group (default: identity, R = E).
    """

    def __init__(self, experts: nn.Module, ep_group: dist.ProcessGroup | None,
                 phy2log: torch.Tensor | None = None, fp8_dispatch: bool = False,
                 fp8_block_size: int = 128) -> None:
        super().__init__()
        self.num_experts = int(experts.gate_proj.shape[0])
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if phy2log is None:
            phy2log = torch.arange(self.num_experts)
        phy2log = phy2log.to(device=experts.gate_proj.device, dtype=torch.int64).flatten()
        if phy2log.numel() % self.ep_size:
            raise ValueError(f"num physical slots R={phy2log.numel()} is not a multiple of ep={self.ep_size}")
        self.num_slots = phy2log.numel()
        self.slots_per_rank = self.num_slots // self.ep_size
        self.fp8_dispatch = fp8_dispatch
        self.fp8_block_size = fp8_block_size
        self.register_buffer("phy2log", phy2log.clone(), persistent=True)
        # tokens served by each local slot since the last placement change (measured load)
        self.register_buffer("slot_load", torch.zeros(self.slots_per_rank, dtype=torch.int64),
                             persistent=False)
        self._refresh_tables()
        self.local = experts.select(self.local_logical_ids().tolist())
        for p in self.local.parameters():
            mark_expert_param(p, self.ep_size)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_tables())

    def _refresh_tables(self) -> None:
        self.log2phy, self.logcnt = placement_tables(self.phy2log, self.num_experts)

    def _apply(self, fn, recurse=True):
        # log2phy/logcnt are derived from the phy2log buffer: follow it to its new device.
        super()._apply(fn, recurse)
        self._refresh_tables()
        return self

    def local_logical_ids(self) -> torch.Tensor:
        """[S] logical expert of each of this rank's slots."""
        s = self.slots_per_rank
        return self.phy2log[self.ep_rank * s:(self.ep_rank + 1) * s]

    def set_placement(self, phy2log: torch.Tensor) -> None:
        """Adopt a new slot -> expert table (the caller has already moved the weights)."""
        if phy2log.numel() != self.num_slots:
            raise ValueError(f"new placement has {phy2log.numel()} slots, this layer has {self.num_slots}")
        self.phy2log.copy_(phy2log.to(torch.int64).flatten())
        self._refresh_tables()
        self.slot_load.zero_()  # counted for the old slots

    def route_to_slots(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """topk_idx[N, K] logical experts -> [N*K] physical slot of each pair (replica by pair index)."""
        flat = topk_idx.reshape(-1)                                                # [N*K]
        pair = torch.arange(flat.numel(), device=flat.device)
        replica = pair % self.logcnt[flat]                                         # [N*K]
        return self.log2phy[flat, replica]                                         # [N*K]

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        k = topk_idx.shape[1]
        ep, s = self.ep_size, self.slots_per_rank
        slot = self.route_to_slots(topk_idx)                                       # [N*K]
        order = torch.argsort(slot, stable=True)                                   # [N*K]
        token_of = order // k                                                      # [N*K]
        send_counts = torch.bincount(slot, minlength=self.num_slots)               # [R]
        recv_counts, counts_work = ep_comm.exchange_counts(send_counts, self.ep_group)
        x_send = x[token_of]                                                       # [N*K, H]
        overlap.wait(counts_work, switch=False)
        recv_counts = recv_counts.view(ep, s)                                      # [ep, S]
        in_splits = send_counts.view(ep, s).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        with torch.no_grad():
            self.slot_load += recv_counts.sum(0)

        if self.fp8_dispatch:
            x_recv = ep_comm.dispatch_fp8(x_send, out_splits, in_splits, self.ep_group,
                                          self.fp8_block_size)                     # [M, H]
        else:
            x_recv = ep_comm.dispatch(x_send, out_splits, in_splits, self.ep_group)  # [M, H]
        perm = _slot_major_permutation(recv_counts)                                # [M]
        y_local = self.local.grouped_swiglu(x_recv[perm], recv_counts.sum(0))      # [M, H]
        y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local)            # [M, H] source-major
        y_send = ep_comm.combine(y_recv, in_splits, out_splits, self.ep_group)     # [N*K, H]

        # Sum each token's K picks in logical-expert order (as `Experts.forward` does), whatever the
        # placement: outputs do not change when EPLB moves or replicates experts.
        by_expert = torch.argsort(topk_idx.reshape(-1), stable=True)               # [N*K]
        pair_index = torch.arange(order.numel(), device=order.device)
        position = torch.empty_like(order).index_copy_(0, order, pair_index)        # [N*K]
        y_pairs = y_send[position[by_expert]]                                      # [N*K, H]
        y_pairs = (y_pairs * topk_weight.reshape(-1)[by_expert].unsqueeze(-1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, by_expert // k, y_pairs)          # [N, H]


def mark_expert_param(param: nn.Parameter, ep_size: int) -> None:
    """Flag an expert parameter so data-parallel reduction (DeepSpeed's `is_moe_param`) skips it:
    its gradient is reduced over the expert-data-parallel group by `reduce_expert_grads` instead."""
    param.allreduce = False
    param.group_name = f"ep_size_{ep_size}"
    param.twinpipe_expert = True


def is_expert_param(param: nn.Parameter) -> bool:
    return bool(getattr(param, "twinpipe_expert", False))


def expert_parallel_layers(model: nn.Module) -> Iterator[ExpertParallelExperts]:
    """The `ExpertParallelExperts` of a model, in module order (= MoE layer order)."""
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            yield module


def _is_experts(module: nn.Module) -> bool:
    return callable(getattr(module, "grouped_swiglu", None)) and callable(getattr(module, "select", None))


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup | None,
                          num_replicas: int | None = None, fp8_dispatch: bool = False,
                          num_nodes: int = 1) -> nn.Module:
    """Replace every MoE layer's `experts` with an `ExpertParallelExperts` (in place; returns model).

    num_replicas: physical slots R per layer (default E, no redundancy); with R > E the initial
      placement is slot p -> expert p % E until the first EPLB re-plan.
    num_nodes: nodes spanned by the EP group; checked against the gate's `n_group` when the model
      has a `config` with that field (node-limited routing, see `group_to_nodes`).
    MoE layers whose experts are on the meta device (another pipeline rank's stages) are left alone.
    """
    ep_size = dist.get_world_size(ep_group)
    replaced = elsewhere = 0
    for name, module in list(model.named_modules()):
        experts = getattr(module, "experts", None)
        if experts is None or isinstance(experts, ExpertParallelExperts) or not _is_experts(experts):
            continue
        if experts.gate_proj.is_meta:
            elsewhere += 1
            continue
        num_experts = int(experts.gate_proj.shape[0])
        config = getattr(model, "config", None)
        n_group = getattr(config, "n_group", None)
        if n_group:
            group_to_nodes(num_experts, n_group, ep_size, num_nodes)
        slots = num_replicas or num_experts
        if slots < num_experts:
            raise ValueError(f"num_replicas={slots} < n_routed_experts={num_experts} in {name}")
        phy2log = torch.arange(slots) % num_experts
        module.experts = ExpertParallelExperts(experts, ep_group, phy2log, fp8_dispatch=fp8_dispatch)
        replaced += 1
    if replaced == 0 and elsewhere == 0:
        raise ValueError("apply_expert_parallel: the model has no MoE layer with an `experts` module")
    logger.info("expert parallelism: %d MoE layers over ep=%d", replaced, ep_size)
    return model
