"""The trainer's step runner for pipeline parallelism (`parallel.pp > 1`, `parallel.schedule`).

Same interface as the trainer's plain runner: `run(micro_batches, objective) -> metrics` leaves in
every parameter's `.grad` the sum over the micro-batches of the gradients of the losses `objective`
returns, and returns the objective's metrics summed over the micro-batches -- the same numbers a
single process would compute.

How: each pipeline rank holds only the modules of its stages (the trainer drops the rest with
`stages.keep_local_stages`; the runner also works on a full model) and runs them under DualPipe,
DualPipeV or 1F1B, as `StagePlacement` (placement.py) declares: inputs enter where stage 0 sits, the
objective runs where the last stage sits, on the whole micro-batch (any keys). Gradients are then
summed over the mirror pair (`Grid.pp_mirror_group`) for the modules both ranks hold
(`stages.copied_module_names`: DualPipe's stages, 1F1B's embedding with MTP, nothing for DualPipeV).
Metrics are summed over the pipeline group (their names gathered at the first step only). The
objective is the trainer's, passed in: `parallel` never imports `trainer`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from twinpipe.model.transformer import TransformerOutput
from twinpipe.parallel.pipeline import in_flight
from twinpipe.parallel.pipeline.dualpipe import DualPipe, DualPipeV
from twinpipe.parallel.pipeline.one_f_one_b import OneFOneB
from twinpipe.parallel.pipeline.placement import StagePlacement
from twinpipe.parallel.pipeline.stages import build_stages, copied_module_names, set_stage_p2p_shapes
from twinpipe.parallel.pipeline.weight_grad_store import fold_into_main_grads


def autocast_context(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`train.dtype`'s compute precision: bf16 autocast (CUDA or CPU; master weights stay fp32) or
    nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StageCriterion:
    """criterion(hidden, *mtp_hidden, index) for the last stage: the objective on micro-batch `index`,
    given a `TransformerOutput` of the stage's head inputs and `head_weight` (lm_head.weight), as
    `Transformer.forward_train` gives one process (its `logits` computed on demand).

    The engine hands the last stage the "labels" its rank was fed, which here are the indices of the
    micro-batches whose loss this rank computes: the criterion reads the whole micro-batch (every key
    the batch source gave it: labels, masks, advantages, global counts) from the runner's list, so no
    batch key is fixed by the pipeline. Keeps each micro-batch's metrics for the runner.
    """

    def __init__(self, objective: Callable, micro_batches: list[dict], head_weight: torch.Tensor) -> None:
        self.objective, self.micro_batches, self.head_weight = objective, micro_batches, head_weight
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, hidden: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *mtp_hidden, index = rest
        output = TransformerOutput(hidden, self.head_weight, list(mtp_hidden))
        loss, metrics = self.objective(output, self.micro_batches[int(index)])
        self.records.append(metrics)
        return loss


def sum_gradients(params: list[nn.Parameter], group) -> None:
    """p.grad <- sum over `group` of p.grad (None counts as zeros), in one flat all-reduce. A parameter
    with an FP32 `main_grad` (a BF16 parameter, trainer/optim/zero.py) sums that instead, in place."""
    params = [p for p in params if p.requires_grad]
    fold_into_main_grads(params)
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad if p.grad is not None else torch.zeros_like(p)
             for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        if hasattr(p, "main_grad"):
            p.main_grad.copy_(g)
        else:
            p.grad = g


def _folding_main_grads(overlapped: Callable, params: list[nn.Parameter]) -> Callable:
    """`overlapped` (an overlapped_forward_backward) followed by `fold_into_main_grads`: its backward of
    one micro-batch's chunk writes the leaves' `.grad` (twinpipe.parallel.experts.overlap), so a BF16
    parameter's gradient is rounded once per micro-batch and summed over them in FP32, as with the hook."""
    def run(*args, **kwargs):
        out = overlapped(*args, **kwargs)
        fold_into_main_grads(params)
        return out
    return run


def metric_names(records: list[dict[str, torch.Tensor]], group) -> list[str]:
    """The sorted names of the metrics in `records` on any rank of `group` (ranks without the last
    stage have none), gathered as Python objects: pickling and two collectives, so once per runner."""
    local = sorted({k for r in records for k in r})
    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, local, group=group)
    return sorted(set().union(*map(set, names)))


def sum_metrics(records: list[dict[str, torch.Tensor]], keys: list[str], group,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Each metric of `keys` summed over `records` (0 where none has it) and over the ranks of `group`,
    in one all-reduce."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    totals = torch.stack([sum((r[k].float().to(device) for r in records if k in r), zero) for k in keys])
    dist.all_reduce(totals, group=group)
    return dict(zip(keys, totals))


def to_device(batch: dict, device: torch.device) -> dict:
    """The micro-batch with its tensors on `device` (other values, e.g. the global counts, as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class PipelineRunner:
    """Forward + backward of one global batch's micro-batches through this rank's pipeline stages."""

    SCHEDULES = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": OneFOneB}

    def __init__(self, model: nn.Module, schedule: str, pp: int, pp_rank: int, pp_group,
                 device: torch.device, dtype: str = "fp32", layer_split=None,
                 overlapped_forward_backward: Callable | None = None, mirror_group=None,
                 p2p_groups=None) -> None:
        self.placement = StagePlacement(schedule, pp)
        self.model, self.schedule = model, schedule
        self.pp, self.pp_rank, self.group, self.device, self.dtype = pp, pp_rank, pp_group, device, dtype
        self.mirror_group = mirror_group  # Grid.pp_mirror_group: this rank and pp_rank pp-1-r
        self.stages = build_stages(model, schedule, pp, pp_rank, layer_split)
        self.copied = sorted(copied_module_names(model, schedule, pp, pp_rank, layer_split))
        # p2p_groups: Grid.pp_flow_groups, a communicator per direction (engine.py)
        if schedule == "1f1b":
            self.pipe = OneFOneB(self.stages[0], process_group=pp_group, p2p_groups=p2p_groups)
        else:
            # overlapped_forward_backward: e.g. twinpipe.parallel.experts.overlap's, with expert parallelism
            if overlapped_forward_backward is not None:
                overlapped_forward_backward = _folding_main_grads(
                    overlapped_forward_backward, [q for q in model.parameters() if not q.is_meta])
            self.pipe = self.SCHEDULES[schedule](
                self.stages, process_group=pp_group,
                overlapped_forward_backward=overlapped_forward_backward, p2p_groups=p2p_groups)
        self.pipe.on_chunk = self._mark
        self.num_chunks = 0
        self.metric_keys: list[str] | None = None  # the objective's metric names, gathered at the first step

    def _mark(self, phase: int, chunk: int, forward: bool) -> None:
        """The engine's chunk -> the micro-batch in flight (`in_flight`)."""
        index = self.placement.micro_batch(self.pipe.placement.module_index[phase], chunk, self.num_chunks)
        in_flight.mark(**{"forward" if forward else "backward": index})

    def feeds(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[list, list]:
        """(inputs, labels) this rank passes to step(): the input ids and positions of the micro-batches
        entering the pipeline here, and the indices of those whose loss is computed here
        (`StagePlacement.entries`, `exits`)."""
        n = len(micro_batches)
        entering = self.placement.entries(self.pp_rank, n)
        leaving = self.placement.exits(self.pp_rank, n)
        inputs = []
        if len(entering):
            ids = torch.cat([micro_batches[i]["input_ids"] for i in entering])  # [B * chunks, T]
            inputs = [ids, torch.cat([positions(micro_batches[i]) for i in entering])]
        labels = [torch.tensor(list(leaving), dtype=torch.int64)] if len(leaving) else []
        return inputs, labels

    def copied_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters that have a copy on its mirror rank (same list, same order there)."""
        params = {id(p): p for name in self.copied for p in self.model.get_submodule(name).parameters()}
        return list(params.values())

    def sum_copies(self) -> None:
        """Sum the gradients of copied parameters over the mirror pair (see the module docstring)."""
        params = self.copied_parameters()
        if not params:
            return
        if self.mirror_group is None:
            raise ValueError(f"parallel.schedule={self.schedule}, pp_rank {self.pp_rank} of {self.pp}: "
                             "copied parameters need mirror_group (Grid.pp_mirror_group)")
        sum_gradients(params, self.mirror_group)

    def run(self, micro_batches: list[dict[str, torch.Tensor]], objective: Callable) -> dict[str, torch.Tensor]:
        """`objective(output, micro_batch) -> (loss to back-propagate, metrics)` runs where the last stage
        does; returns the metrics summed over the micro-batches and the pipeline group."""
        from twinpipe.model.moe import set_aux_loss_scale

        n = len(micro_batches)
        set_aux_loss_scale(self.stages, 1.0 / n)  # the balance loss is averaged over micro-batches
        # positions filled in below (0..T-1) need no document mask: say so, rather than have every
        # stage read them back from the device for each micro-batch
        causal_only = not any("position_ids" in mb for mb in micro_batches)
        for stage in self.stages:
            stage.causal_only = causal_only
        micro_batches = [to_device(mb, self.device) for mb in micro_batches]
        micro, seq = micro_batches[0]["input_ids"].shape
        # the hidden states travel in the parameters' dtype: an embedding stored in BF16 (optim.param_dtype)
        # starts a BF16 residual stream
        hidden_dtype = next((p.dtype for p in self.model.parameters() if p.requires_grad and not p.is_meta),
                            torch.float32)
        set_stage_p2p_shapes(micro, seq, self.model.config.hidden_size, hidden_dtype)
        criterion = StageCriterion(objective, micro_batches, self.model.lm_head.weight)
        inputs, labels = self.feeds(micro_batches)
        self.num_chunks = n
        try:
            with autocast_context(self.dtype, self.device):
                self.pipe.step(*inputs, num_chunks=n, criterion=criterion, labels=labels)
        finally:
            in_flight.clear()
        self.sum_copies()
        return sum_metrics(criterion.records, self.known_metric_keys(criterion.records), self.group, self.device)

    def known_metric_keys(self, records: list[dict[str, torch.Tensor]]) -> list[str]:
        """The metric names of every step (`metric_names`, gathered once): an objective's metrics are
        the same names at every step, which a rank holding records checks on the host."""
        if self.metric_keys is None:
            self.metric_keys = metric_names(records, self.group)
        new = {k for r in records for k in r} - set(self.metric_keys)
        if new:
            raise ValueError(f"the objective returned metrics {sorted(new)} absent at the first step "
                             f"({self.metric_keys}): a step runner sums the same metrics at every step")
        return self.metric_keys


def positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's position ids [B, T] (0..T-1 per row when the batch source gives none)."""
    if "position_ids" in batch:
        return batch["position_ids"]
    ids = batch["input_ids"]
    return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
