"""Dispatch and combine: the token rows of one MoE layer out to the ranks holding their slots and back.

`dispatch` sorts the N*K (token, pick) pairs by physical slot, exchanges the row counts, sends every
row with its gate weight to the EP rank holding its slot (one variable-split all-to-all, FP8 with
power-of-2 scales when asked; the weight's bytes ride in the same rows, `all_to_all.pack_rows`, and its
gradient comes back in the same exchange's backward) and reorders the rows received slot-major, so
each local slot's rows form one contiguous segment for the grouped expert GEMM, which scales its
outputs by the weights (`model.experts.weighted_swiglu`: y itself is not kept for the weights'
gradient). `combine` undoes it: the weighted outputs back to the order they arrived in, the reverse
all-to-all to the ranks owning the tokens, summed into the tokens in logical-expert order (the order of
`twinpipe.model`'s `Experts.forward`), so the result does not depend on the placement. No token is
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from twinpipe.model.experts import count_per_expert, sum_rows
from twinpipe.parallel.experts import all_to_all, overlap


@dataclass
class Dispatched:
    """What `combine` needs to send a dispatch's outputs back."""

    order: torch.Tensor        # [N*K] pair indices in the order they were sent (by slot)
    perm: torch.Tensor         # [M] received row (source-major) of each slot-major row
    in_splits: list[int]       # rows sent to each EP rank
    out_splits: list[int]      # rows received from each EP rank


def _slot_major_permutation(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """recv_counts[ep, S] (rows from source r for local slot s, received source-major; `total` rows in
    all, known on the host from the split sizes) -> index that reorders the received rows slot-major
    (slot 0 from all sources, then slot 1, ...)."""
    flat = recv_counts.flatten()                                                  # [ep * S]
    start = (torch.cumsum(flat, 0) - flat).view_as(recv_counts)                   # [ep, S]
    counts_t = recv_counts.t().flatten()                                          # [S * ep]
    start_t = start.t().flatten()                                                 # [S * ep]
    seg_start = torch.repeat_interleave(start_t, counts_t, output_size=total)     # [M]
    seg_offset = torch.repeat_interleave(torch.cumsum(counts_t, 0) - counts_t, counts_t, output_size=total)
    return seg_start + (torch.arange(total, device=recv_counts.device) - seg_offset)  # [M]


def dispatch(x: torch.Tensor, topk_weight: torch.Tensor, slot: torch.Tensor, num_slots: int,
             group: dist.ProcessGroup | None, fp8_block_size: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dispatched]:
    """x[N, H], topk_weight[N, K], slot[N*K] (physical slot of each pair, pair = token * K + pick) ->
    (x_local[M, H] the rows for this rank's slots, slot-major; weight_local[M] their gate weights;
    counts[S] rows per local slot; handle).

    fp8_block_size: send the rows as FP8 E4M3 with power-of-2 scales per 1×block tile (None: as is);
    the weights travel exactly either way."""
    ep = dist.get_world_size(group)
    k = topk_weight.shape[1]
    order = torch.argsort(slot, stable=True)                                   # [N*K]
    token_of = order // k                                                      # [N*K]
    send_counts = count_per_expert(slot, num_slots)                            # [R]
    recv_counts, counts_work = all_to_all.exchange_counts(send_counts, group)
    rows, extra = all_to_all.pack_rows(x[token_of], topk_weight.reshape(-1)[order])  # [N*K, H + extra]
    overlap.wait(counts_work, switch=False)
    recv_counts = recv_counts.view(ep, num_slots // ep)                        # [ep, S]
    # the split sizes, both directions in one read (the all-to-all takes them on the host)
    splits = torch.cat([send_counts.view(ep, num_slots // ep).sum(1), recv_counts.sum(1)]).tolist()
    in_splits, out_splits = splits[:ep], splits[ep:]
    if fp8_block_size is not None:
        rows = all_to_all.exchange_rows_fp8(rows, out_splits, in_splits, group, fp8_block_size,
                                            raw=extra)                         # [M, H + extra]
    else:
        rows = all_to_all.exchange_rows(rows, out_splits, in_splits, group)    # [M, H + extra]
    x_recv, weight_recv = all_to_all.unpack_rows(rows, x.shape[1], topk_weight.dtype)  # [M, H], [M]
    perm = _slot_major_permutation(recv_counts, sum(out_splits))               # [M]
    return x_recv[perm], weight_recv[perm], recv_counts.sum(0), Dispatched(order, perm, in_splits, out_splits)


def combine(y_local: torch.Tensor, sent: Dispatched, x: torch.Tensor, topk_idx: torch.Tensor,
            group: dist.ProcessGroup | None) -> torch.Tensor:
    """y_local[M, H] (slot-major, as `dispatch` gave the rows, already scaled by their gate weights)
    -> y[N, H] in x's shape and dtype: the sum over each token's K picks."""
    k = topk_idx.shape[1]
    y_recv = torch.empty_like(y_local).index_copy(0, sent.perm, y_local)       # [M, H] source-major
    y_send = all_to_all.exchange_rows(y_recv, sent.in_splits, sent.out_splits, group)  # [N*K, H]

    # Sum each token's K picks in logical-expert order (as `Experts.forward` does), whatever the
    # placement: outputs do not change when EPLB moves or replicates experts.
    order = sent.order
    by_expert = torch.argsort(topk_idx.reshape(-1), stable=True)               # [N*K]
    pair_index = torch.arange(order.numel(), device=order.device)
    position = torch.empty_like(order).index_copy_(0, order, pair_index)        # [N*K]
    y_pairs = y_send[position[by_expert]]                                      # [N*K, H]
    # x only gives the shape: detached, so the graph has no edge from the combine back to the MoE
    # input (it would join the two sides of the overlap's cuts, `overlap.py`)
    return sum_rows(x.detach(), by_expert // k, y_pairs)                       # [N, H]
