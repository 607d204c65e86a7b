"""State dicts of an expert-parallel model in the names and shapes of the plain model.

After `apply_expert_parallel` each rank holds only its slots (`...mlp.experts.local.gate_proj`
[S, I, H]), so the model's own state dict differs between ranks and changes with every EPLB move.
`logical_state_dict(model)` gathers every logical expert over the EP group (any copy: replicas are
identical) and returns the state dict the unsharded model would have (`...mlp.experts.gate_proj`
[E, I, H], no placement buffers): checkpoints and HF export (`twinpipe.model.save_hf`) then do not
depend on the EP degree or the placement, and `load_logical_state_dict` fills an expert-parallel
model with any placement from such a state dict (each rank keeps the rows of its slots).

The gather holds one layer's E experts at a time on every rank; fine up to the `small` preset, a
671B-scale checkpoint wants a sharded writer instead (each EP rank writing its own experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.expert_parallel import ExpertParallelExperts


def _ep_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


@torch.no_grad()
def gather_logical(layer: ExpertParallelExperts, local: torch.Tensor) -> torch.Tensor:
    """local [S, ...] rows of this rank's slots -> [E, ...] one copy of every logical expert."""
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    slots = torch.cat(parts)                                                  # [R, ...]
    first_slot = layer.log2phy[:, 0]                                          # [E]
    return slots[first_slot]


def logical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (collective over every EP group: call on all ranks)."""
    modules = _ep_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in modules if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:]
        if rest.startswith("local."):
            out[f"{owner}.{rest[len('local.'):]}"] = gather_logical(modules[owner], value)
        # placement buffers (phy2log) are not part of the plain model
    return out


@torch.no_grad()
def load_logical_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain-model state dict into an expert-parallel model (any placement, any EP degree)."""
    modules = _ep_modules(model)
    local_sd: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        owner = next((name for name in modules if key.startswith(name + ".")), None)
        if owner is None:
            local_sd[key] = value
            continue
        layer = modules[owner]
        if value.shape[0] != layer.num_experts:
            raise ValueError(f"{key}: {value.shape[0]} experts in the state dict, the model has "
                             f"{layer.num_experts}")
        local_sd[f"{owner}.local.{key[len(owner) + 1:]}"] = value[layer.local_logical_ids()]
    for name, layer in modules.items():
        local_sd[f"{name}.phy2log"] = layer.phy2log.clone()
    model.load_state_dict(local_sd, strict=True)
