"""One optimizer step of any objective (pretraining, SFT, GRPO), apart from the loop that schedules it.

    global counts of the loss's normalisers (all micro-batches, all dp ranks)
    -> zero_grad -> step runner (forward + backward of this rank's micro-batches)
    -> reduce gradients over dp -> global grad norm -> one read of the step's values on the host
    (loss, norm, expert counts: the trainer's one wait for the device) -> clip -> ZeRO-1 AdamW step
    -> router-bias update from the global expert counts -> EPLB re-plan every `eplb.every` steps

`TrainStep(micro_batches, lr, gamma, stop) -> metrics` is all a loop calls; the pretraining loop
(`loop.py`) adds its cadence (data, LR and batch schedules, metrics, checkpoints, signals) and the
post-training loops add their data, loss and rollouts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from twinpipe.trainer.balance import ExpertLoadTracker, global_counts, load_max_over_mean, update_router_bias
from twinpipe.trainer.loss import GLOBAL_COUNTS


class Objective:
    """The loss as the runners call it: `(output, micro_batch) -> (loss to back-propagate, metrics)`.

    The metrics (`loss` and the loss function's own) are this micro-batch's shares of the global
    batch's values: summed over micro-batches and dp ranks they give the step's metrics. A loss with
    `normalizers()` returns shares itself (see loss.py); a plain per-micro-batch mean is divided by the
    number of micro-batches of the global batch. The loss to back-propagate is the share times dp,
    because the optimizer *averages* gradients over the dp ranks."""

    def __init__(self, loss_fn: Callable, num_micro_batches: int, dp: int) -> None:
        self.loss_fn, self.dp = loss_fn, dp
        self.scale = 1.0 if hasattr(loss_fn, "normalizers") else 1.0 / num_micro_batches

    def __call__(self, output: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.loss_fn(output, batch)
        if self.scale != 1.0:
            loss = loss * self.scale
            metrics = {k: v * self.scale for k, v in metrics.items()}
        shares = {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}
        return loss * self.dp if self.dp != 1 else loss, shares


def add_global_counts(loss_fn: Callable, micro_batches: list[dict], group: Any,
                      device: torch.device) -> list[dict]:
    """The micro-batches with `batch["global_counts"]`: each of the loss's normalisers summed over the
    global batch (this rank's micro-batches, then the dp group), as float32 on `device`."""
    if not hasattr(loss_fn, "normalizers"):
        return micro_batches
    per_batch = [loss_fn.normalizers(mb) for mb in micro_batches]
    names = sorted(per_batch[0])
    # float64: exact for token counts (< 2^53), and a weighted normaliser may be fractional
    totals = torch.stack([sum(c[k].to(torch.float64) for c in per_batch) for k in names])  # [K]
    totals = totals.to(device, non_blocking=True)  # a blocking copy to a GPU waits for all queued work
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    counts = dict(zip(names, totals.to(torch.float32)))
    return [{**mb, GLOBAL_COUNTS: counts} for mb in micro_batches]


def sum_over(group: Any, values: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The sorted names of `values` and the values [K] (float32) summed over `group` (None: as they are),
    where they are."""
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return keys, t


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` copied to the host in one transfer (one wait for the device), each with its shape and
    dtype: float32, float64 and integers below 2^53 pass float64 exactly."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, tensors)]


class TrainStep:
    """One optimizer step over one global batch; every loop calls it the same way.

    `model`, `optimizer` (trainer/optim/optimizer.py), `runner` (trainer/runner.py), `loss_fn`, `grid`,
    `grad_clip`, `on_nonfinite` ('skip' or 'stop'), `center_bias` (balance.center) and, with EPLB,
    `rebalancer` + `eplb_every`; `slot_followers`, when set, gives the tensors that move with the expert
    slots on a re-plan (the CPU EMA's average: `CPUEMA.slot_followers`)."""

    slot_followers: Callable[[], dict] | None = None

    def __init__(self, model: torch.nn.Module, optimizer: Any, runner: Any, loss_fn: Callable, grid: Any,
                 device: torch.device, grad_clip: float = 1.0, on_nonfinite: str = "skip",
                 center_bias: bool = False, rebalancer: Any = None, eplb_every: int = 0) -> None:
        self.model, self.optimizer, self.runner, self.loss_fn = model, optimizer, runner, loss_fn
        self.grid, self.device, self.grad_clip, self.on_nonfinite = grid, device, grad_clip, on_nonfinite
        self.center_bias, self.rebalancer, self.eplb_every = center_bias, rebalancer, eplb_every
        self.tracker = ExpertLoadTracker(model)
        self.steps_done = 0
        self.stop_agreed = False
        if rebalancer is not None:
            self.eplb_window = torch.zeros(len(self.tracker.layers), rebalancer.num_experts, dtype=torch.float64)
            # rows of the MoE layers this rank holds (the rebalancer's layers; all of them with pp = 1)
            self.eplb_rows = [i for i, (_, m) in enumerate(self.tracker.layers) if not m.gate.weight.is_meta]

    def __call__(self, micro_batches: list[dict], lr: float, gamma: float, stop: bool = False) -> dict[str, Any]:
        """Run the step; returns the global batch's metrics (the loss's, `grad_norm`, `balance_loss`,
        `skipped`, `expert_load` [MoE layer][expert], `expert_load_max_over_mean`, EPLB's). `stop`:
        whether this rank was asked to stop (a signal); `stop_agreed` then says, on every rank,
        whether any rank was, read with the step's other values (no wait of its own)."""
        grid, optimizer = self.grid, self.optimizer
        micro_batches = add_global_counts(self.loss_fn, micro_batches, grid.dp_group, self.device)
        objective = Objective(self.loss_fn, len(micro_batches) * grid.dp, grid.dp)

        optimizer.zero_grad()
        local = self.runner.run(micro_batches, objective)
        optimizer.reduce_gradients()
        grad_norm = optimizer.grad_norm_tensor()
        keys, summed = sum_over(grid.dp_group, local)
        counts, balance_loss = self.tracker.take()
        # [moe layers, E] of the global batch: summed over dp, and over pp where each pipeline rank
        # ran only its stages' layers (zeros elsewhere), so every rank updates the same biases; this
        # rank's stop request rides along (the sum over dp then pp is the sum over all ranks)
        flat = torch.cat([counts.reshape(-1), torch.full((1,), int(stop), dtype=torch.int64, device=counts.device)])
        flat = global_counts(global_counts(flat, grid.dp_group), grid.pp_group)
        # the step's one wait for the device: whether to step and the clip need the loss and the norm;
        # the rest comes along (the bias update and EPLB read the counts on the host, as before)
        summed, grad_norm, balance_loss, flat = to_host(summed, grad_norm, balance_loss, flat)
        metrics = dict(zip(keys, summed.tolist()))
        grad_norm, balance_loss = grad_norm.item(), balance_loss.item()
        counts, self.stop_agreed = flat[:-1].reshape(counts.shape), bool(flat[-1])

        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
            clip = min(1.0, self.grad_clip / (grad_norm + 1e-6)) if self.grad_clip > 0 else 1.0
            optimizer.step(lr, clip)
            update_router_bias(self.model, counts.to(torch.float32), gamma, self.center_bias)
        else:
            optimizer.zero_grad()  # drop the step's gradients (BF16 parameters: back from their FP32 master)
            if self.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"step {self.steps_done + 1}: loss={metrics['loss']}, grad_norm={grad_norm}; stopping with "
                    f"the weights of step {self.steps_done} untouched (train.on_nonfinite=stop; 'skip' drops "
                    "such steps)")
        eplb_metrics: dict[str, float] = {}
        if self.rebalancer is not None:
            self.eplb_window += counts
            if (self.steps_done + 1) % self.eplb_every == 0:  # re-place experts, moving weights + AdamW state
                followers = self.slot_followers() if self.slot_followers is not None else None
                eplb_metrics = self.rebalancer.replan(self.eplb_window[self.eplb_rows], optimizer.expert_opt,
                                                      followers)
                self.eplb_window.zero_()
        self.steps_done += 1
        return {**metrics, "balance_loss": balance_loss, "grad_norm": grad_norm, "skipped": not finite,
                "expert_load_max_over_mean": load_max_over_mean(counts), "expert_load": counts.tolist(),
                **eplb_metrics}

    def close(self) -> None:
        self.tracker.remove()
