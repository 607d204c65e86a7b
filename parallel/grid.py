"""The process grid: world = pp x dp, expert parallelism (ep) inside each data-parallel group.

Rank layout (data-parallel ranks are neighbours, pipeline neighbours sit `dp` apart):

    rank = pp_rank * dp + dp_rank,   ep_rank = dp_rank % ep,   ep group = dp ranks // ep

Groups built for each rank:
- `dp_group`: the dp ranks of one pipeline stage (gradients of replicated weights are averaged here,
  ZeRO-1 partitions optimizer state here, router-bias counts are summed here).
- `pp_group`: the pp ranks holding the stages of one data-parallel replica.
- `ep_group`: `ep` consecutive dp ranks that split the experts between them.
- `edp_group`: dp ranks with the same `ep_rank` (they hold the same experts), where expert gradients
  are averaged.
- `pp_mirror_group`: this rank and its mirror in the pipeline (pp_rank r and pp - 1 - r, same dp
  rank); None on the middle rank of an odd pipeline. DualPipe's two copies of a stage live on such a
  pair, and so does the embedding shared by the first and the last stage (the pair of pp_rank 0).
- `pp_flow_groups`: two more communicators over `pp_group`'s ranks, for the pipeline's messages towards
  higher and towards lower pp ranks (`parallel/pipeline/engine.py`: with one way per communicator, a
  send may leave before the receive it matches is posted); None without a pipeline.
Without torch.distributed (one process) every group is None and all sizes are 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Grid:
    world_size: int
    rank: int
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    dp_group: Any = None
    pp_group: Any = None
    ep_group: Any = None
    edp_group: Any = None
    pp_mirror_group: Any = None
    pp_flow_groups: Any = None  # (towards higher pp ranks, towards lower), over pp_group's ranks
    dp_mesh: Any = None  # a 1-D DeviceMesh over dp_group (for sharded DTensor checkpoints)

    @classmethod
    def single(cls) -> "Grid":
        """The grid of a single process (every size 1, no groups), whatever torch.distributed is doing."""
        return cls(world_size=1, rank=0, pp=1, dp=1, ep=1, pp_rank=0, dp_rank=0, ep_rank=0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def grid_shape_error(world_size: int, pp: int, dp: int, ep: int) -> Optional[str]:
    """The message for an impossible grid, or None."""
    if pp < 1 or dp < 1 or ep < 1:
        return f"parallel.pp={pp}, parallel.dp={dp}, parallel.ep={ep}: each must be >= 1"
    if world_size != pp * dp:
        return (f"world size {world_size} != parallel.pp x parallel.dp = {pp} x {dp} = {pp * dp}: "
                f"start {pp * dp} processes (torchrun --nproc-per-node {pp * dp}) or change "
                "parallel.pp / parallel.dp")
    if dp % ep:
        return f"parallel.ep={ep}: must divide parallel.dp={dp}"
    return None


# parallel.timeout_s unset: how long a collective may wait for a peer before it fails. NCCL keeps
# torch's 10 min (the first communicators and checkpoint skew at scale need minutes); CPU/gloo runs
# are small, so 5 min instead of torch's 30. The trainer's watchdog ends a job whose rank went silent
# within this time (twinpipe.trainer.watchdog).
DEFAULT_TIMEOUT_S = {"nccl": 600.0, "gloo": 300.0}


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl when CUDA is available, else gloo; anything else as given."""
    if backend != "auto":
        return backend
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_timeout_s(backend: str, timeout_s: Optional[float] = None) -> float:
    """`parallel.timeout_s`, or the backend's default when unset."""
    return float(timeout_s) if timeout_s else DEFAULT_TIMEOUT_S.get(resolve_backend(backend), 300.0)


def init_distributed(backend: str = "auto", timeout_s: Optional[float] = None) -> None:
    """Join the process group torchrun/srun/run_local describe in the environment, if any and not
    joined yet, with collectives timing out after `timeout_s` (None: the backend's default).
    backend auto: nccl when CUDA is available, else gloo."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = resolve_backend(backend)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from datetime import timedelta

    dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout_s(backend, timeout_s)))


def build_grid(pp: int = 1, dp: int = 1, ep: int = 1) -> Grid:
    """The grid of this process; all ranks must call it together (it creates groups)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = grid_shape_error(world, pp, dp, ep)
    if error:
        raise ValueError(error)
    pp_rank, dp_rank = divmod(rank, dp)
    grid = Grid(world, rank, pp, dp, ep, pp_rank, dp_rank, dp_rank % ep)
    if world == 1:
        return grid
    # every rank creates every group, in the same order (new_group is collective)
    for s in range(pp):
        ranks = [s * dp + d for d in range(dp)]
        g = dist.new_group(ranks)
        if s == pp_rank:
            grid.dp_group = g
        for e0 in range(0, dp, ep):
            eg = dist.new_group(ranks[e0:e0 + ep])
            if s == pp_rank and e0 == dp_rank - dp_rank % ep:
                grid.ep_group = eg
        for r in range(ep):
            edg = dist.new_group(ranks[r::ep])
            if s == pp_rank and r == grid.ep_rank:
                grid.edp_group = edg
    for d in range(dp):
        ranks = [s * dp + d for s in range(pp)]
        g = dist.new_group(ranks)
        if d == dp_rank:
            grid.pp_group = g
        if pp > 1:
            flows = (dist.new_group(ranks), dist.new_group(ranks))
            if d == dp_rank:
                grid.pp_flow_groups = flows
        for r in range(pp // 2):
            mg = dist.new_group([r * dp + d, (pp - 1 - r) * dp + d])
            if d == dp_rank and pp_rank in (r, pp - 1 - r):
                grid.pp_mirror_group = mg
    grid.dp_mesh = _dp_mesh(grid)
    log.info("process grid: world %d = pp %d x dp %d (ep %d); rank %d is pp %d, dp %d, ep %d",
             world, pp, dp, ep, rank, pp_rank, dp_rank, grid.ep_rank)
    return grid


def _dp_mesh(grid: Grid) -> Any:
    """A 1-D DeviceMesh over this rank's dp group (reusing the group, creating none)."""
    from torch.distributed.device_mesh import DeviceMesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    first = grid.pp_rank * grid.dp
    return DeviceMesh.from_group(grid.dp_group, device,
                                 mesh=list(range(first, first + grid.dp)), mesh_dim_names=("dp",))
