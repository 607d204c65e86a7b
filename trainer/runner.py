"""Step runners: forward + backward of one global batch's micro-batches on this rank.

A runner's `run(micro_batches, objective) -> metrics` back-propagates, for every micro-batch, the loss
`objective(output, micro_batch)` returns (the trainer's `step.Objective`: that micro-batch's share of
the global loss, so the gradients add up over micro-batches), and returns the objective's metrics
summed over the micro-batches. The plain runner (pp = 1) is gradient accumulation; the pipeline
runner (`parallel.schedule`, `twinpipe.parallel.pipeline.runner`) runs the same objective where the
last stage sits. `select_runner` picks one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from twinpipe.parallel.grid import Grid
from twinpipe.parallel.pipeline import in_flight
from twinpipe.parallel.pipeline.runner import autocast_context, to_device


class PlainRunner:
    """Gradient accumulation: each micro-batch's share of the loss is back-propagated in turn."""

    def __init__(self, model: nn.Module, dtype: str, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device

    def run(self, micro_batches: list[dict[str, Any]], objective: Callable) -> dict[str, torch.Tensor]:
        from twinpipe.model.moe import set_aux_loss_scale

        set_aux_loss_scale(self.model, 1.0 / len(micro_batches))  # the balance loss: a mean over them
        totals: dict[str, torch.Tensor] = {}
        try:
            for i, mb in enumerate(micro_batches):
                in_flight.mark(forward=i, backward=i)  # which micro-batch runs (routing replay reads it)
                mb = to_device(mb, self.device)
                with autocast_context(self.dtype, self.device):
                    output = self.model.forward_train(mb["input_ids"], mb.get("position_ids"))
                    loss, metrics = objective(output, mb)
                loss.backward()
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v.float()
        finally:
            in_flight.clear()
        return totals


def select_runner(cfg: DictConfig, model: nn.Module, grid: Grid, device: torch.device) -> Any:
    """The step runner for parallel.pp / parallel.schedule. With expert parallelism (parallel.ep > 1)
    DualPipe and DualPipeV run their paired forward/backward chunks through
    `twinpipe.parallel.experts.overlap.overlapped_forward_backward`, so one chunk's all-to-alls progress while
    the other computes (1F1B has no such pairs)."""
    if grid.pp == 1:
        return PlainRunner(model, cfg.train.dtype, device)
    from twinpipe.parallel.pipeline.runner import PipelineRunner

    overlapped = None
    if grid.ep > 1 and cfg.parallel.schedule in ("dualpipe", "dualpipev"):
        from twinpipe.parallel.experts.overlap import overlapped_forward_backward as overlapped
    return PipelineRunner(model, cfg.parallel.schedule, grid.pp, grid.pp_rank, grid.pp_group, device,
                          cfg.train.dtype, overlapped_forward_backward=overlapped,
                          mirror_group=grid.pp_mirror_group, p2p_groups=grid.pp_flow_groups)
