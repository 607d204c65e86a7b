"""Step runners: forward + backward of one global batch's micro-batches on this rank.

A runner's `run(micro_batches) -> metrics` leaves the gradients of the *mean* loss over this rank's
micro-batches in `p.grad` and returns the detached mean `loss`, `lm_loss`, `mtp_loss`. The plain runner
(pp = 1) is gradient accumulation; pipeline runners (`parallel.schedule`) plug in at `select_runner`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from twinpipe.parallel.grid import Grid
from twinpipe.parallel.pipeline_runner import autocast_context


class PlainRunner:
    """Gradient accumulation: each micro-batch's loss is scaled by 1/n and back-propagated."""

    def __init__(self, model: nn.Module, loss_fn: Callable, dtype: str, device: torch.device):
        self.model, self.loss_fn, self.dtype, self.device = model, loss_fn, dtype, device

    def run(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from twinpipe.model.moe import set_aux_loss_scale

        n = len(micro_batches)
        set_aux_loss_scale(self.model, 1.0 / n)  # the balance loss is averaged like the LM loss
        totals: dict[str, torch.Tensor] = {}
        for mb in micro_batches:
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with autocast_context(self.dtype, self.device):
                output = self.model.forward_train(mb["input_ids"], mb.get("position_ids"))
                loss, metrics = self.loss_fn(output, mb)
            (loss / n).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v.float() / n
        return totals


def select_runner(cfg: DictConfig, model: nn.Module, loss_fn: Callable, grid: Grid,
                  device: torch.device) -> Any:
    """The step runner for parallel.pp / parallel.schedule. With expert parallelism (parallel.ep > 1)
    DualPipe and DualPipeV run their paired forward/backward chunks through
    `twinpipe.parallel.experts.overlap.overlapped_forward_backward`, so one chunk's all-to-alls progress while
    the other computes (1F1B has no such pairs)."""
    if grid.pp == 1:
        return PlainRunner(model, loss_fn, cfg.train.dtype, device)
    from twinpipe.parallel.pipeline_runner import PipelineRunner

    overlapped = None
    if grid.ep > 1 and cfg.parallel.schedule in ("dualpipe", "dualpipev"):
        from twinpipe.parallel.experts.overlap import overlapped_forward_backward as overlapped
    return PipelineRunner(model, loss_fn, cfg.parallel.schedule, grid.pp, grid.pp_rank, grid.pp_group,
                          device, cfg.train.dtype, overlapped_forward_backward=overlapped,
                          mirror_group=grid.pp_mirror_group)
