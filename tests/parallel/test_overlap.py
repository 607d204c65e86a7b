"""Overlapped forward-backward of two micro-batches equals forward then backward, bit for bit (gloo).

Two ranks form one EP group; the stage is two DeepSeek-V3 blocks with expert-parallel MoE (attention,
gate, dispatch, experts, combine). Micro-batch 1 has been run forward already; then micro-batch 0's
forward and micro-batch 1's backward run (a) one after the other and (b) through
`overlapped_forward_backward`, which runs micro-batch 1's backward in sub-layer segments inside
micro-batch 0's all-to-all waits and issues the backward's own all-to-alls itself, waiting for each
one only after micro-batch 0's next forward chunk. The arithmetic is the same operations on the same
values, only interleaved, so outputs, losses, parameter gradients and input gradients must be *equal*
(torch.equal), the region must really have cut the backward and run its segments inside the forward,
and no thread may be started. The tiny blocks have a shared expert and the balance loss, so the sums
across cuts (residual + attention side, shared + routed into the MoE input, router + dispatch into
the flattened input) are all exercised.
"""

from __future__ import annotations

import threading

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


class _Skip(nn.Module):
    """Blocks plus a skip connection from the stage input to its output, around every block marker:
    no exact cut exists, so the overlap must fall back to one plain backward."""

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # [B, T, H]
        return self.blocks(h) + 0.5 * h


def _no_thread_start(self) -> None:
    raise AssertionError(f"a thread was started: {self.name}")


def _run(rank: int, world: int, last_stage: bool, overlapped: bool, skip: bool = False):
    config = ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0)
    stage = _Skip(_stage(config)) if skip else _stage(config)
    inputs1 = _inputs(10 + rank, config)
    outputs1 = stage(inputs1)
    target = torch.randn(outputs1.shape, generator=torch.Generator().manual_seed(20 + rank))
    if last_stage:
        loss1, out1, grads1, criterion0, labels0 = _criterion(outputs1, target), [], [], _criterion, [target]
    else:
        loss1, out1, grads1, criterion0, labels0 = None, [outputs1], [target], None, []
    inputs0 = _inputs(30 + rank, config)
    if overlapped:
        threads, start = set(threading.enumerate()), threading.Thread.start
        threading.Thread.start = _no_thread_start
        try:
            outputs0, loss0 = overlap.overlapped_forward_backward(stage, [inputs0], criterion0, labels0,
                                                                  stage, loss1, out1, grads1)
        finally:
            threading.Thread.start = start
        assert set(threading.enumerate()) == threads
        region = dict(overlap.LAST_REGION)
    else:
        outputs0, loss0 = overlap.forward_chunk(stage, [inputs0], criterion0, labels0)
        overlap.backward_chunk(loss1, out1, grads1)
        region = None
    # Finish micro-batch 0 so its graph (and the dispatch backward) is exercised too.
    (loss0 if loss0 is not None else outputs0.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    return (outputs0.detach(), None if loss0 is None else loss0.detach(), inputs1.grad.clone(),
            inputs0.grad.clone(), grads, region)


def _compare(rank: int, world: int, last_stage: bool, skip: bool = False):
    seq = _run(rank, world, last_stage, overlapped=False, skip=skip)
    ovl = _run(rank, world, last_stage, overlapped=True, skip=skip)
    for a, b in zip(seq[:4], ovl[:4]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert seq[4].keys() == ovl[4].keys() and len(seq[4]) > 0
    for name in seq[4]:
        assert torch.equal(seq[4][name], ovl[4][name]), name
    return ovl[5]


@pytest.mark.parametrize("last_stage", [False, True])
def test_overlapped_forward_backward_equals_sequential(last_stage):
    regions = run_local(_compare, 2, last_stage)
    # Two MoE blocks, cut at their residual adds, router outputs, shared experts and the four
    # exchanges: 5 backward segments (combine B of block 2 | experts B | dispatch + attention B of
    # block 2 and combine B of block 1 | experts B | dispatch + attention B of block 1), each but the
    # last ending with one of the backward's 4 all-to-alls, which the driver issued and waited in the
    # next segment. The first segment runs before the forward, the others inside its 4 data waits
    # (dispatch, combine x 2 layers; the count exchanges do not hand off).
    for region in regions:
        assert region == {"switches": 4, "segments": 5, "exchanges": 4, "planned": True}, region


def test_overlap_without_exact_cut_runs_one_backward():
    # A skip connection around the blocks reaches the stage input from the root and from the blocks'
    # side of every cut: the groups form a cycle, the region refuses the cut and runs micro-batch 1's
    # backward whole in the first wait.
    for region in run_local(_compare, 2, True, True):
        assert region == {"switches": 1, "segments": 2, "exchanges": 0, "planned": False}, region


def test_overlap_propagates_errors():
    def bad_forward(x):
        raise ValueError("boom")

    module = nn.Linear(2, 2)
    x = torch.randn(1, 2, requires_grad=True)
    loss1 = module(x).sum()
    with pytest.raises(ValueError, match="boom"):
        overlap.overlapped_forward_backward(bad_forward, [x], None, [], module, loss1, [], [])
    assert overlap._ACTIVE is None


def test_residual_fork_only_where_the_add_passes_its_gradient_through():
    # The driver hands a tagged add's gradient to both operands unchanged: only right for alpha 1
    # without broadcasting or a dtype change (else the engine would scale, sum_to or cast it).
    x, y = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    cases = {"plain": (x * 2 + y, True), "untagged": (x * 2 + y, None),
             "alpha": (torch.add(x * 2, y, alpha=2.0), False),
             "broadcast": (x * 2 + torch.randn(3, requires_grad=True), False),
             "promotion": (x * 2 + y.double(), False)}
    for name, (out, fork) in cases.items():
        if fork is not None:
            overlap.tag_residual_fork(nn.Identity(), (), out)
        assert overlap._is_fork(out.grad_fn) == bool(fork), name
