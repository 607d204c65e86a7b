"""The all-to-all exchanges of expert parallelism: row counts, and rows (BF16/FP32, or FP8 on the way out).

Every exchange is one `dist.all_to_all_single` with variable split sizes, issued with `async_op=True`
and finished through `twinpipe.parallel.experts.overlap.wait`, so inside an overlapped forward-backward
region the other micro-batch computes while the bytes move. `exchange_rows` is differentiable: its
backward sends the gradients back along the swapped splits. `dispatch.py` uses it both ways (tokens
out to the experts, outputs back).

FP8 rows (docs/reference.md §2; DeepSeek-V3 report §3.3): activations are quantized per 1×128 tile
with power-of-2 scales by `twinpipe.fp8.act_quant(x, block_size, pow2=True)`, sent as uint8 bytes
(gloo has no fp8 type) packed with their fp32 scales in one buffer, and dequantized on arrival; the
gradient goes back in the gradient's own dtype (BF16/FP32), as does the combine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from twinpipe.parallel.experts import overlap


def start(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
          group: dist.ProcessGroup | None) -> tuple[torch.Tensor, object]:
    """Issue the exchange: rows of `x` split by `in_splits` go to the group's ranks; returns (the
    buffer the rows received land in, the async work to finish before reading it)."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return out, work


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rows of `x` split by `in_splits` go to the group's ranks; returns the rows received (no autograd)."""
    out, work = start(x, out_splits, in_splits, group)
    overlap.wait(work)
    return out


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None):
    """Start the count exchange: send_counts[ep * S] (rows for each slot of each rank) ->
    (recv_counts[ep * S], rows from each source rank for each of my S slots, source-major; work).
    Finish it with `overlap.wait(work, switch=False)`: the dispatch needs it at once, so it is not a
    point to hand the CPU to the other micro-batch."""
    ep = dist.get_world_size(group)
    splits = [send_counts.numel() // ep] * ep
    recv = torch.empty_like(send_counts)
    work = dist.all_to_all_single(recv, send_counts.contiguous(), splits, splits, group=group,
                                  async_op=True)
    return recv, work


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the gradient goes back along the reversed splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def exchange_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                  group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rows of `x` split by `in_splits` go to the group's ranks; returns the rows received
    (differentiable: the gradient goes back along the swapped splits)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _quantize_rows(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """x[M, H] -> packed uint8 [M, H + 4 * H/block] (e4m3 bytes, then fp32 pow-2 scales as bytes)."""
    from twinpipe.fp8 import act_quant

    hidden = x.shape[-1]
    if hidden % block_size:
        raise ValueError(f"FP8 dispatch: hidden={hidden} is not a multiple of block_size={block_size}")
    q, s = act_quant(x.contiguous(), block_size, pow2=True)   # q [M, H] e4m3, s [M, H/block] fp32
    packed = torch.cat([q.view(torch.uint8), s.float().contiguous().view(torch.uint8)], dim=1)
    return packed, hidden


def _dequantize_rows(packed: torch.Tensor, hidden: int, block_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `_quantize_rows`: packed uint8 rows -> [M, H] in `dtype`."""
    from twinpipe.fp8 import act_dequant

    q = packed[:, :hidden].contiguous().view(torch.float8_e4m3fn)             # [M, H]
    s = packed[:, hidden:].contiguous().view(torch.float32)                    # [M, H/block]
    return act_dequant(q, s, block_size, dtype)


class _FP8AllToAll(torch.autograd.Function):
    """Rows sent in FP8 (power-of-2 scales); the gradient travels back unquantized."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, block_size):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        packed, hidden = _quantize_rows(x, block_size)
        received = all_to_all(packed, out_splits, in_splits, group)
        return _dequantize_rows(received, hidden, block_size, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None, None


def exchange_rows_fp8(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                      group: dist.ProcessGroup | None, block_size: int = 128) -> torch.Tensor:
    """`exchange_rows` with the rows sent as FP8 E4M3 + power-of-2 scales per 1×`block_size` tile."""
    return _FP8AllToAll.apply(x, out_splits, in_splits, group, block_size)


def is_exchange_node(node) -> bool:
    """Whether an autograd node is the backward of a row exchange (`exchange_rows`/`_fp8`)."""
    return isinstance(node, (_AllToAll._backward_cls, _FP8AllToAll._backward_cls))


def start_backward(node, grad: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Issue what the exchange node's backward does (the gradient rows back along the swapped splits)
    without waiting: (buffer, work). The overlap drives the backward's exchanges through this."""
    return start(grad, node.in_splits, node.out_splits, node.group)
