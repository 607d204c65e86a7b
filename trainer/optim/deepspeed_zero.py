"""DeepSpeed's ZeRO stage 1 (`DeepSpeedZeroOptimizer`) behind the same calls as `trainer/optim/zero.py`.

Driven the way DeepSpeed's pipeline engine drives it, so any step runner (gradient accumulation,
DualPipe, 1F1B) composes with it: gradients accumulate in `p.grad` during the runner's backward passes
(no gradient hooks: stage 1 without contiguous gradients, overlap or reduce-scatter registers none);
then `reduce_gradients(pipeline_parallel=True)` all-reduces them over the dp group and keeps this
rank's partition, and `step()` clips by the global norm, runs torch AdamW on the FP32 partition and
all-gathers the parameters. Works on CPU with gloo (`DS_ACCELERATOR=cpu`) and on GPU with NCCL.

Checkpoints hold each rank's FP32 partition and AdamW moments under a key naming the dp size, so a run
saved with `optim.zero=deepspeed` resumes with the same parallel.dp (our ZeRO, `optim.zero=ours`,
re-splits to any dp size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.fp8.weight_cache import invalidate_weight_caches
from twinpipe.parallel.grid import Grid
from twinpipe.trainer.checkpoint import format as fmt


class DeepSpeedZero1:
    def __init__(self, model: nn.Module, grid: Grid, *, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, no_decay: Callable[[str, nn.Parameter], bool],
                 grad_clip: float = 1.0):
        import deepspeed.comm as ds_comm
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
        from deepspeed.utils.timer import NoopTimer

        if not dist.is_initialized():
            raise ValueError("optim.zero=deepspeed needs torch.distributed (launch with torchrun, even "
                             "for one rank) ; optim.zero=ours works in a single process")
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        base = torch.optim.AdamW(groups, lr=0.0, betas=tuple(betas), eps=eps, foreach=False)
        self.grid = grid
        self.model = model
        self.ds = DeepSpeedZeroOptimizer(
            base, {p: n for n, p in named}, NoopTimer(), optimizer_params={},
            dp_process_group=grid.dp_group, partition_grads=False, contiguous_gradients=False,
            reduce_scatter=False, overlap_comm=False, clip_grad=grad_clip,
            communication_data_type=torch.float32, verbose=False)
        for fp32 in self.ds.single_partition_of_fp32_groups:  # state exists before the first step,
            self.ds.optimizer.state[fp32] = {  # so a resume can load into it
                "step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(fp32),
                "exp_avg_sq": torch.zeros_like(fp32)}
        self.key = fmt.deepspeed_key(grid.pp_rank, grid.dp_rank, grid.dp)

    def zero_grad(self) -> None:
        self.ds.zero_grad(set_to_none=True)

    def reduce_gradients(self) -> None:
        self.ds.reduce_gradients(pipeline_parallel=True)

    def grad_norm(self) -> float:
        return self.grad_norm_tensor().item()

    def grad_norm_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.ds.scaled_global_norm(), dtype=torch.float64)

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        """DeepSpeed clips by its own global norm with the same rule (clip_coef is ours, unused)."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        # DeepSpeed writes the all-gathered weights through `.data`, which FP8 layers' cached
        # quantized copies cannot see: drop them so the next micro-batch requantizes.
        invalidate_weight_caches(self.model)

    def _partition_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, fp32 in enumerate(self.ds.single_partition_of_fp32_groups):
            out[f"g{i}_master"] = fp32.data
            state = self.ds.optimizer.state.get(fp32, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in state:
                    out[f"g{i}_{name}"] = state[name]
        return out

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._partition_state().values() if t.dim())

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self._partition_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The tensors were filled in place by torch.distributed.checkpoint; check the layout."""
        if self.key not in state:
            raise ValueError(f"optim.zero=deepspeed: the checkpoint has no {self.key}; it was saved with "
                             "another parallel.dp (resume it with that dp, or train with optim.zero=ours)")
