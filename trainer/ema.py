"""An exponential moving average of the weights, kept in CPU memory and updated after each optimizer
step without holding the step up (DeepSeek-V3 report §3.2.3: an early estimate of the model after
learning-rate decay, at no GPU memory or step time).

    after step t:  ema <- decay * ema + (1 - decay) * weights_t        (fp32, on the CPU)

`update()` copies this rank's weights into a host staging buffer (pinned, asynchronous on CUDA: the
copy is queued on the current stream, so the next optimizer step cannot overwrite the weights before
it is taken) and hands the arithmetic to one background thread; the next `update()` or a read waits
for it. The average starts at the weights it is built from (step 0 or the resumed ones, unless the
checkpoint holds it). Names are the model's state-dict names; what this rank holds (pipeline ranks:
their stages). The checkpoint key is `checkpoint_format.EMA`; `load_model_for_inference(..., ema=True)`
and `twinpipe-eval ema=true` read it.
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
        absent = [n for n in self.average if f"{fmt.EMA}.{n}" not in saved]
        if absent:
            log.warning("%s has no EMA of the weights (no key %s.%s): the EMA starts at the resumed weights",
                        path, fmt.EMA, absent[0])
            return
        self.wait()
        with single_process_quiet():
            dcp.load({fmt.EMA: self.average}, checkpoint_id=path, no_dist=not dist.is_initialized())

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()
