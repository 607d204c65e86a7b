"""An exponential moving average of the weights, kept in CPU memory and updated after each optimizer
step without holding the step up (DeepSeek-V3 report §3.2.3: an early estimate of the model after
learning-rate decay, at no GPU memory or step time).

    after step t:  ema <- decay * ema + (1 - decay) * weights_t        (fp32, on the CPU)

`update()` copies this rank's weights into a host staging buffer (pinned, asynchronous on CUDA: the
copy is queued on the current stream, so the next optimizer step cannot overwrite the weights before
it is taken) and hands the arithmetic to one background thread; the next `update()` or a read waits
for it. The average starts at the weights it is built from (step 0 or the resumed ones, unless the
checkpoint holds it). Names are the model's state-dict names; what this rank holds (pipeline ranks:
their stages; expert-parallel ranks: their expert slots).

Expert parallelism: the average of a slot is the average of the logical expert it holds. When EPLB
re-plans, the slots' averages move with their weights and AdamW moments (`slot_followers()`, handed to
`ExpertRebalancer.replan`). The checkpoint keeps them as the weights are kept: the dense parameters
under `checkpoint_format.EMA`, each EP rank's slots under `ema_experts_key(r, ep)`; a resume under
another layout reads each parameter's average through the logical experts (as `init_from` reads
weights: one parameter, at most one layer's experts, at a time). `load_model_for_inference(...,
ema=True)` and `twinpipe-eval ema=true` merge it into the plain model.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

log = logging.getLogger(__name__)


class CPUEMA:
    """The EMA of `model`'s local floating-point parameters, by name, in fp32 on the CPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: must be in (0, 1) for an EMA")
        self.decay = decay
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if not p.is_meta and p.is_floating_point()}
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self.params.values())
        self.staging = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for n, p in self.params.items()}
        self.average = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self.params.items()}
        self.event = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self.pending: Future | None = None

    def wait(self) -> None:
        """Until the last update has been folded in."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def update(self) -> None:
        """Fold the current weights in (after an optimizer step); returns once they are copied out."""
        self.wait()
        with torch.no_grad():
            for name, p in self.params.items():
                self.staging[name].copy_(p.detach(), non_blocking=True)
        self.event = None
        if any(p.is_cuda for p in self.params.values()):
            self.event = torch.cuda.Event()
            self.event.record()
        self.pending = self.pool.submit(self._fold, self.event)

    def _fold(self, event) -> None:
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            for name, avg in self.average.items():
                avg.lerp_(self.staging[name].float(), 1.0 - self.decay)  # decay * avg + (1 - decay) * w

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return self.average

    def slot_followers(self) -> dict[nn.Parameter, list[torch.Tensor]]:
        """Each expert-slot parameter -> its average (rows move with the parameter's on an EPLB re-plan)."""
        from twinpipe.parallel.experts.layer import is_expert_param

        self.wait()
        return {p: [self.average[n]] for n, p in self.params.items() if is_expert_param(p)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        for name, avg in self.average.items():
            avg.copy_(state[name])

    def resume(self, path) -> None:
        """Take the average from checkpoint `path` (every rank calls this); a checkpoint without one (a
        run with train.ema_decay=0) leaves it at the resumed weights, with a warning."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from twinpipe.trainer.checkpoint import format as fmt
        from twinpipe.trainer.checkpoint.io import saved_tensors, single_process_quiet

        saved = saved_tensors(path)
        if not any(k.startswith(fmt.EMA + ".") for k in saved):
            log.warning("%s has no EMA of the weights (no key %s.*): the EMA starts at the resumed weights",
                        path, fmt.EMA)
            return
        self.wait()
        ep_rank, ep = _ep_position(self.model)
        state = fmt.ema_state(self.average, self.model, ep_rank, ep)
        flat = {f"{top}.{n}": t for top, part in state.items() for n, t in part.items()}
        if all(k in saved and tuple(saved[k].size) == tuple(t.shape) for k, t in flat.items()):
            with single_process_quiet():  # saved under this layout: every rank reads its own keys
                dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
            return
        self._resume_through_logical(path)

    @torch.no_grad()
    def _resume_through_logical(self, path) -> None:
        """Another layout (EP degree, slot count): each parameter's average read by ranges under the plain
        model's names, an expert slot's row from its logical expert (as `init_from` reads weights)."""
        from pathlib import Path

        from twinpipe.parallel.experts.logical_state import split_slot_name
        from twinpipe.trainer.checkpoint import format as fmt
        from twinpipe.trainer.checkpoint.ranged import ModelTensors

        modules = dict(self.model.named_modules())
        num_experts = getattr(getattr(self.model, "config", None), "n_routed_experts", 0)
        saved = ModelTensors(Path(path), num_experts, fmt.EMA, (fmt.EMA_EXPERTS, fmt.ema_experts_key))
        for name, avg in self.average.items():
            slot = split_slot_name(name)
            if slot is not None:  # this rank's slots: the rows of their logical experts
                layer_name, param = slot
                name, experts = f"{layer_name}.{param}", modules[layer_name].local_logical_ids().tolist()
            elif f"{fmt.EMA}.{name}" in saved.saved:
                avg.copy_(saved.read(name))
                continue
            else:  # a stacked expert weight of this run, saved as a run's EP slots: every expert
                experts = range(avg.shape[0])
            for row, expert in enumerate(experts):
                avg[row].copy_(saved.read(name, expert))

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


def _ep_position(model: nn.Module) -> tuple[int, int]:
    """(ep rank, ep size) of the model's expert-parallel layers; (0, 1) without expert parallelism."""
    from twinpipe.parallel.experts.layer import expert_parallel_layers

    layer = next(iter(expert_parallel_layers(model)), None)
    return (layer.ep_rank, layer.ep_size) if layer is not None else (0, 1)
