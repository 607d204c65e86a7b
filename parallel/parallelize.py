"""`parallelize(model, grid, ...)`: every parallelism and precision transform of a run, in one place
and one order, applied from outside the model (the model holds no process-group code):

1. pipeline placement: with pp > 1 every module this rank's stages do not run goes to meta
   (`pipeline.stages.keep_local_stages`, as `pipeline.placement.StagePlacement` declares), before
   anything moves to `device`, so the device only ever holds the local part;
2. the FP8 swap (`twinpipe.fp8.convert_model`): Linear layers and experts become FP8 subclasses with
   the same parameters;
3. expert parallelism: each MoE layer's experts become this ep rank's slots (`experts.layer.
   apply_expert_parallel`, EPLB replicas when `num_replicas` > experts), dispatching with
   all-to-all over the ep group. It comes after the FP8 swap so the local experts it selects keep
   the FP8 class. MoE layers of other pipeline ranks' stages are on meta and stay as they are;
4. selective recomputation (`recompute.apply_recompute`, `train.recompute`): the chosen modules'
   classes become subclasses that recompute them in the backward; last, so it wraps the classes the
   steps above chose.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from twinpipe.parallel.grid import Grid

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, grid: Grid, device: torch.device, schedule: str = "1f1b",
                fp8_backend: str = "off", num_replicas: int | None = None,
                recompute: Any = "none") -> nn.Module:
    """Apply placement, FP8 and expert parallelism to a model built on the host; returns the model
    (the same object, changed in place, unless the FP8 swap had to replace it)."""
    if grid.pp > 1:
        from twinpipe.parallel.pipeline.stages import keep_local_stages

        dropped = keep_local_stages(model, schedule, grid.pp, grid.pp_rank)
        log.info("pipeline rank %d: %d modules of other stages left on meta", grid.pp_rank, len(dropped))
        model._apply(lambda t: t if t.is_meta else t.to(device))  # Module.to refuses meta tensors
    else:
        model.to(device)
    if fp8_backend != "off":
        from twinpipe.fp8 import convert_model

        model = convert_model(model, fp8_backend)
        log.info("fp8: linear layers and experts converted (backend %s)", fp8_backend)
    if grid.ep > 1:
        from twinpipe.parallel.experts.layer import apply_expert_parallel

        apply_expert_parallel(model, grid.ep_group, num_replicas=num_replicas)
    if recompute != "none":
        from twinpipe.parallel.recompute import apply_recompute

        apply_recompute(model, recompute)
    return model
