"""The gate weight applied inside `Experts.grouped_swiglu` (`scaled_rows`): outputs and every gradient
equal to the former combine, `(y * w).to(x.dtype)` after the experts, bit for bit, and the expert
outputs y no longer kept for the weight's gradient (the down GEMM is recomputed from what it keeps)."""

import pytest
import torch

from twinpipe.model.experts import Experts, scale_rows, sum_rows, weighted_swiglu


def old_forward(experts, x, topk_idx, topk_weight):
    """`Experts.forward` before the weight moved inside: the product after the experts, saving y."""
    k = topk_idx.shape[1]
    flat_idx = topk_idx.reshape(-1)
    order = flat_idx.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat_idx, minlength=experts.num_experts)
    y = experts.grouped_swiglu(x[token], counts)
    y = (y * topk_weight.reshape(-1)[order].unsqueeze(-1)).to(x.dtype)
    return sum_rows(x, token, y)


def inputs(experts, tokens, dtype, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    num_experts, hidden = experts.num_experts, experts.gate_proj.shape[2]
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(num_experts - 1, generator=g)[:k] for _ in range(tokens)])  # last expert empty
    weight = torch.rand(tokens, k, generator=g)  # the router's weights are fp32 (model/gate.py)
    weight[0, 0] = 0.0                           # a zero weight: its row's gradient is zero
    return x, idx, weight


def run(forward, experts, x, idx, weight, probe, autocast=False):
    """(output, x's gradient, weight's gradient, {parameter: gradient}, bytes saved for backward).
    Saved bytes: distinct storages other than the parameters' (what the graph holds on to)."""
    experts.zero_grad(set_to_none=True)
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = forward(experts, x, idx, weight)
    (out.float() * probe).sum().backward()
    grads = {n: p.grad for n, p in experts.named_parameters()}
    return out.detach(), x.grad, weight.grad, grads, sum(saved.values())


@pytest.mark.parametrize("dtype,autocast,shape", [
    (torch.float32, False, (4, 32, 16)),    # torch._grouped_mm
    (torch.float32, False, (4, 30, 14)),    # unaligned: the padded bmm
    (torch.bfloat16, False, (4, 32, 16)),
    (torch.float32, True, (4, 32, 16)),     # bf16 autocast over fp32 weights and input
])
def test_weight_inside_equals_weight_after_and_keeps_no_expert_outputs(dtype, autocast, shape):
    torch.manual_seed(0)
    experts = Experts(*shape)
    experts.reset_parameters(0.1)
    experts.to(dtype)
    tokens = 24
    x, idx, weight = inputs(experts, tokens, dtype)
    probe = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(2))
    new = run(type(experts).forward, experts, x, idx, weight, probe, autocast)
    old = run(old_forward, experts, x, idx, weight, probe, autocast)
    for got, want in zip(new[:3], old[:3]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for name, want in old[3].items():
        assert torch.equal(new[3][name], want), name
    rows = tokens * idx.shape[1]
    itemsize = 2 if dtype == torch.bfloat16 or autocast else 4
    # y is gone; the recomputation keeps the counts per expert (int64) besides what the GEMM keeps
    dropped = rows * shape[1] * itemsize - 8 * shape[0]
    if shape[1] % 4 or shape[2] % 4:  # the padded bmm keeps padded copies, not h: h is kept once more
        dropped -= rows * shape[2] * itemsize
    assert old[4] - new[4] == dropped, (old[4], new[4], dropped)


def test_weight_without_gradient_skips_the_recomputation(monkeypatch):
    """A weight that needs no gradient (a frozen router) needs no y: the down GEMM is not rerun."""
    from twinpipe.model import experts as module

    torch.manual_seed(0)
    experts = Experts(4, 32, 16)
    experts.reset_parameters(0.1)
    x, idx, weight = inputs(experts, 12, torch.float32)
    calls = []
    real = module.segment_mm
    out = experts(x.requires_grad_(), idx, weight)
    monkeypatch.setattr(module, "segment_mm", lambda *a: calls.append(1) or real(*a))
    out.sum().backward()
    assert calls == [] and x.grad is not None


def test_a_grouped_swiglu_without_weight_gets_it_applied_after():
    """A stand-in `grouped_swiglu(x, counts)` (tests replace it with exact row-wise ones) still works:
    `weighted_swiglu` scales its output after, as `scale_rows`."""
    experts = Experts(2, 8, 4)
    experts.grouped_swiglu = lambda x_sorted, counts: 2 * x_sorted
    x, weight = torch.randn(3, 8), torch.rand(3)
    got = weighted_swiglu(experts, x, torch.tensor([2, 1]), weight)
    assert torch.equal(got, scale_rows(2 * x, weight, x.dtype))
