"""The layer that replaces `moe.experts` under expert parallelism, applied to a model from outside.

`apply_expert_parallel(model, ep_group)` replaces every MoE layer's `experts` (a `twinpipe.model`
`Experts`) with an `ExpertParallelExperts` that has the same forward signature
(`x[N, H], topk_idx[N, K], topk_weight[N, K] -> y[N, H]`) and holds only this rank's *physical slots*
(`slots.py`: R >= E slots over the EP group, S = R / ep per rank, slot p serving `phy2log[p]`). A
(token, pick) pair routed to logical expert e is served by replica `pair_index % logcnt[e]` of e
(pair_index = token * K + k), so the replicas share the load deterministically.

One forward: route the pairs to slots; `dispatch.dispatch` (count exchange, one all-to-all carrying
the rows and their gate weights, FP8 with power-of-2 scales when `fp8_dispatch`); the local
`Experts.grouped_swiglu` on the slot-major rows, scaling them by the weights (the FP8 subclass when the
model was converted to FP8); `dispatch.combine` back into the tokens.

Expert parameters are flagged (`mark_expert_param`) so data-parallel reduction leaves them to
`grad_reduction.reduce_expert_grads`.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model.experts import weighted_swiglu
from twinpipe.parallel.experts import dispatch, overlap
from twinpipe.parallel.experts.slots import group_to_nodes, placement_tables

logger = logging.getLogger(__name__)


class ExpertParallelExperts(nn.Module):
    """This rank's physical expert slots and the dispatch/combine around them.

    experts: the full (all E logical experts) `Experts` module of this layer; only the rows of this
      rank's slots are kept (`experts.select`), so its class (BF16 or FP8) is kept too.
    phy2log: [R] logical expert of each physical slot of the whole EP group (default: identity, R = E).
    """

    def __init__(self, experts: nn.Module, ep_group: dist.ProcessGroup | None,
                 phy2log: torch.Tensor | None = None, fp8_dispatch: bool = False,
                 fp8_block_size: int = 128, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = int(experts.gate_proj.shape[0])
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if phy2log is None:
            phy2log = torch.arange(self.num_experts)
        # the tables live on `device` (default: the experts'; a model built on meta passes its target)
        phy2log = phy2log.to(device=device or experts.gate_proj.device, dtype=torch.int64).flatten()
        if phy2log.numel() % self.ep_size:
            raise ValueError(f"num physical slots R={phy2log.numel()} is not a multiple of ep={self.ep_size}")
        self.num_slots = phy2log.numel()
        self.slots_per_rank = self.num_slots // self.ep_size
        self.fp8_dispatch = fp8_dispatch
        self.fp8_block_size = fp8_block_size
        self.register_buffer("phy2log", phy2log.clone(), persistent=True)
        self._refresh_tables()
        self.local = experts.select(self.local_logical_ids().tolist())
        for p in self.local.parameters():
            mark_expert_param(p)
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

    def route_to_slots(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """topk_idx[N, K] logical experts -> [N*K] physical slot of each pair (replica by pair index)."""
        flat = topk_idx.reshape(-1)                                                # [N*K]
        pair = torch.arange(flat.numel(), device=flat.device)
        replica = pair % self.logcnt[flat]                                         # [N*K]
        return self.log2phy[flat, replica]                                         # [N*K]

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        slot = self.route_to_slots(topk_idx)                                       # [N*K]
        block = self.fp8_block_size if self.fp8_dispatch else None
        x_local, weight_local, counts, sent = dispatch.dispatch(
            x, topk_weight, slot, self.num_slots, self.ep_group, block)            # [M, H], [M], [S]
        y_local = weighted_swiglu(self.local, x_local, counts, weight_local)       # [M, H], weighted
        return dispatch.combine(y_local, sent, x, topk_idx, self.ep_group)         # [N, H]


def mark_expert_param(param: nn.Parameter) -> None:
    """Flag an expert slot parameter: the data-parallel reduction skips it, its gradient is reduced by
    `grad_reduction.reduce_expert_grads` instead."""
    param.twinpipe_expert = True


def is_expert_param(param: nn.Parameter) -> bool:
    """Whether `mark_expert_param` flagged the parameter (an expert slot of an EP layer)."""
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
                          num_nodes: int = 1, holds: Callable[[str], bool] | None = None,
                          device: torch.device | None = None) -> nn.Module:
    """Replace every MoE layer's `experts` with an `ExpertParallelExperts` (in place; returns model).

    num_replicas: physical slots R per layer (default E, no redundancy); with R > E the initial
      placement is slot p -> expert p % E until the first EPLB re-plan.
    num_nodes: nodes spanned by the EP group; checked against the gate's `n_group` when the model
      has a `config` with that field (node-limited routing, see `group_to_nodes`).
    MoE layers whose experts are on the meta device (another pipeline rank's stages) are left alone,
    unless `holds(module name)` says this rank holds them: a model built on meta is parallelised before
    its weights exist (`parallel.parallelize`), the slots stay on meta for the caller to materialise,
    and the placement tables go to `device`.
    """
    ep_size = dist.get_world_size(ep_group)
    replaced = elsewhere = 0
    for name, module in list(model.named_modules()):
        experts = getattr(module, "experts", None)
        if experts is None or isinstance(experts, ExpertParallelExperts) or not _is_experts(experts):
            continue
        if not (holds(name) if holds is not None else not experts.gate_proj.is_meta):
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
        module.experts = ExpertParallelExperts(experts, ep_group, phy2log, fp8_dispatch=fp8_dispatch,
                                               device=device)
        # where the overlap may cut the backward into sub-layer chunks (`overlap.py`): the block's
        # residual add, the router's scores, the shared experts' output
        model.get_submodule(name.rpartition(".")[0]).register_forward_hook(overlap.tag_residual_fork)
        module.gate.register_forward_hook(overlap.mark_router_scores)
        if getattr(module, "shared_experts", None) is not None:
            module.shared_experts.register_forward_hook(overlap.mark_outputs)
        replaced += 1
    if replaced == 0 and elsewhere == 0:
        raise ValueError("apply_expert_parallel: the model has no MoE layer with an `experts` module")
    logger.info("expert parallelism: %d MoE layers over ep=%d", replaced, ep_size)
    return model
