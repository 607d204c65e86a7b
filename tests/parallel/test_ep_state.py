"""Plain-model state dicts of an expert-parallel model (2 gloo ranks, EP = 2).

`logical_state_dict` must give exactly the unsharded model's state dict (same keys, bitwise values),
whatever the placement (here 12 slots with replicas, after an EPLB-style move); and loading it into
an expert-parallel model with another placement and slot count must give the same function: outputs
equal to the unsharded model's up to the expert GEMM's segment-length rounding (rtol 1e-5 /
atol 1e-6, see test_expert_parallel.py).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.ep_eplb import move_slots
from twinpipe.parallel.ep_state import load_logical_state_dict, logical_state_dict
from twinpipe.parallel.expert_parallel import apply_expert_parallel, expert_parallel_layers
from twinpipe.parallel.local import run_local


def _state(rank: int, world: int) -> None:
    config = ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=512)
    torch.manual_seed(0)
    plain = Transformer(config)
    plain.init_weights(0.05)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        want = plain(tokens)
    reference = {k: v.clone() for k, v in plain.state_dict().items()}

    ep_model = apply_expert_parallel(copy.deepcopy(plain), dist.group.WORLD, num_replicas=12)
    for layer in expert_parallel_layers(ep_model):
        move_slots(layer, torch.flip(layer.phy2log, [0]))           # another placement, weights moved
    gathered = logical_state_dict(ep_model)
    assert gathered.keys() == reference.keys()
    for key in reference:
        assert torch.equal(gathered[key], reference[key]), key

    torch.manual_seed(1)
    other = Transformer(config)                                    # different weights before loading
    apply_expert_parallel(other, dist.group.WORLD)                 # 8 slots, identity placement
    load_logical_state_dict(other, gathered)
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), want, rtol=1e-5, atol=1e-6)


def test_logical_state_dict_round_trip():
    run_local(_state, 2)
