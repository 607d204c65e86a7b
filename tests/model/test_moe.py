"""Router (hand-computed group-limited routing), experts (grouped GEMM vs a loop), balance loss."""

import math

import pytest
import torch

from twinpipe.model import Experts, Gate, ModelConfig, MoE
from twinpipe.model.experts import grouped_mm, sum_rows
from twinpipe.model.moe import sequence_balance_loss, set_aux_loss_scale


def logit(p):
    return math.log(p / (1 - p))


def identity_gate(num_experts, n_group, topk_group, top_k):
    """A gate whose scores are sigmoid(x): hidden = E and weight = I."""
    cfg = ModelConfig.preset("tiny", hidden_size=num_experts, n_routed_experts=num_experts,
                             n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(num_experts))
    return gate


def test_group_limited_routing_by_hand():
    gate = identity_gate(8, n_group=4, topk_group=2, top_k=2)
    s = [0.9, 0.1, 0.5, 0.6, 0.2, 0.3, 0.8, 0.05]
    x = torch.tensor([[logit(p) for p in s]])
    # No bias: group scores (sum of both experts) 1.0, 1.1, 0.5, 0.85 -> groups 1, 0 -> experts 0, 3.
    w, idx, scores = gate(x)
    torch.testing.assert_close(scores, torch.tensor([s]))
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 3]
    torch.testing.assert_close(w[0][order], torch.tensor([0.9 / 1.5 * 2.5, 0.6 / 1.5 * 2.5]))
    # Bias +0.5 on experts 4, 5: biased = .9 .1 .5 .6 .7 .8 .8 .05; groups 1.0 1.1 1.5 .85 -> groups 2, 1
    # -> candidates 2..5 -> experts 5, 4 (expert 0 has the best score but its group lost; expert 6 too).
    # Gate values come from the *unbiased* scores 0.2 and 0.3.
    gate.e_score_correction_bias[4:6] = 0.5
    w, idx, _ = gate(x)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [4, 5]
    torch.testing.assert_close(w[0][order], torch.tensor([0.2 / 0.5 * 2.5, 0.3 / 0.5 * 2.5]))


def test_group_score_is_sum_of_top2():
    gate = identity_gate(12, n_group=3, topk_group=1, top_k=2)
    # group max picks group 0 (0.9), sum of all picks group 2 (1.4), sum of top-2 picks group 1 (1.1).
    s = [0.9, 0.1, 0.1, 0.1, 0.55, 0.55, 0.01, 0.01, 0.35, 0.35, 0.35, 0.35]
    w, idx, _ = gate(torch.tensor([[logit(p) for p in s]]))
    assert sorted(idx[0].tolist()) == [4, 5]
    torch.testing.assert_close(w[0], torch.tensor([1.25, 1.25]))


def test_balance_loss_by_hand():
    # seq 0: scores rows sum to 1 and 2 (normalized per token), picks {0,1} and {0,2};
    #   f = E/(K T) * counts = 4/4 * [2, 1, 1, 0]; P = mean of normalized scores = [.3, .2, .25, .25]
    #   L0 = 2*.3 + 1*.2 + 1*.25 = 1.05.  seq 1: uniform scores, picks {0,1}, {2,3}: L1 = 1.
    scores = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.8, 0.8]],
                           [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]])
    idx = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [2, 3]]])
    loss = sequence_balance_loss(scores, idx, num_experts=4)
    torch.testing.assert_close(loss, torch.tensor((1.05 + 1.0) / 2))


def make_moe(alpha=1e-2):
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny", aux_loss_alpha=alpha))
    moe.reset_parameters(0.1)
    return moe


def test_balance_loss_gradient_reaches_gate_weight():
    moe = make_moe()
    x = torch.randn(2, 5, 128)
    set_aux_loss_scale(moe, 0.5)
    y = moe(x)
    (y * 0).sum().backward()  # only the attached balance loss has a gradient
    _, idx, scores = moe.gate(x.view(10, 128))
    expected = torch.autograd.grad(0.5 * 1e-2 * sequence_balance_loss(scores.view(2, 5, 8), idx.view(2, 5, 2), 8),
                                   moe.gate.weight)[0]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(moe.gate.weight.grad, expected)
    torch.testing.assert_close(moe.last_balance_loss, 1e-2 * sequence_balance_loss(
        scores.view(2, 5, 8), idx.view(2, 5, 2), 8).detach())
    assert moe.last_counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    assert moe.last_counts.sum() == 10 * 2


def test_each_layer_uses_its_own_aux_loss_scale():
    """Two layers with scales 0.5 and 0.25 in one backward: the second's gate gradient is exactly
    half the first's (scaling by a power of two is exact), so neither read the other's scale."""
    import copy

    first = make_moe()
    second = copy.deepcopy(first)
    set_aux_loss_scale(first, 0.5)
    set_aux_loss_scale([second], 0.25)
    x = torch.randn(2, 5, 128)
    ((first(x) + second(x)) * 0).sum().backward()
    assert first.gate.weight.grad.abs().sum() > 0
    assert torch.equal(second.gate.weight.grad * 2, first.gate.weight.grad)
    assert MoE(ModelConfig.preset("tiny")).aux_loss_scale == 1.0  # a new layer: the plain gradient


def test_no_balance_gradient_when_alpha_zero():
    moe = make_moe(alpha=0.0)
    (moe(torch.randn(2, 5, 128)) * 0).sum().backward()
    assert moe.gate.weight.grad is None or moe.gate.weight.grad.abs().sum() == 0


def loop_experts(experts, x, idx, w):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[n]) * (experts.up_proj[e] @ x[n])
            out[n] += w[n, k] * (experts.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp64: the padded-bmm fallback
def test_experts_match_per_token_loop(dtype):
    torch.manual_seed(0)
    experts = Experts(6, 16, 8).to(dtype)
    experts.reset_parameters(0.3)
    x = torch.randn(9, 16, dtype=dtype)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(9)])
    idx[:, 0] = 2  # one crowded expert, some empty ones
    idx[:, 1] = torch.where(idx[:, 1] == 2, 5, idx[:, 1])
    idx[:, 2] = torch.where((idx[:, 2] == 2) | (idx[:, 2] == 5), 0, idx[:, 2])
    w = torch.rand(9, 3, dtype=dtype)
    torch.testing.assert_close(experts(x, idx, w), loop_experts(experts, x, idx, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_scatter_keeps_only_its_index(dtype):
    """sum_rows (the combine's scatter of expert outputs into tokens) gives index_add_'s output and
    source gradient bit for bit, and saves the index alone: autograd's index_add_ also saves the
    [N*K, H] source, a second copy of the expert outputs next to the one the gate-weight product keeps."""
    torch.manual_seed(0)
    like = torch.randn(5, 16, dtype=dtype)
    index = torch.tensor([4, 0, 0, 2, 4, 4, 1])
    src = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sum_rows(like, index, src)
    assert [t.dtype for t in saved] == [torch.int64] and torch.equal(saved[0], index)
    ref_src = src.detach().clone().requires_grad_()
    ref = torch.zeros_like(like).index_add_(0, index, ref_src)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(src.grad, ref_src.grad)


def test_grouped_mm_paths_agree_with_empty_groups():
    torch.manual_seed(0)
    x, w = torch.randn(10, 8), torch.randn(4, 8, 12)
    counts = torch.tensor([3, 0, 7, 0])
    for dtype in (torch.float32, torch.float64):  # _grouped_mm, then the padded bmm
        xd, wd = x.to(dtype), w.to(dtype)
        ref = torch.cat([xd[:3] @ wd[0], xd[3:] @ wd[2]])
        torch.testing.assert_close(grouped_mm(xd, wd, counts), ref)


def test_select_copies_rows_in_order_with_repeats():
    torch.manual_seed(0)
    experts = Experts(5, 16, 8)
    experts.reset_parameters(0.3)
    local = experts.select([3, 1, 3])
    assert type(local) is Experts and local.num_experts == 3 and local.gate_proj.shape == (3, 8, 16)
    torch.testing.assert_close(local.down_proj[2], experts.down_proj[3])
    assert local.gate_proj.data_ptr() != experts.gate_proj.data_ptr()
    x, w = torch.randn(4, 16), torch.rand(4, 2)
    local_idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    global_idx = torch.tensor([3, 1, 3])[local_idx]
    torch.testing.assert_close(local(x, local_idx, w), experts(x, global_idx, w))


def test_router_bias_stays_fp32_and_moves():
    moe = make_moe()
    moe.gate.e_score_correction_bias.fill_(1e-3 + 1e-7)
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(1e-3 + 1e-7, rel=1e-7)
    assert "gate.e_score_correction_bias" in moe.state_dict()


def test_autocast_keeps_router_fp32_and_runs_experts_in_bf16():
    moe = make_moe()
    x = torch.randn(2, 5, 128)
    ref_w, ref_idx, ref_scores = moe.gate(x.view(10, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, scores = moe.gate(x.view(10, 128))
        y = moe.experts(x.view(10, 128), idx, w)
    assert scores.dtype == torch.float32 and torch.equal(scores, ref_scores) and torch.equal(idx, ref_idx)
    assert y.dtype == torch.float32  # cast back to the input dtype after the bf16 GEMMs
    ref_y = moe.experts(x.view(10, 128), idx, w)
    torch.testing.assert_close(y, ref_y, rtol=0.05, atol=0.02)  # bf16 GEMMs: ~3 significant digits
    assert not torch.equal(y, ref_y)
