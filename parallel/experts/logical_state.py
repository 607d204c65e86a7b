"""Expert slot tensors in the names and shapes of the plain model, and back.

After `apply_expert_parallel` each rank holds only its slots (`...mlp.experts.local.gate_proj`
[S, I, H]) and each layer a persistent `...mlp.experts.phy2log` [R] placement, so the ranks' state
dicts differ and change with every EPLB move. `slots_to_logical` (every slot of the EP group -> one
copy of each logical expert) and `local_slot_rows` (logical experts -> this rank's slots) are the two
directions of that mapping for one tensor; a resume under another ep or slot count moves weights and
AdamW moments with them (`twinpipe.trainer.checkpoint.reshard`). `merge_expert_shards` applies the first
offline, in one process without a process group, to the state dicts the EP ranks wrote: that is how a
checkpoint of an EP run (EPLB-replanned or not, any pp) loads for inference or converts to HF.
"""

from __future__ import annotations

import torch

from twinpipe.parallel.experts.layer import ExpertParallelExperts
from twinpipe.parallel.experts.slots import placement_tables

LOCAL = "local."        # the slots' sub-module of an `ExpertParallelExperts`
PLACEMENT = "phy2log"   # its persistent slot -> logical expert buffer


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
