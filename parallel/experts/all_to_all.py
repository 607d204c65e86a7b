"""The all-to-all exchanges of expert parallelism: row counts, and rows (BF16/FP32, or FP8 on the way out).

Every exchange is one `dist.all_to_all_single` with variable split sizes, issued with `async_op=True`
and finished through `twinpipe.parallel.experts.overlap.wait`, so inside an overlapped forward-backward
region the other micro-batch computes while the bytes move. `exchange_rows` is differentiable: its
backward sends the gradients back along the swapped splits. `dispatch.py` uses it both ways (tokens
out to the experts, outputs back). The dispatch sends each row's gate weight with it, packed into the
same rows (`pack_rows`: its bytes in trailing columns), so its gradient comes back in the same exchange.

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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """t [M, C] -> its bytes [M, C * itemsize] (uint8)."""
    return t.contiguous().view(torch.uint8)


def _quantize_rows(x: torch.Tensor, block_size: int, raw: int) -> tuple[torch.Tensor, int]:
    """x[M, H + raw] -> packed uint8 [M, H + 4 * H/block + raw * itemsize] (e4m3 bytes, fp32 pow-2
    scales as bytes, then the last `raw` columns' bytes as they are)."""
    from twinpipe.fp8 import act_quant

    hidden = x.shape[-1] - raw
    if hidden % block_size:
        raise ValueError(f"FP8 dispatch: hidden={hidden} is not a multiple of block_size={block_size}")
    q, s = act_quant(x[:, :hidden].contiguous(), block_size, pow2=True)  # q [M, H] e4m3, s [M, H/block] fp32
    packed = torch.cat([q.view(torch.uint8), _as_bytes(s.float()), _as_bytes(x[:, hidden:])], dim=1)
    return packed, hidden


def _dequantize_rows(packed: torch.Tensor, hidden: int, block_size: int, dtype: torch.dtype,
                     raw: int) -> torch.Tensor:
    """Inverse of `_quantize_rows`: packed uint8 rows -> [M, H + raw] in `dtype`."""
    from twinpipe.fp8 import act_dequant

    scales = hidden + 4 * (hidden // block_size)
    q = packed[:, :hidden].contiguous().view(torch.float8_e4m3fn)             # [M, H]
    s = packed[:, hidden:scales].contiguous().view(torch.float32)              # [M, H/block]
    rest = packed[:, scales:].contiguous().view(dtype)                         # [M, raw]
    return torch.cat([act_dequant(q, s, block_size, dtype), rest], dim=1)


class _FP8AllToAll(torch.autograd.Function):
    """Rows sent in FP8 (power-of-2 scales) but for their last `raw` columns, sent as they are; the
    gradient travels back unquantized."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, block_size, raw):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        packed, hidden = _quantize_rows(x, block_size, raw)
        received = all_to_all(packed, out_splits, in_splits, group)
        return _dequantize_rows(received, hidden, block_size, x.dtype, raw)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None, None, None


def exchange_rows_fp8(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                      group: dist.ProcessGroup | None, block_size: int = 128, raw: int = 0) -> torch.Tensor:
    """`exchange_rows` with the rows sent as FP8 E4M3 + power-of-2 scales per 1×`block_size` tile;
    the last `raw` columns (`pack_rows`' packed values) travel as they are."""
    return _FP8AllToAll.apply(x, out_splits, in_splits, group, block_size, raw)


def _values_as_columns(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [M] -> their bytes as [M, c] elements of `dtype` (zero-padded to whole elements)."""
    data = _as_bytes(values.unsqueeze(-1))                                     # [M, itemsize]
    width = torch.empty((), dtype=dtype).element_size()
    return torch.nn.functional.pad(data, (0, -data.shape[1] % width)).view(dtype)  # [M, c]


def _columns_as_values(columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `_values_as_columns`: [M, c] -> values [M] of `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _as_bytes(columns)[:, :itemsize].contiguous().view(dtype).squeeze(-1)  # [M]


class _PackRows(torch.autograd.Function):
    """rows [M, H], values [M] -> [M, H + c] in the rows' dtype, the values' bytes in the last c
    columns; the gradient unpacks the same way. Both directions only move bytes: the packed columns
    are no numbers of the rows' dtype, so nothing between `pack_rows` and `unpack_rows` may compute
    on them (an exchange only moves them)."""

    @staticmethod
    def forward(ctx, rows, values):
        ctx.hidden, ctx.values_dtype = rows.shape[1], values.dtype
        return torch.cat([rows, _values_as_columns(values, rows.dtype)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, :ctx.hidden], _columns_as_values(grad[:, ctx.hidden:], ctx.values_dtype)


class _UnpackRows(torch.autograd.Function):
    """Inverse of `_PackRows`: [M, H + c] -> (rows [M, H], values [M] of `values_dtype`)."""

    @staticmethod
    def forward(ctx, packed, hidden, values_dtype):
        ctx.rows_dtype = packed.dtype
        rows = packed[:, :hidden].contiguous()
        return rows, _columns_as_values(packed[:, hidden:], values_dtype)

    @staticmethod
    def backward(ctx, grad_rows, grad_values):
        packed = torch.cat([grad_rows, _values_as_columns(grad_values, ctx.rows_dtype)], dim=1)
        return packed, None, None


def pack_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """rows [M, H] and one value per row [M] -> (one tensor [M, H + c] in the rows' dtype, c), for one
    exchange to carry both (differentiable); `unpack_rows` undoes it on the other side."""
    packed = _PackRows.apply(rows, values)
    return packed, packed.shape[1] - rows.shape[1]


def unpack_rows(packed: torch.Tensor, hidden: int, values_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_rows`' tensor [M, H + c] -> (rows [M, H], values [M] of `values_dtype`)."""
    return _UnpackRows.apply(packed, hidden, values_dtype)


def is_exchange_node(node) -> bool:
    """Whether an autograd node is the backward of a row exchange (`exchange_rows`/`_fp8`)."""
    return isinstance(node, (_AllToAll._backward_cls, _FP8AllToAll._backward_cls))


def start_backward(node, grad: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Issue what the exchange node's backward does (the gradient rows back along the swapped splits)
    without waiting: (buffer, work). The overlap drives the backward's exchanges through this."""
    return start(grad, node.in_splits, node.out_splits, node.group)
