"""FP8 expert parallelism (gloo, 2 ranks): FP8 dispatch (power-of-2 scales, uint8 on the wire) into
FP8 experts (`twinpipe.fp8` emulation), against one process over the same global batch.

The reference is the unsharded FP8 MoE whose expert input goes through the same quantize-dequantize
as the dispatch (`act_quant(..., pow2=True)` then `act_dequant`, per 1×128 tile of each row, so it does
not matter whether it happens before or after the rows are sorted), with a straight-through gradient
— the dispatch's backward sends the gradient back unquantized. The reference runs the
global batch in one call, so every expert sees its tokens in the same order as after EP's dispatch
(rank 0's, then rank 1's) and the FP8 weight-gradient GEMM, which quantizes along tokens in 128-token
tiles, grid the same tokens (with the slices accumulated one after the other instead, the tiles
differ and expert gradients move by ~3% relative: FP8 noise, not an EP error). Tolerance as in
test_expert_parallel.py (rtol 1e-5 / atol 1e-6 on outputs, 1e-8 on gradients): the FP8 arithmetic
is the same on both sides; only fp32 summation orders differ.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from twinpipe.fp8 import act_dequant, act_quant
from twinpipe.fp8.experts import FP8Experts
from twinpipe.model import ModelConfig
from twinpipe.model.moe import MoE, set_aux_loss_scale
from twinpipe.parallel.experts.grad_reduction import reduce_expert_grads
from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.experts.layer import ExpertParallelExperts, is_expert_param
from twinpipe.parallel.local import run_local


def _pow2_qdq(x: torch.Tensor) -> torch.Tensor:
    q, s = act_quant(x, 128, pow2=True)
    return x + (act_dequant(q, s, 128, x.dtype) - x).detach()


class _QuantizedInputExperts(torch.nn.Module):
    """Reference: the unsharded experts fed the dispatch's quantize-dequantize of their input."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.inner = experts

    def forward(self, x, topk_idx, topk_weight):
        return self.inner(_pow2_qdq(x), topk_idx, topk_weight)


def _batch(rank: int, hidden: int) -> torch.Tensor:
    return torch.randn(2, 16, hidden, generator=torch.Generator().manual_seed(50 + rank))


def _fp8_ep(rank: int, world: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny")
    moe = MoE(config)
    moe.reset_parameters(0.05)
    FP8Experts.from_experts(moe.experts, "emulate")

    ref = copy.deepcopy(moe)
    ref.experts = _QuantizedInputExperts(ref.experts)
    # One call over the whole global batch: each expert's segment then holds the tokens of rank 0,
    # then rank 1 — the order EP's dispatch produces — so the FP8 weight-gradient GEMM quantizes the
    # same 128-token tiles on both sides.
    ref_out = ref(torch.cat([_batch(r, config.hidden_size) for r in range(world)]))
    ref_out.square().mean().backward()
    ref_outs = ref_out.detach().chunk(world)

    grid = build_grid(pp=1, dp=world, ep=world)
    moe.experts = ExpertParallelExperts(moe.experts, grid.ep_group, fp8_dispatch=True)
    assert isinstance(moe.experts.local, FP8Experts)
    # The rank's share of the global mean (not its own mean): the output gradient is then the same
    # number as in the reference, and so are the FP8 scales of the gradients (the amax floor of 1e-4
    # makes quantization not scale-invariant for tiny gradients). Gradients are summed, not averaged.
    set_aux_loss_scale(moe, 1.0 / world)  # taken by the forward's balance loss
    out = moe(_batch(rank, config.hidden_size))
    (out.square().sum() / ref_out.numel()).backward()
    torch.testing.assert_close(out, ref_outs[rank], rtol=1e-5, atol=1e-6)
    for p in (p for p in moe.parameters() if not is_expert_param(p)):
        dist.all_reduce(p.grad)
    reduce_expert_grads(moe, grid.edp_group, None, 1)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in moe.named_parameters():
        if name.startswith("experts.local."):
            ids = moe.experts.local_logical_ids()
            want = ref_grads[name.replace("experts.local.", "experts.inner.")][ids]
        else:
            want = ref_grads[name]
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_fp8_dispatch_into_fp8_experts_matches_single_process():
    run_local(_fp8_ep, 2)
