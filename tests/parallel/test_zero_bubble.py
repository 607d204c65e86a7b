"""Zero-bubble weight-gradient split in the V3 layers (parallel/pipeline/zero_bubble.py).

Layer tests: a split layer's forward is the original's to the bit; with WeightGradStore enabled its
backward leaves the weight gradients to a W chunk and the input gradient is already final; after
`pop()` the weight gradients are the original's. Deferred or not, the same GEMMs run on the same
operands, so FP8 (emulation) gradients are bitwise equal; fp32/bf16 gradients of the non-FP8 layers
come from our own GEMM calls instead of autograd's, equal up to summation order: assert_close's fp32
default (rtol 1.3e-6) and bf16 default (rtol 1.6e-2, one bf16 rounding of the product).

Pipeline tests: the V3 stages under DualPipe, DualPipeV and 1F1B with the split applied (and FP8
emulation), as tests/parallel/test_stages.py: per-micro-batch losses bitwise equal to the one-process
model (fp32, the same forward ops) and gradients 1 - 2<x,y>/(|x|^2+|y|^2) < 1e-13 (float64 metric,
DualPipe's bound: the sums over micro-batches run in another order). W chunks must really have
written the weights of attention, the dense MLP, the shared experts and the routed experts (each on
some rank; every DualPipe/DualPipeV rank deferred some), and none under 1F1B (no zero-bubble chunk).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.parallel.test_stages import MICRO, SEQ, _MeanOfMicroBatches, grad_error, micro_batches, tiny_model
from twinpipe.fp8 import convert_model
from twinpipe.fp8.experts import FP8Experts
from twinpipe.fp8.linear import FP8Linear
from twinpipe.model.experts import Experts
from twinpipe.model.moe import set_aux_loss_scale
from twinpipe.parallel.local import run_local
from twinpipe.parallel.pipeline import weight_grad_store, zero_bubble
from twinpipe.parallel.pipeline.runner import PipelineRunner, StageCriterion, sum_gradients
from twinpipe.parallel.pipeline.stages import set_stage_p2p_shapes
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore


def _linear(fp8: bool) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=False)
    if fp8:
        FP8Linear.from_linear(layer, "emulate")
    return layer, (torch.randn(2, 5, 48),)


def _experts(fp8: bool, tokens: int = 11) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    experts = Experts(4, 32, 16)
    experts.reset_parameters(0.1)
    if fp8:
        FP8Experts.from_experts(experts, "emulate")
    idx = torch.randint(0, 4, (tokens, 2))
    idx[:, 1] = (idx[:, 0] + 1) % 4  # two different experts per token
    return experts, (torch.randn(tokens, 32), idx, torch.rand(tokens, 2))


def _grads(module: nn.Module, inputs: tuple, store: bool, autocast: bool):
    """(output, input grad, {name: weight grad}) of one forward + backward; with `store`, the
    weight gradients are checked to be absent after B and taken after one W chunk."""
    x = inputs[0].clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    WeightGradStore.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x, *inputs[1:])
        WeightGradStore.enabled = store
        y.float().square().sum().backward()
        WeightGradStore.enabled = False
    if store:
        assert all(p.grad is None for p in module.parameters()), "B computed a weight gradient"
        WeightGradStore.flush()
        WeightGradStore.pop()
    return y.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("make,fp8,autocast", [
    (_linear, False, False), (_linear, False, True), (_experts, False, False), (_experts, False, True),
    (_linear, True, False), (_experts, True, False),
])
def test_split_layer_defers_exactly_its_weight_gradients(make, fp8, autocast):
    original, inputs = make(fp8)
    split = copy.deepcopy(original)
    assert zero_bubble.split_weight_gradients(split) == {type(original).__name__: 1}
    want = _grads(original, inputs, store=False, autocast=autocast)
    for store in (False, True):
        out, grad_x, grads = _grads(split, inputs, store, autocast)
        assert torch.equal(out, want[0])
        exact = {"rtol": 0, "atol": 0} if fp8 else {}  # FP8: the same GEMMs; else summation order
        torch.testing.assert_close(grad_x, want[1], **exact)
        for name, g in grads.items():
            torch.testing.assert_close(g, want[2][name], **exact)  # dtype checked too


@pytest.mark.parametrize("fp8,autocast", [(False, False), (False, True), (True, False)])
def test_split_experts_scale_rows_inside_as_after(fp8, autocast):
    """The split experts with the gate weight applied inside (`scaled_rows`, y recomputed for the
    weight's gradient) against the former product after the experts, the weight gradients deferred:
    output, input, gate-weight and (after the W chunk) weight gradients bit for bit, and y not kept
    (the recomputation keeps only what the down GEMM keeps; under FP8 its FP8 input besides)."""
    from tests.model.test_experts_weight import old_forward, run

    experts, (x, idx, weight) = _experts(fp8)
    zero_bubble.split_weight_gradients(experts)
    probe = torch.randn(x.shape)
    results = []
    for forward in (type(experts).forward, old_forward):
        WeightGradStore.clear()
        WeightGradStore.enabled = True
        out = run(forward, experts, x, idx, weight, probe, autocast)
        WeightGradStore.enabled = False
        assert all(g is None for g in out[3].values()), "B computed a weight gradient"
        WeightGradStore.flush()
        WeightGradStore.pop()
        results.append((*out[:3], {n: p.grad for n, p in experts.named_parameters()}, out[4]))
    new, old = results
    for got, want in zip(new[:3], old[:3]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for name, want in old[3].items():
        assert torch.equal(new[3][name], want), name
    rows, hidden = idx.numel(), x.shape[1]
    itemsize = 2 if autocast else 4
    kept = (128 + 4) * rows if fp8 else 0  # h in FP8 (one whole tile for I=16)
    assert old[4] - new[4] == rows * hidden * itemsize - kept, (old[4], new[4])


def test_split_experts_take_both_weight_gradient_forms(monkeypatch):
    """M * 4 bytes a multiple of 16 runs torch._grouped_mm's k-grouped GEMM, otherwise the padded bmm;
    both give the segment outer products (fp64 reference rounded to fp32: assert_close's fp32 rtol)."""
    calls = []
    grouped = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped(*a, **k))
    for tokens, k_grouped in ((8, True), (7, False)):
        calls.clear()
        g, x = torch.randn(tokens, 16), torch.randn(tokens, 32)
        counts = torch.tensor([3, 0, tokens - 3])
        want = torch.stack([g[a:b].double().t() @ x[a:b].double()
                            for a, b in ((0, 3), (3, 3), (3, tokens))])
        torch.testing.assert_close(zero_bubble.segment_outer(g, x, counts), want.float())
        assert bool(calls) == k_grouped


def test_split_only_swaps_known_classes_and_keeps_parameters():
    model = tiny_model(2)
    convert_model(model.layers[1], "emulate")
    params = {n: p for n, p in model.named_parameters()}
    swapped = zero_bubble.split_weight_gradients(model)
    assert set(swapped) == {"Linear", "Experts", "FP8Linear", "FP8Experts"}
    assert {n: p for n, p in model.named_parameters()} == params
    assert type(model.layers[0].self_attn.o_proj) is zero_bubble.SplitLinear
    assert type(model.layers[1].self_attn.o_proj) is zero_bubble.SplitFP8Linear
    assert not any(type(m) in zero_bubble.SPLIT_CLASSES for m in model.modules())
    assert zero_bubble.split_weight_gradients(model) == {}  # idempotent


def _fp8_model(layers: int, fp8: bool) -> nn.Module:
    model = tiny_model(layers)
    return convert_model(model, "emulate") if fp8 else model


def _rank(rank, world, schedule, layers, n, fp8):
    mbs = micro_batches(n, 128)
    objective = _MeanOfMicroBatches(n)
    ref_model = _fp8_model(layers, fp8)
    set_aux_loss_scale(ref_model, 1.0 / n)
    ref_loss = []
    for mb in mbs:
        loss, _ = objective(ref_model.forward_train(mb["input_ids"], mb["position_ids"]), mb)
        loss.backward()
        ref_loss.append(loss.detach())
    ref_loss = torch.stack(ref_loss)

    model = _fp8_model(layers, fp8)
    zero_bubble.split_weight_gradients(model)
    deferred: set[int] = set()  # parameters whose gradient a W chunk wrote
    accumulate = weight_grad_store.accumulate

    def recording(param, grad):
        deferred.add(id(param))
        accumulate(param, grad)
    weight_grad_store.accumulate = recording

    runner = PipelineRunner(model, schedule, world, rank, dist.group.WORLD, torch.device("cpu"))
    set_aux_loss_scale(runner.stages, 1.0 / n)
    set_stage_p2p_shapes(MICRO, SEQ, model.config.hidden_size)
    inputs, labels = runner.feeds(mbs)
    criterion = StageCriterion(objective, mbs, model.lm_head.weight)
    loss, _ = runner.pipe.step(*inputs, num_chunks=n, criterion=criterion, labels=labels)
    sum_gradients(list(model.parameters()), dist.group.WORLD)
    errors = [grad_error(p.grad, r.grad) for p, r in zip(model.parameters(), ref_model.parameters())]
    exits = list(runner.placement.exits(rank, n))  # the micro-batches whose loss this rank computes
    same_loss = bool(torch.equal(loss, ref_loss[exits])) if exits else loss is None
    kinds = {"attention": "self_attn.o_proj.weight", "dense_mlp": "mlp.down_proj.weight",
             "shared_experts": "mlp.shared_experts.down_proj.weight", "routed_experts": "mlp.experts.up_proj"}
    seen = {kind: any(id(p) in deferred for name, p in model.named_parameters() if name.endswith(suffix)
                      and any(name.startswith(f"layers.{i}.") for s in runner.stages for i in s.layer_ids))
            for kind, suffix in kinds.items()}
    return same_loss, max(errors), seen


@pytest.mark.parametrize("schedule,world,n,fp8", [
    ("dualpipe", 2, 4, False), ("dualpipev", 2, 4, False), ("1f1b", 2, 3, False),
    ("dualpipe", 2, 4, True), ("dualpipev", 2, 4, True),
])
def test_split_stages_match_unpartitioned(schedule, world, n, fp8):
    results = run_local(_rank, world, schedule, 4, n, fp8, timeout_s=300)  # blocks: dense, then MoE
    for rank, (same_loss, worst, seen) in enumerate(results):
        assert same_loss, rank
        assert worst < 1e-13, (rank, worst)
        # 1F1B has no zero-bubble chunk, so nothing may be deferred there; the others defer on every rank
        assert any(seen.values()) == (schedule != "1f1b"), (rank, seen)
    if schedule != "1f1b":
        assert all(any(seen[kind] for _, _, seen in results) for kind in results[0][2]), results


@pytest.mark.parametrize("fp8", [False, True])
def test_split_composes_with_recompute(fp8):
    """Recomputation wraps the split class (parallelize applies the split first): the recomputed
    forward's weight gradients are deferred too, the values are the plain layer's."""
    from twinpipe.parallel.recompute import apply_recompute

    original, inputs = _experts(fp8)
    split = copy.deepcopy(original)
    zero_bubble.split_weight_gradients(split)
    apply_recompute(split, "moe")
    assert isinstance(split, zero_bubble.SPLIT_CLASSES[type(original)])
    want = _grads(original, inputs, store=False, autocast=False)
    out, grad_x, grads = _grads(split, inputs, store=True, autocast=False)
    assert torch.equal(out, want[0])
    exact = {"rtol": 0, "atol": 0} if fp8 else {}  # FP8: the same GEMMs; else summation order
    torch.testing.assert_close(grad_x, want[1], **exact)
    for name, g in grads.items():
        torch.testing.assert_close(g, want[2][name], **exact)
