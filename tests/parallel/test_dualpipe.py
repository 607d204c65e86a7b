"""DualPipe, DualPipeV and 1F1B against the unpartitioned model over the same micro-batches.

As deepseek-ai/DualPipe's own test: every rank (real gloo processes) also runs the whole model
micro-batch by micro-batch. Losses must be bitwise equal (fp32, same ops on the same shapes, one thread
per rank). Gradients are sums over micro-batches taken in a different order (and, for DualPipe, over
two copies of a stage), so they may differ by rounding: 1 - 2<x,y>/(|x|^2+|y|^2) < 1e-13 (float64
metric), the bound DualPipe's test uses. Inference (no_grad, return_outputs) must give equal outputs.
The peak number of micro-batch activations a rank holds is pinned to docs/reference.md §4.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from twinpipe.parallel.dualpipe import (DualPipe, DualPipeV, WeightGradStore,
                                        set_p2p_tensor_dtype, set_p2p_tensor_shapes)
from twinpipe.parallel.local import run_local
from twinpipe.parallel.pipeline import engine
from twinpipe.parallel.pipeline.engine import sequential_forward_backward
from twinpipe.parallel.pipeline.one_f_one_b import OneFOneB
from twinpipe.parallel.pipeline.weight_grad_store import linear

HIDDEN, MICRO = 16, 3
LIVE = {"now": 0, "peak": 0}  # micro-batch activations held by this rank's stages (forward done, B not)


def _release(grad):
    LIVE["now"] -= 1


class MLPStage(nn.Module):
    """x + W2 tanh(W1 x + b1): its linears defer weight gradients under zero-bubble B."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * hidden, hidden) / hidden ** 0.5)
        self.b1 = nn.Parameter(torch.randn(2 * hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, 2 * hidden) / (2 * hidden) ** 0.5)

    def forward(self, x):  # x: [micro, hidden]
        y = x + linear(torch.tanh(linear(x, self.w1, self.b1)), self.w2)
        if y.requires_grad:
            LIVE["now"] += 1
            LIVE["peak"] = max(LIVE["peak"], LIVE["now"])
            y.register_hook(_release)  # runs when this chunk's backward reaches the stage
        return y


def criterion(out, target):
    return F.mse_loss(out, target)


def portable(obj):
    """Tensors -> numpy inside nested containers: run_local's queue cannot carry tensors back."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(o) for o in obj)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    return obj


def restored(obj):
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and not isinstance(obj, torch.Tensor):
        return torch.from_numpy(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(restored(o) for o in obj)
    if isinstance(obj, dict):
        return {k: restored(v) for k, v in obj.items()}
    return obj


def run(fn, world, *args):
    return restored(run_local(fn, world, *args, timeout_s=120))


def grad_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return (1 - 2 * (x @ y) / (x @ x + y @ y)).item()


def make_problem(num_stages: int, num_chunks: int):
    torch.manual_seed(0)
    stages = [MLPStage(HIDDEN) for _ in range(num_stages)]
    x = torch.randn(num_chunks * MICRO, HIDDEN)
    target = torch.randn(num_chunks * MICRO, HIDDEN)
    return stages, x, target


def reference(stages, x, target, num_chunks):
    """Per-micro-batch losses, summed gradients per stage, and outputs of the whole model."""
    losses, outputs = [], []
    for xi, ti in zip(x.chunk(num_chunks), target.chunk(num_chunks)):
        h = xi
        for s in stages:
            h = s(h)
        loss = criterion(h, ti)
        loss.backward()
        losses.append(loss.detach())
        outputs.append(h.detach())
    grads = [[p.grad.clone() for p in s.parameters()] for s in stages]
    return torch.stack(losses), grads, torch.cat(outputs)


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def _problem_and_reference(n_stages, num_chunks):
    """Fresh stages and data, the one-process result on them (grads then cleared), fp32 P2P set up."""
    stages, x, target = make_problem(n_stages, num_chunks)
    reference_result = reference(stages, x, target, num_chunks)
    for s in stages:
        s.zero_grad(set_to_none=True)
    set_p2p_tensor_shapes([(MICRO, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    return stages, x, target, reference_result


def _flow_groups(world):
    """A communicator per direction over the whole world (Grid.pp_flow_groups of one pipeline)."""
    return (dist.new_group(list(range(world))), dist.new_group(list(range(world))))


def _run_dualpipe(rank, world, num_chunks, v_shape, hook, mapping=None, flows=False):
    pos = mapping[rank] if mapping else rank  # this process's place in the pipeline
    n_stages = 2 * world if v_shape else world
    stages, x, target, (ref_loss, ref_grads, ref_out) = _problem_and_reference(n_stages, num_chunks)
    pair = (stages[pos], stages[n_stages - 1 - pos])
    groups = _flow_groups(world) if flows else None
    if v_shape:
        pipe = DualPipeV(pair, overlapped_forward_backward=hook, rank_mapping=mapping, p2p_groups=groups)
        inputs, labels = ([x], [target]) if pos == 0 else ([], [])
    else:
        pipe = DualPipe(pair, overlapped_forward_backward=hook, rank_mapping=mapping, p2p_groups=groups)
        half_x, half_t = x.chunk(2), target.chunk(2)
        # position 0 feeds the first half, whose losses land on position N-1, and vice versa
        inputs = [half_x[0]] if pos == 0 else [half_x[1]] if pos == world - 1 else []
        labels = [half_t[1]] if pos == 0 else [half_t[0]] if pos == world - 1 else []
    LIVE.update(now=0, peak=0)
    loss, _ = pipe.step(*inputs, num_chunks=num_chunks, criterion=criterion, labels=labels)
    grads = (_grads(pair[0]), _grads(pair[1]))
    with torch.no_grad():
        _, out = pipe.step(*inputs, num_chunks=num_chunks, return_outputs=True)
    return portable(dict(loss=loss, out=out, grads=grads, ref_loss=ref_loss, ref_grads=ref_grads,
                         ref_out=ref_out, queue_empty=WeightGradStore.funcs_queue.empty(),
                         peak=LIVE["peak"]))


def _check_grads(results, stage_of):
    """Sum each stage's gradient over the (rank, module) copies holding it; compare with reference."""
    ref = results[0]["ref_grads"]
    summed = [None] * len(ref)
    for rank, res in enumerate(results):
        for m in range(2):
            s = stage_of(rank, m)
            summed[s] = res["grads"][m] if summed[s] is None else [
                a + b for a, b in zip(summed[s], res["grads"][m])]
    for s, (got, want) in enumerate(zip(summed, ref)):
        for g, w in zip(got, want):
            assert grad_error(g, w) < 1e-13, f"stage {s}: gradient error {grad_error(g, w)}"


def _check_dualpipe(res, world, num_chunks):
    half = num_chunks // 2
    first, last = res[0], res[-1]
    assert torch.equal(first["loss"], first["ref_loss"][half:])
    assert torch.equal(last["loss"], first["ref_loss"][:half])
    assert torch.equal(first["out"], first["ref_out"][half * MICRO:])
    assert torch.equal(last["out"], first["ref_out"][:half * MICRO])
    assert all(r["loss"] is None and r["out"] is None for r in res[1:-1])
    _check_grads(res, lambda r, m: r if m == 0 else world - 1 - r)
    # activation memory of docs/reference.md §4: PP + 1 micro-batches in flight on every rank
    assert [r["peak"] for r in res] == [world + 1] * world


@pytest.mark.parametrize("world,num_chunks", [(2, 4), (2, 6), (4, 10)])
def test_dualpipe_matches_unpartitioned(world, num_chunks):
    _check_dualpipe(run(_run_dualpipe, world, num_chunks, False, None), world, num_chunks)


def test_rank_mapping_places_stages_by_position():
    """Group rank g runs pipeline position mapping[g] (deepseek-ai/DualPipe's rank_mapping)."""
    world, num_chunks, mapping = 4, 8, [2, 0, 3, 1]
    res = run(_run_dualpipe, world, num_chunks, False, None, mapping)
    _check_dualpipe([res[mapping.index(p)] for p in range(world)], world, num_chunks)


@pytest.mark.parametrize("world,num_chunks", [(1, 5), (2, 4), (3, 7), (4, 8)])
def test_dualpipev_matches_unpartitioned(world, num_chunks):
    res = run(_run_dualpipe, world, num_chunks, True, None)
    assert torch.equal(res[0]["loss"], res[0]["ref_loss"])
    assert torch.equal(res[0]["out"], res[0]["ref_out"])
    assert all(r["loss"] is None for r in res[1:])
    _check_grads(res, lambda r, m: r if m == 0 else 2 * world - 1 - r)
    # PP + 1 with PP = 2N stages (each half a rank's share): 2N + 1 stage activations per rank
    assert [r["peak"] for r in res] == [2 * world + 1] * world


@pytest.mark.parametrize("v_shape,world,num_chunks,mapping", [
    (False, 2, 4, None), (False, 4, 10, None), (False, 4, 8, [2, 0, 3, 1]), (True, 2, 4, None), (True, 3, 7, None),
    (True, 4, 8, None)])
def test_a_communicator_per_direction_runs_pairs_apart_with_the_same_results(v_shape, world, num_chunks, mapping):
    """With `p2p_groups` and no overlap hook an F&B chunk runs as an F chunk then a B chunk (its forward's
    output sent before the backward runs) and computes only wait for receives: the same losses, outputs,
    gradients (the same sums in the same order: bit for bit) and activation peaks as the paired run."""
    paired = run(_run_dualpipe, world, num_chunks, v_shape, None, mapping)
    apart = run(_run_dualpipe, world, num_chunks, v_shape, None, mapping, True)
    for a, b in zip(paired, apart):
        assert (a["loss"] is None) == (b["loss"] is None) and (a["loss"] is None or torch.equal(a["loss"], b["loss"]))
        assert (a["out"] is None) == (b["out"] is None) and (a["out"] is None or torch.equal(a["out"], b["out"]))
        assert all(torch.equal(g, h) for m in range(2) for g, h in zip(a["grads"][m], b["grads"][m]))
        assert a["peak"] == b["peak"] and b["queue_empty"]


def test_pairs_run_apart_only_with_a_communicator_per_direction():
    """The paired F&B step (what an overlap hook needs) runs without `p2p_groups`; with them, and no hook,
    no chunk goes through it."""
    def count(rank, world, flows):
        calls = []
        original = engine.sequential_forward_backward
        engine.sequential_forward_backward = lambda *a: calls.append(1) or original(*a)
        _run_dualpipe(rank, world, 6, False, None, None, flows)
        return len(calls)
    assert min(run(count, 2, False)) > 0 and run(count, 2, True) == [0, 0]


def _counting_hook(calls):
    def hook(*args):
        calls.append(1)
        return sequential_forward_backward(*args)
    return hook


def _run_with_hook(rank, world, num_chunks, v_shape):
    calls = []
    res = _run_dualpipe(rank, world, num_chunks, v_shape, _counting_hook(calls))
    res["calls"] = len(calls)
    return res


@pytest.mark.parametrize("v_shape", [False, True])
def test_overlap_hook_runs_forward_backward_pairs(v_shape):
    world, num_chunks = 2, 6
    res = run(_run_with_hook, world, num_chunks, v_shape)
    assert torch.equal(res[0]["loss"], res[0]["ref_loss"][num_chunks // 2:] if not v_shape
                       else res[0]["ref_loss"])
    stage_of = (lambda r, m: 2 * world - 1 - r if m else r) if v_shape else (
        lambda r, m: world - 1 - r if m else r)
    _check_grads(res, stage_of)
    # Step 4 pairs every chunk's forward with a backward except the turn rank's first; step 5 adds
    # h-p-1 more; inference (no_grad) never calls it.
    k = num_chunks if v_shape else num_chunks // 2
    h = world if v_shape else world // 2
    for rank, r in enumerate(res):
        p = rank if v_shape else min(rank, world - 1 - rank)
        main = k - 2 * h + p + 1
        assert r["calls"] == 2 * main - (p == h - 1) + (h - p - 1), (rank, r["calls"])
    assert all(r["queue_empty"] for r in res)


def _run_1f1b(rank, world, num_chunks, flows=False):
    stages, x, target, (ref_loss, ref_grads, ref_out) = _problem_and_reference(world, num_chunks)
    pipe = OneFOneB(stages[rank], p2p_groups=_flow_groups(world) if flows else None)
    inputs = [x] if rank == 0 else []
    labels = [target] if rank == world - 1 else []
    LIVE.update(now=0, peak=0)
    loss, _ = pipe.step(*inputs, num_chunks=num_chunks, criterion=criterion, labels=labels)
    peak = LIVE["peak"]
    with torch.no_grad():
        _, out = pipe.step(*inputs, num_chunks=num_chunks, return_outputs=True)
    return portable(dict(loss=loss, out=out, grads=_grads(stages[rank]), ref_loss=ref_loss,
                         ref_grads=ref_grads[rank], ref_out=ref_out, peak=peak))


@pytest.mark.parametrize("world,num_chunks,flows", [(1, 3, False), (3, 2, False), (4, 8, False), (4, 8, True)])
def test_1f1b_matches_unpartitioned(world, num_chunks, flows):
    res = run(_run_1f1b, world, num_chunks, flows)
    assert torch.equal(res[-1]["loss"], res[-1]["ref_loss"])
    assert torch.equal(res[-1]["out"], res[-1]["ref_out"])
    for rank, r in enumerate(res):
        for g, w in zip(r["grads"], r["ref_grads"]):
            assert grad_error(g, w) < 1e-13, (rank, grad_error(g, w))
    # rank r holds the warm-up's N - r micro-batches (PP on the first rank)
    assert [r["peak"] for r in res] == [min(world - r, num_chunks) for r in range(world)]


def _make(rank, world, kind, num_chunks):
    stages, x, _ = make_problem(2 * world, num_chunks)
    set_p2p_tensor_shapes([(MICRO, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    pipe = kind((stages[0], stages[1]))
    with torch.no_grad():
        pipe.step(*([x] if rank == 0 else []), num_chunks=num_chunks)


@pytest.mark.parametrize("kind,world,num_chunks,message", [
    (DualPipe, 3, 6, "even number of pipeline ranks"),
    (DualPipe, 2, 2, "num_chunks=2 on 2 ranks"),
    (DualPipe, 2, 5, "num_chunks=5 on 2 ranks"),
    (DualPipeV, 2, 3, "DualPipeV num_chunks=3"),
])
def test_clear_errors(kind, world, num_chunks, message):
    with pytest.raises(RuntimeError, match=message):
        run(_make, world, kind, num_chunks)


def test_split_linear_defers_weight_grad_only_when_enabled():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    x = torch.randn(5, 3, requires_grad=True)
    F.linear(x, w, b).square().sum().backward()
    want = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    linear(x, w, b).square().sum().backward()
    WeightGradStore.enabled = False
    WeightGradStore.flush()
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(x.grad, want[0])
    WeightGradStore.pop()
    torch.testing.assert_close(w.grad, want[1])
    torch.testing.assert_close(b.grad, want[2])
