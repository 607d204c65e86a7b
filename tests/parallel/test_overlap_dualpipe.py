"""The overlapped forward-backward plugged into DualPipe, with expert parallelism, on gloo ranks.

Grid pp = 2 × dp, ep = dp (dp = 2 in fp32; dp = 4 with FP8: FP8 Linear/experts by emulation and the
FP8 dispatch): each pipeline rank holds two stages (DualPipe's pair), each stage one DeepSeek-V3 block
whose MoE is expert-parallel over the data-parallel ranks of that pipeline rank. The same step runs
with DualPipe's default hook (forward, then backward) and with `overlapped_forward_backward` (the two
interleaved at every all-to-all): the schedule, the P2P traffic and every arithmetic operation are
the same, so losses and gradients must be equal bit for bit, and nothing may deadlock (every EP
collective pairs up across the data-parallel ranks). The per-micro-batch losses also match the
unpartitioned blocks run in one process (with FP8: the same FP8 modules, their expert input passed
through the dispatch's quantize-dequantize), to rtol 1e-6: FP8 quantization is per row and per
weight block, so only the expert GEMMs' segment lengths differ (see test_expert_parallel.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twinpipe.fp8 import act_dequant, act_quant
from twinpipe.fp8.convert import convert_model
from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.dualpipe import DualPipe, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from twinpipe.parallel.experts.layer import apply_expert_parallel
from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.local import run_local
from twinpipe.parallel.experts import overlap
from twinpipe.parallel.experts.overlap import overlapped_forward_backward

MICRO, SEQ, CHUNKS = 2, 8, 4


class BlockStage(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # [micro, T, H]
        return self.block(h)


def _criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


class _QuantizedDispatchReference(nn.Module):
    """Unsharded experts fed the FP8 dispatch's quantize-dequantize of their input (row-wise)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.inner = experts

    def forward(self, x, topk_idx, topk_weight):
        q, s = act_quant(x, 128, pow2=True)
        return self.inner(act_dequant(q, s, 128, x.dtype), topk_idx, topk_weight)


def _step(rank: int, world: int, overlapped: bool, dp: int, fp8: bool):
    grid = build_grid(pp=2, dp=dp, ep=dp)
    config = ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0.05)
    if fp8:
        convert_model(model, "emulate")
    plain = copy.deepcopy(model)
    if fp8:
        for moe in (plain.layers[1].mlp, plain.layers[2].mlp):
            moe.experts = _QuantizedDispatchReference(moe.experts)
    apply_expert_parallel(model, grid.ep_group, fp8_dispatch=fp8)
    stages = [BlockStage(model.layers[1]), BlockStage(model.layers[2])]
    pair = (stages[grid.pp_rank], stages[1 - grid.pp_rank])
    set_p2p_tensor_shapes([(MICRO, SEQ, config.hidden_size)])
    set_p2p_tensor_dtype(torch.float32)
    pipe = DualPipe(pair, process_group=grid.pp_group,
                    overlapped_forward_backward=overlapped_forward_backward if overlapped else None)
    g = torch.Generator().manual_seed(7 + grid.dp_rank)
    x = torch.randn(CHUNKS * MICRO, SEQ, config.hidden_size, generator=g)
    target = torch.randn(CHUNKS * MICRO, SEQ, config.hidden_size, generator=g)
    half_x, half_t = x.chunk(2), target.chunk(2)
    inputs = [half_x[0]] if grid.pp_rank == 0 else [half_x[1]]
    labels = [half_t[1]] if grid.pp_rank == 0 else [half_t[0]]
    overlap.LAST_REGION.update(switches=0, exchanges=0, planned=False)
    loss, _ = pipe.step(*inputs, num_chunks=CHUNKS, criterion=_criterion, labels=labels)
    region = dict(overlap.LAST_REGION)
    with torch.no_grad():  # the unpartitioned two blocks, micro-batch by micro-batch
        ref = torch.stack([_criterion(plain.layers[2](plain.layers[1](xi)), ti)
                           for xi, ti in zip(x.chunk(CHUNKS), target.chunk(CHUNKS))])
    # rank 0 feeds the first half, whose losses land on the last rank, and vice versa
    want = ref[CHUNKS // 2:] if grid.pp_rank == 0 else ref[:CHUNKS // 2]
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0.0)
    grads = {f"{m}.{n}": p.grad.clone() for m, mod in enumerate(pair) for n, p in mod.named_parameters()
             if p.grad is not None}
    return loss, grads, region


def _compare(rank: int, world: int, dp: int, fp8: bool) -> int:
    seq_loss, seq_grads, _ = _step(rank, world, False, dp, fp8)
    ovl_loss, ovl_grads, region = _step(rank, world, True, dp, fp8)
    assert region["switches"] > 0, "DualPipe never ran an overlapped forward-backward pair"
    # the last pair's backward was cut into sub-layer chunks and drove its stage's (one MoE block's)
    # combine and dispatch all-to-alls itself (FP8 dispatch included)
    assert region["planned"] and region["exchanges"] == 2, region
    assert torch.equal(seq_loss, ovl_loss)
    assert seq_grads.keys() == ovl_grads.keys() and len(seq_grads) > 0
    for name in seq_grads:
        assert torch.equal(seq_grads[name], ovl_grads[name]), name
    return len(seq_grads)


@pytest.mark.parametrize("dp,fp8", [(2, False), (4, True)])
def test_dualpipe_with_overlapped_expert_parallel_blocks(dp, fp8):
    counts = run_local(_compare, 2 * dp, dp, fp8, timeout_s=300)
    assert all(c > 0 for c in counts)
