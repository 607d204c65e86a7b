"""Overlapped forward-backward of two micro-batches equals forward then backward, bit for bit (gloo).

Two ranks form one EP group; the stage is two DeepSeek-V3 blocks with expert-parallel MoE (attention,
gate, dispatch, experts, combine). Micro-batch 1 has been run forward already; then micro-batch 0's
forward and micro-batch 1's backward run (a) one after the other and (b) through
`overlapped_forward_backward`, which interleaves them at every all-to-all. The arithmetic is the same
operations on the same values, only interleaved, so outputs, losses, parameter gradients and input
gradients must be *equal* (torch.equal), and the region must really have switched between the two.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.experts import overlap
from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.experts.layer import apply_expert_parallel
from twinpipe.parallel.local import run_local


def _stage(config: ModelConfig) -> nn.Sequential:
    """A pipeline stage of blocks (causal, no position_ids): h [B, T, H] -> h [B, T, H]."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0.05)
    apply_expert_parallel(model, dist.group.WORLD)
    return nn.Sequential(*model.layers[1:])


def _criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def _inputs(seed: int, config: ModelConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, config.hidden_size, generator=g).requires_grad_()


def _run(rank: int, world: int, last_stage: bool, overlapped: bool):
    config = ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0)
    stage = _stage(config)
    inputs1 = _inputs(10 + rank, config)
    outputs1 = stage(inputs1)
    target = torch.randn(outputs1.shape, generator=torch.Generator().manual_seed(20 + rank))
    if last_stage:
        loss1, out1, grads1, criterion0, labels0 = _criterion(outputs1, target), [], [], _criterion, [target]
    else:
        loss1, out1, grads1, criterion0, labels0 = None, [outputs1], [target], None, []
    inputs0 = _inputs(30 + rank, config)
    if overlapped:
        outputs0, loss0 = overlap.overlapped_forward_backward(stage, [inputs0], criterion0, labels0,
                                                              stage, loss1, out1, grads1)
        switches = overlap.LAST_REGION["switches"]
    else:
        outputs0, loss0 = overlap.forward_chunk(stage, [inputs0], criterion0, labels0)
        overlap.backward_chunk(loss1, out1, grads1)
        switches = 0
    # Finish micro-batch 0 so its graph (and the dispatch backward) is exercised too.
    (loss0 if loss0 is not None else outputs0.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    return (outputs0.detach(), None if loss0 is None else loss0.detach(), inputs1.grad.clone(),
            inputs0.grad.clone(), grads, switches)


def _compare(rank: int, world: int, last_stage: bool):
    seq = _run(rank, world, last_stage, overlapped=False)
    ovl = _run(rank, world, last_stage, overlapped=True)
    for a, b in zip(seq[:4], ovl[:4]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert seq[4].keys() == ovl[4].keys() and len(seq[4]) > 0
    for name in seq[4]:
        assert torch.equal(seq[4][name], ovl[4][name]), name
    return ovl[5]


@pytest.mark.parametrize("last_stage", [False, True])
def test_overlapped_forward_backward_equals_sequential(last_stage):
    switches = run_local(_compare, 2, last_stage)
    # Every data all-to-all hands off: forward 2 MoE layers x (dispatch + combine), backward 2 x
    # (combine + dispatch) = 8 (the count exchanges do not hand off).
    assert switches == [8, 8], switches


def test_overlap_propagates_errors():
    def bad_forward(x):
        raise ValueError("boom")

    module = nn.Linear(2, 2)
    x = torch.randn(1, 2, requires_grad=True)
    loss1 = module(x).sum()
    with pytest.raises(ValueError, match="boom"):
        overlap.overlapped_forward_backward(bad_forward, [x], None, [], module, loss1, [], [])
    assert overlap._ACTIVE is None
