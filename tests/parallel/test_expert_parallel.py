"""Expert parallelism against the single-process MoE on the same global batch (gloo, fp32).

Each rank builds the same model (same seed), then:
  reference: the unsharded model runs the dp slices of the global batch one after the other
             (loss = mean over slices, gradients accumulated) — what DP computes;
  expert-parallel: `apply_expert_parallel`, this rank's slice only, dense gradients averaged over DP
             (as DeepSpeed does), expert gradients by `reduce_expert_grads`.

What is exactly equal: the routing and the dispatched rows (the all-to-all moves bytes) — asserted bit
for bit by `test_dispatch_combine_exact` with a row-wise expert function, including the order in which
each token's K picks are summed. What is equal up to fp32 rounding: outputs and gradients, because
(a) an expert's segment now holds the tokens of all EP ranks and the GEMM's rounding of a row depends
on the segment length (CPU fp32 kernels pick their blocking by M), and (b) sums over tokens run in
another order — an expert's weight gradient is one GEMM over all EP ranks' tokens instead of one per
slice, and the DP all-reduce adds ranks pairwise. Measured: outputs usually bit-identical, gradient
differences <= 5e-10 on values of order 1e-3. Tolerance rtol 1e-5 / atol 1e-6 (outputs, O(1)) and
atol 1e-8 (gradients, O(1e-3)): ~100x the rounding, far below what a routing or indexing error gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model.config import ModelConfig
from twinpipe.model.moe import MoE, set_aux_loss_scale
from twinpipe.parallel.experts.grad_reduction import reduce_expert_grads
from twinpipe.parallel.experts.layer import ExpertParallelExperts, apply_expert_parallel, is_expert_param
from twinpipe.parallel.experts.slots import group_to_nodes
from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.local import run_local
from twinpipe.parallel.experts.grad_reduction import expert_grad_sq

RTOL, ATOL = 1e-5, 1e-8
BATCH, SEQ = 2, 16


class MoEStack(nn.Module):
    """Residual MoE layers (the MoE seam of `twinpipe.model`, without attention)."""

    def __init__(self, config: ModelConfig, num_layers: int = 2):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MoE(config) for _ in range(num_layers))
        for layer in self.layers:
            layer.reset_parameters(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def make_batch(rank: int, config: ModelConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(BATCH, SEQ, config.hidden_size, generator=g)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def reference(model: nn.Module, dp: int, config: ModelConfig) -> tuple[list[torch.Tensor], dict]:
    """dp slices as gradient-accumulation micro-batches (the balance loss scaled like the LM loss)."""
    outs = []
    set_aux_loss_scale(model, 1.0 / dp)
    for r in range(dp):
        out = model(make_batch(r, config))
        (loss_of(out) / dp).backward()
        outs.append(out.detach())
    return outs, {n: p.grad.clone() for n, p in model.named_parameters()}


def allreduce_dense(model: nn.Module, dp: int) -> None:
    for p in (p for p in model.parameters() if not is_expert_param(p)):
        dist.all_reduce(p.grad)
        p.grad.div_(dp)


def _ep_vs_single(rank: int, world: int, ep: int, num_replicas: int | None) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    model = MoEStack(config)
    ref_outs, ref_grads = reference(copy.deepcopy(model), world, config)

    grid = build_grid(pp=1, dp=world, ep=ep)
    apply_expert_parallel(model, grid.ep_group, num_replicas=num_replicas)
    out = model(make_batch(rank, config))
    loss_of(out).backward()
    expert = [n for n, p in model.named_parameters() if is_expert_param(p)]
    assert len(expert) == 3 * len(model.layers) and all(".local." in n for n in expert)
    allreduce_dense(model, world)
    reduce_expert_grads(model, grid.edp_group, grid.dp_group, world)

    torch.testing.assert_close(out, ref_outs[rank], rtol=RTOL, atol=1e-6)
    want_sq = sum(float(g.double().pow(2).sum()) for n, g in ref_grads.items() if ".experts." in n)
    got_sq = expert_grad_sq(model)                    # this rank's slots, replicas weighted 1/copies
    dist.all_reduce(got_sq, group=grid.ep_group)
    assert abs(float(got_sq) - want_sq) <= 1e-6 * want_sq
    for name, p in model.named_parameters():
        if ".local." in name:
            layer_name = name.split(".experts.")[0]
            layer = model.get_submodule(layer_name + ".experts")
            ref = ref_grads[name.replace(".local.", ".")][layer.local_logical_ids()]
        else:
            ref = ref_grads[name]
        torch.testing.assert_close(p.grad, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world,ep", [(4, 2), (8, 4)])
def test_ep_matches_single_process(world, ep):
    run_local(_ep_vs_single, world, ep, None)


def test_ep_with_redundant_replicas_matches_single_process():
    # 12 slots for 8 experts over 4 ranks: experts 0..3 have two replicas on different ranks.
    run_local(_ep_vs_single, 4, 4, 12)


def _routing_and_dispatch_exact(rank: int, world: int) -> None:
    """With the expert GEMM replaced by an exact per-row function, EP equals the reference bit for bit,
    forward and input gradient: dispatch and combine (and their backwards) only move rows, and every
    token's K picks are summed in the same order."""
    torch.manual_seed(0)
    config = tiny_config()
    moe = MoE(config)
    moe.reset_parameters(0.05)
    x = make_batch(rank, config).view(-1, config.hidden_size)                 # [N, H]
    topk_weight, topk_idx, _ = moe.gate(x)
    topk_weight = topk_weight.detach()
    expected = moe.experts.__class__.forward

    def rowwise(self, x_sorted, counts):                                     # exact per row
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return x_sorted * (1.0 + self.gate_proj[expert_of_row, 0, :1])

    experts = moe.experts
    experts.grouped_swiglu = rowwise.__get__(experts)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_ref = x.detach().requires_grad_()
    want = expected(experts, x_ref, topk_idx, topk_weight)
    (want * probe).sum().backward()
    ep_experts = ExpertParallelExperts(experts, dist.group.WORLD)
    ep_experts.local.grouped_swiglu = rowwise.__get__(ep_experts.local)
    x_ep = x.detach().requires_grad_()
    got = ep_experts(x_ep, topk_idx, topk_weight)
    (got * probe).sum().backward()                  # combine's backward dispatches the gradients
    assert torch.equal(got, want)
    assert torch.equal(x_ep.grad, x_ref.grad)


def test_dispatch_combine_exact():
    run_local(_routing_and_dispatch_exact, 2)


def test_group_to_nodes():
    assert group_to_nodes(256, 8, 64, 8) == list(range(8))
    assert group_to_nodes(8, 4, 4, 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="n_group"):
        group_to_nodes(8, 2, 4, 4)
