"""What keeps inference ranks in step: prompt shards per data-parallel replica, the agreement of an
expert-parallel group on whether to keep going, and the gather of every rank's results.

Under expert parallelism every MoE layer is an all-to-all over the EP group, so the EP ranks (which
sit in different data-parallel replicas, decoding different prompts) must run the same forwards in
the same order: the same number of micro-batches, each for the same number of steps. A replica with
fewer prompts steps filler rows; a replica whose sequences all ended keeps stepping (its rows masked)
until `any_across` says that no EP rank has one running.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def shard_rows(num: int, dp: int, dp_rank: int) -> range:
    """The contiguous share of `num` items (prompts, documents) of data-parallel replica `dp_rank`."""
    return range(num * dp_rank // dp, num * (dp_rank + 1) // dp)


def split_groups(rows: range | list[int], num_groups: int) -> list[list[int]]:
    """`rows` in `num_groups` contiguous micro-batches as even as possible (some empty when short)."""
    rows = list(rows)
    return [rows[len(rows) * g // num_groups: len(rows) * (g + 1) // num_groups] for g in range(num_groups)]


def any_across(flag: bool, group: Any, device: torch.device) -> bool:
    """True when `flag` holds on any rank of `group` (all ranks of the group call it together; one
    process or a group of one: `flag`)."""
    return bool(max_across(int(flag), group, device))


def max_across(value: int, group: Any, device: torch.device) -> int:
    """The largest `value` over the ranks of `group` (all call it together; one process: `value`)."""
    if group is None or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def gather_rows(mine: dict[int, Any]) -> dict[int, Any]:
    """{row: result} of every rank merged (every rank calls it; one process: `mine`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(mine)
    parts: list[dict[int, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {row: value for part in parts for row, value in part.items()}
