"""The gate weights travel with their rows under expert parallelism (parallel/experts/dispatch.py).

The dispatch packs each row's fp32 weight into the row (`all_to_all.pack_rows`: its bytes in trailing
columns of the rows' dtype, 2 in BF16), the expert side scales its outputs by it, and the weight's
gradient comes back in the dispatch exchange's backward. Both directions only move bytes: asserted
bit for bit, with values that arithmetic would change (-0.0, a subnormal, a NaN with a payload, read
as BF16 halves they are arbitrary bit patterns), through the plain and the FP8 exchange; and with an
exact row-wise expert function, EP's output and its input and gate-weight gradients equal the
one-process MoE's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.parallel.test_expert_parallel import make_batch, tiny_config
from twinpipe.model.moe import MoE
from twinpipe.parallel.experts import all_to_all
from twinpipe.parallel.experts.layer import ExpertParallelExperts
from twinpipe.parallel.local import run_local

HIDDEN, ROWS = 128, 6  # rows each rank sends to each rank


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t.contiguous().view(torch.int16)


def _values(seed: int) -> torch.Tensor:
    """[2 * ROWS] fp32 values, the first four special."""
    special = torch.tensor([0x80000000, 0x00000001, 0x7FC01234, 0x3F80_0001], dtype=torch.int64)
    v = torch.rand(2 * ROWS, generator=torch.Generator().manual_seed(seed))
    v[:4] = special.to(torch.int32).view(torch.float32)
    return v


def _transport(rank: int, world: int, dtype: torch.dtype, fp8: bool) -> None:
    g = torch.Generator().manual_seed(rank)
    rows = torch.randn(2 * ROWS, HIDDEN, generator=g).to(dtype).requires_grad_()
    values = _values(rank).requires_grad_()
    splits = [ROWS, ROWS]
    packed, extra = all_to_all.pack_rows(rows, values)
    assert extra == 4 // rows.element_size()
    if fp8:
        sent = all_to_all.exchange_rows_fp8(packed, splits, splits, dist.group.WORLD, 128, raw=extra)
        alone = all_to_all.exchange_rows_fp8(rows.detach(), splits, splits, dist.group.WORLD, 128)
    else:
        sent = all_to_all.exchange_rows(packed, splits, splits, dist.group.WORLD)
        alone = all_to_all.exchange_rows(rows.detach(), splits, splits, dist.group.WORLD)
    got_rows, got_values = all_to_all.unpack_rows(sent, HIDDEN, values.dtype)
    assert torch.equal(_bits(got_rows), _bits(alone))  # the rows arrive as they would alone
    want = torch.cat([_values(src)[rank * ROWS:(rank + 1) * ROWS] for src in range(world)])
    assert torch.equal(_bits(got_values), _bits(want))
    # gradients back: each receiver sends special bit patterns; the sender gets them as they were
    grad_values = _values(100 + rank)
    grad_rows = torch.randn(got_rows.shape, generator=g).to(dtype)
    torch.autograd.backward([got_rows, got_values], [grad_rows, grad_values])
    want_grad = torch.cat([_values(100 + dst)[rank * ROWS:(rank + 1) * ROWS] for dst in range(world)])
    assert torch.equal(_bits(values.grad), _bits(want_grad))
    rows_back = all_to_all.all_to_all(grad_rows, splits, splits, dist.group.WORLD)
    assert torch.equal(_bits(rows.grad), _bits(rows_back))


@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_weights_and_their_gradients_travel_bit_for_bit(dtype, fp8):
    run_local(_transport, 2, dtype, fp8)


def _weight_gradient_exact(rank: int, world: int) -> None:
    """With an exact per-row expert function, EP equals one process bit for bit, now with the gate
    weights' gradient too (computed on the expert side, sent back with the dispatch's backward)."""
    torch.manual_seed(0)
    config = tiny_config()
    moe = MoE(config)
    moe.reset_parameters(0.05)
    x = make_batch(rank, config).view(-1, config.hidden_size)                 # [N, H]
    topk_weight, topk_idx, _ = moe.gate(x)
    topk_weight = topk_weight.detach()

    def rowwise(self, x_sorted, counts):                                     # exact per row
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        return torch.sin(x_sorted) * (1.0 + self.gate_proj[expert_of_row, 0, :1])

    def weighted(self, x_sorted, counts, weight=None):                       # as Experts: weight inside
        y = rowwise(self, x_sorted, counts)
        return y if weight is None else (y * weight.unsqueeze(-1)).to(x_sorted.dtype)

    experts = moe.experts
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for module in (experts, ExpertParallelExperts(experts, dist.group.WORLD)):
        target = getattr(module, "local", module)
        target.grouped_swiglu = weighted.__get__(target)
        x_in, w_in = x.detach().requires_grad_(), topk_weight.clone().requires_grad_()
        out = module(x_in, topk_idx, w_in)
        (out * probe).sum().backward()
        results.append((out, x_in.grad, w_in.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_ep_weight_gradients_exact():
    run_local(_weight_gradient_exact, 2)
