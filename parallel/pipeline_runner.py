"""The trainer's step runner for pipeline parallelism (`parallel.pp > 1`, `parallel.schedule`).

Same interface as the trainer's plain runner: `run(micro_batches) -> {"loss", "lm_loss", "mtp_loss"}`
(detached means over the micro-batches) and, in every parameter's `.grad`, the gradient of the mean
loss over the micro-batches -- the same numbers a single process would compute.

How: each pipeline rank holds only the modules of its stages (the trainer drops the rest with
`stages.keep_local_stages`; the runner also works on a full model) and runs them under DualPipe,
DualPipeV or 1F1B. Gradients are then summed over the pipeline only where a parameter has copies:
DualPipe holds every stage twice (stage s on ranks s and N-1-s, which also covers the embedding used
by the first stage and by MTP on the last), so all local gradients are summed over the mirror pair
(`Grid.pp_mirror_group`); 1F1B with MTP holds the embedding on the first and the last rank, summed
over that pair; DualPipeV holds every stage and the embedding once (rank 0 holds both ends): nothing
to sum. Losses are computed where the last stage runs and summed over the pipeline group. The loss
function is the trainer's (`loss_fn(output, batch) -> (loss, metrics)`), passed in: `parallel`
never imports `trainer`.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from twinpipe.parallel.dualpipe import DualPipe, DualPipeV
from twinpipe.parallel.schedule_1f1b import OneFOneB
from twinpipe.parallel.stages import build_stages, is_local, set_stage_p2p_shapes


def autocast_context(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`train.dtype`'s compute precision: bf16 autocast (CUDA or CPU; master weights stay fp32) or
    nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StageCriterion:
    """criterion(logits, *mtp_logits, labels) for the last stage: loss_fn's loss / num_micro_batches.

    Keeps each micro-batch's (loss, lm_loss, mtp_loss) for the runner's metrics.
    """

    def __init__(self, loss_fn: Callable, num_micro_batches: int) -> None:
        self.loss_fn, self.n = loss_fn, num_micro_batches
        self.records: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *mtp_logits, labels = rest
        output = SimpleNamespace(logits=logits, mtp_logits=list(mtp_logits))
        loss, metrics = self.loss_fn(output, {"labels": labels})
        self.records.append(torch.stack([loss.detach().float(), metrics["lm_loss"].float(),
                                         metrics["mtp_loss"].float()]))
        return loss / self.n


def sum_gradients(params: list[nn.Parameter], group) -> None:
    """p.grad <- sum over `group` of p.grad (None counts as zeros), in one flat all-reduce."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


class PipelineRunner:
    """Forward + backward of one global batch's micro-batches through this rank's pipeline stages."""

    SCHEDULES = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": OneFOneB}

    def __init__(self, model: nn.Module, loss_fn: Callable, schedule: str, pp: int, pp_rank: int,
                 pp_group, device: torch.device, dtype: str = "fp32", layer_split=None,
                 overlapped_forward_backward: Callable | None = None, mirror_group=None) -> None:
        if schedule not in self.SCHEDULES:
            raise ValueError(f"parallel.schedule={schedule!r}: allowed {', '.join(self.SCHEDULES)}")
        self.model, self.loss_fn, self.schedule = model, loss_fn, schedule
        self.pp, self.pp_rank, self.group, self.device, self.dtype = pp, pp_rank, pp_group, device, dtype
        self.mirror_group = mirror_group  # Grid.pp_mirror_group: this rank and pp_rank pp-1-r
        self.stages = build_stages(model, schedule, pp, pp_rank, layer_split)
        if schedule == "1f1b":
            self.pipe = OneFOneB(self.stages[0], process_group=pp_group)
        else:
            # overlapped_forward_backward: e.g. twinpipe.parallel.overlap's, with expert parallelism
            self.pipe = self.SCHEDULES[schedule](
                self.stages, process_group=pp_group,
                overlapped_forward_backward=overlapped_forward_backward)

    def feeds(self, batch: dict[str, torch.Tensor]) -> tuple[list, list]:
        """(inputs, labels) this rank passes to step(): only the ranks at the pipeline's ends feed."""
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        last = self.pp - 1
        if self.schedule == "dualpipe":
            # rank 0 feeds the first half (its losses are computed on rank N-1) and vice versa
            halves = [t.chunk(2) for t in (ids, pos, labels)]
            if self.pp_rank == 0:
                return [halves[0][0], halves[1][0]], [halves[2][1]]
            if self.pp_rank == last:
                return [halves[0][1], halves[1][1]], [halves[2][0]]
            return [], []
        if self.schedule == "dualpipev":
            return ([ids, pos], [labels]) if self.pp_rank == 0 else ([], [])
        return ([ids, pos] if self.pp_rank == 0 else [],
                [labels] if self.pp_rank == last else [])

    def copied_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters that have a copy on its mirror rank (same list, same order there)."""
        if self.pp == 1:
            return []
        if self.schedule == "dualpipe":
            return [p for p in self.model.parameters() if is_local(p)]
        ends = (0, self.pp - 1)
        if self.schedule == "1f1b" and self.pp_rank in ends and len(self.model.mtp) > 0:
            return list(self.model.embed_tokens.parameters())
        return []

    def sum_copies(self) -> None:
        """Sum the gradients of copied parameters over the mirror pair (see the module docstring)."""
        params = self.copied_parameters()
        if not params:
            return
        if self.mirror_group is None:
            raise ValueError(f"parallel.schedule={self.schedule}, pp_rank {self.pp_rank} of {self.pp}: "
                             "copied parameters need mirror_group (Grid.pp_mirror_group)")
        sum_gradients(params, self.mirror_group)

    def run(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from twinpipe.model.moe import set_aux_loss_scale

        n = len(micro_batches)
        set_aux_loss_scale(self.stages, 1.0 / n)  # the balance loss is averaged like the LM loss
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(self.device)
                 for k in ("input_ids", "labels", "position_ids")}
        micro, seq = micro_batches[0]["input_ids"].shape
        set_stage_p2p_shapes(micro, seq, self.model.config.hidden_size)
        criterion = StageCriterion(self.loss_fn, n)
        inputs, labels = self.feeds(batch)
        with autocast_context(self.dtype, self.device):
            self.pipe.step(*inputs, num_chunks=n, criterion=criterion, labels=labels)
        self.sum_copies()
        totals = (torch.stack(criterion.records).sum(0) if criterion.records
                  else torch.zeros(3)).to(self.device) / n  # [loss, lm_loss, mtp_loss]
        dist.all_reduce(totals, group=self.group)
        return {"loss": totals[0], "lm_loss": totals[1], "mtp_loss": totals[2]}
