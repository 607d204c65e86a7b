"""Expert slot tensors <-> the plain model's logical experts (2 gloo ranks, EP = 2).

An expert-parallel copy of a plain model gets 12 slots for 8 experts (replicas) and is then moved to
another placement (`move_slots`, weights crossing ranks). Checked bit for bit, since these functions
only select rows: every rank's slots hold their experts' rows of the plain model (`local_slot_rows`);
all slots of the group give back the plain experts (`slots_to_logical`, replicas checked equal); the
state dicts the two ranks would save merge offline into the plain model's state dict
(`merge_expert_shards`, what loading an EP checkpoint does). A replica that differs is named. The EP
model's outputs equal the plain model's up to the expert GEMM's segment-length rounding (rtol 1e-5 /
atol 1e-6, see test_expert_parallel.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.experts.layer import apply_expert_parallel, expert_parallel_layers
from twinpipe.parallel.experts.logical_state import local_slot_rows, merge_expert_shards, slots_to_logical
from twinpipe.parallel.experts.rebalance import move_slots
from twinpipe.parallel.local import run_local

CONFIG = dict(num_hidden_layers=2, vocab_size=512)


def _plain() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", **CONFIG))
    model.init_weights(0.05)
    return model


def _ep_rank(rank: int, world: int) -> dict:
    plain = _plain()
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(rank))  # [B, T]
    ep_model = apply_expert_parallel(copy.deepcopy(plain), dist.group.WORLD, num_replicas=12)
    for layer in expert_parallel_layers(ep_model):
        move_slots(layer, torch.flip(layer.phy2log, [0]))           # another placement, weights moved
    plain_sd = plain.state_dict()
    for name, layer in ep_model.named_modules():
        if layer not in set(expert_parallel_layers(ep_model)):
            continue
        for param, local in layer.local.named_parameters():
            logical = plain_sd[f"{name}.{param}"]                                    # [E, ...]
            assert torch.equal(local_slot_rows(layer, logical), local), (name, param)
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local.detach().contiguous())
            slots = torch.cat(parts)                                                  # [R, ...]
            got = slots_to_logical(slots, layer.phy2log, layer.num_experts, check_replicas=True)
            assert torch.equal(got, logical), (name, param)
    with torch.no_grad():
        torch.testing.assert_close(ep_model(tokens), plain(tokens), rtol=1e-5, atol=1e-6)
    state = ep_model.state_dict()
    return {"state": {k: v for k, v in state.items() if ".local." not in k},
            "slots": {k: v for k, v in state.items() if ".local." in k}}


def test_slots_map_to_logical_experts_and_merge():
    out = run_local(_ep_rank, 2)
    merged = merge_expert_shards(out[0]["state"], [rank["slots"] for rank in out], num_experts=8)
    want = _plain().state_dict()
    assert merged.keys() == want.keys()
    for key in want:
        assert torch.equal(merged[key], want[key]), key


def test_differing_replicas_are_named():
    slots = torch.arange(12.0).view(6, 2)                                             # [R, 2]
    phy2log = torch.tensor([0, 1, 2, 3, 0, 1])                                        # experts 0, 1 twice
    with pytest.raises(ValueError, match="logical expert 0: slots 0 and 4"):
        slots_to_logical(slots, phy2log, 4, check_replicas=True)
    slots[4], slots[5] = slots[0], slots[1]
    assert torch.equal(slots_to_logical(slots, phy2log, 4, check_replicas=True), slots[:4])
