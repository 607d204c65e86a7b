"""State dicts of an expert-parallel model in the names and shapes of the plain model.

After `apply_expert_parallel` each rank holds only its slots (`...mlp.experts.local.gate_proj`
[S, I, H]), so the model's own state dict differs between ranks and changes with every EPLB move.
`logical_state_dict(model)` gathers every logical expert over the EP group (any copy: replicas are
identical) and returns the state dict the unsharded model would have (`...mlp.experts.gate_proj`
[E, I, H], no placement buffers): checkpoints and HF export (`twinpipe.model.save_hf`) then do not
depend on the EP degree or the placement, and `load_logical_state_dict` fills an expert-parallel
model with any placement from such a state dict (each rank keeps the rows of its slots).
`merge_expert_shards` does the same offline, in one process without a process group, from the
state dicts each EP rank wrote (`...experts.local.*` slots) and the layers' `phy2log` placement:
that is how a checkpoint of an EP run (EPLB-replanned or not, any pp) loads for inference.
`slots_to_logical` / `local_slot_rows` are the two directions of that mapping for one tensor (a
resume under another ep moves the AdamW moments with them, `twinpipe.trainer.reshard`).

The gather holds one layer's E experts at a time on every rank; fine up to the `small` preset, a
671B-scale checkpoint wants a sharded writer instead (each EP rank writing its own experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.expert_parallel import ExpertParallelExperts, placement_tables

LOCAL = "local."        # the slots' sub-module of an `ExpertParallelExperts`
PLACEMENT = "phy2log"   # its persistent slot -> logical expert buffer


def _ep_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


@torch.no_grad()
def gather_logical(layer: ExpertParallelExperts, local: torch.Tensor) -> torch.Tensor:
    """local [S, ...] rows of this rank's slots -> [E, ...] one copy of every logical expert."""
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    slots = torch.cat(parts)                                                  # [R, ...]
    return slots_to_logical(slots, layer.phy2log, layer.num_experts)


def slots_to_logical(slots: torch.Tensor, phy2log: torch.Tensor, num_experts: int,
                     check_replicas: bool = False) -> torch.Tensor:
    """slots [R, ...] (every physical slot of the EP group, slot order), phy2log [R] -> [E, ...]: the
    first slot of each logical expert (its replicas are identical copies; `check_replicas` raises a
    ValueError naming the expert and slots where they are not)."""
    if slots.shape[0] != phy2log.numel():
        raise ValueError(f"{slots.shape[0]} slot rows for a placement of {phy2log.numel()} slots")
    log2phy, _ = placement_tables(phy2log.to(torch.int64).flatten(), num_experts)  # [E, maxcnt]
    if check_replicas:
        for expert, row in enumerate(log2phy.tolist()):
            first, *replicas = [p for p in row if p >= 0]
            for p in replicas:
                if not torch.equal(slots[p], slots[first]):
                    raise ValueError(f"logical expert {expert}: slots {first} and {p} (replicas) differ")
    return slots[log2phy[:, 0].to(slots.device)]


def local_slot_rows(layer: ExpertParallelExperts, logical: torch.Tensor) -> torch.Tensor:
    """logical [E, ...] (every logical expert) -> [S, ...] the rows of this rank's slots."""
    if logical.shape[0] != layer.num_experts:
        raise ValueError(f"{logical.shape[0]} logical experts given, the layer has {layer.num_experts}")
    return logical[layer.local_logical_ids().to(logical.device)]


def split_slot_name(name: str) -> tuple[str, str] | None:
    """'<layer>.local.<param>' (an expert slot tensor) -> ('<layer>', '<param>'), else None; the plain
    model calls that tensor '<layer>.<param>'."""
    layer, sep, param = name.partition("." + LOCAL)
    return (layer, param) if sep else None


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
        if rest.startswith(LOCAL):
            out[f"{owner}.{rest[len(LOCAL):]}"] = gather_logical(modules[owner], value)
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
        local_sd[f"{owner}.{LOCAL}{key[len(owner) + 1:]}"] = local_slot_rows(layer, value)
    for name, layer in modules.items():
        local_sd[f"{name}.{PLACEMENT}"] = layer.phy2log.clone()
    model.load_state_dict(local_sd, strict=True)


def merge_expert_shards(state: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]],
                        num_experts: int) -> dict[str, torch.Tensor]:
    """Offline (one process, no process group): an EP model's state without the expert slots, with
    each layer's `<layer>.phy2log` [R] (identical on every EP rank), and the EP ranks' slot state
    dicts in rank order (`<layer>.local.<param>` [S, ...], S = R / ep) -> the plain model's state dict
    (`<layer>.<param>` [E, ...], logical experts in order, one copy of each; no placement buffers)."""
    suffix = "." + PLACEMENT
    layers = {k[:-len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}
    out = {k: v for k, v in state.items() if not k.endswith(suffix)}
    ep = len(shards)
    for key in shards[0] if shards else ():
        owner, param = split_slot_name(key) or (key, "")
        if not param or owner not in layers:
            raise ValueError(f"expert slot tensor {key!r} belongs to no layer with a placement "
                             f"({owner}{suffix} missing); layers with one: {sorted(layers)[:5]}")
        phy2log = layers[owner]
        for r, shard in enumerate(shards):
            if key not in shard:
                raise ValueError(f"{key!r} is in ep rank 0's slots but not in ep rank {r}'s")
            if shard[key].shape[0] * ep != phy2log.numel():
                raise ValueError(f"{key!r} of ep rank {r} has {shard[key].shape[0]} slots; {owner}{suffix} "
                                 f"places {phy2log.numel()} slots over ep={ep} ranks")
        slots = torch.cat([shard[key] for shard in shards])                     # [R, ...]
        out[f"{owner}.{param}"] = slots_to_logical(slots, phy2log, num_experts)  # [E, ...]
    for r, shard in enumerate(shards[1:], start=1):
        extra = set(shard) - set(shards[0])
        if extra:
            raise ValueError(f"ep rank {r} has slot tensors ep rank 0 lacks: {sorted(extra)[:5]}")
    return out
