"""The optimizer of a run: AdamW (β = 0.9, 0.95; weight decay 0.1) with ZeRO-1 over data parallelism.

Weight decay exemptions (`no_decay`): every parameter with fewer than 2 dimensions — RMSNorm weights
(decaying a norm's gain towards 0 only fights the normalisation) and biases (our projections have
none, but a converted or user layer may). Embeddings and the output head *are* decayed: DeepSeek's
report applies 0.1 to the model without naming exceptions and Megatron-Core (which trains V3) exempts
only norms and biases. The router bias `e_score_correction_bias` is a buffer, not a parameter: no
gradient, no decay, no optimizer state — `balance.py` moves it.

`optim.zero=ours` is `trainer/optim/zero.py`; `optim.zero=deepspeed` is DeepSpeed's
`DeepSpeedZeroOptimizer` stage 1 behind the same calls (`trainer/optim/deepspeed_zero.py`). With
parallel.ep > 1 the expert weights (already split over the ep group) get a local AdamW inside ours and
their gradients are reduced by `twinpipe.parallel.experts.grad_reduction.reduce_expert_grads`.
`optim.shard_experts=true` (with ours, parallel.dp > parallel.ep) partitions the expert slots' AdamW
state (moments; the FP32 master with bf16 parameters) over the expert-data-parallel group, ZeRO-1
style, bit for bit the unsharded update (`zero.ExpertAdamW`). `optim.param_dtype=bf16` (with ours)
stores the parameters in BF16 and keeps FP32 master weights and FP32 gradients in the optimizer
(`zero.py`).

With pipeline parallelism (parallel.pp > 1) each rank optimizes only the parameters it holds (the other
stages' modules are on meta, see `trainer/build.py`); the global gradient norm sums, over the pipeline
group, the squares of the parameters each rank *owns* (`stages.owned_module_names`), so DualPipe's two
copies of a stage and the embedding held at both ends count once. `optim.zero=deepspeed` is refused
with pp > 1: DeepSpeed's norm would count those copies twice and cannot be told otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from twinpipe.parallel.grid import Grid
from twinpipe.trainer.checkpoint.format import dense_bucket_key
from twinpipe.trainer.optim.zero import ZeroAdamW


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Parameters exempt from weight decay: norms and biases (ndim < 2)."""
    return param.ndim < 2


def owned_by_rank(model: nn.Module, grid: Grid, schedule: str | None) -> Callable[[str], bool]:
    """name -> whether this rank counts that parameter/module in the global norm (all with pp = 1)."""
    if grid.pp == 1:
        return lambda name: True
    if schedule is None:
        raise ValueError(f"parallel.pp={grid.pp}: build_optimizer needs the parallel.schedule")
    from twinpipe.parallel.pipeline.stages import owned_module_names

    owned = owned_module_names(model, schedule, grid.pp, grid.pp_rank)
    return lambda name: any(name == m or name.startswith(m + ".") for m in owned)


def _edp_mesh(grid: Grid) -> Any:
    """A 1-D DeviceMesh over this rank's expert-data-parallel group (reusing the group, creating none):
    the sharded expert state's checkpoint placement."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return DeviceMesh.from_group(grid.edp_group, device, mesh=dist.get_process_group_ranks(grid.edp_group),
                                 mesh_dim_names=("edp",))


def build_optimizer(model: nn.Module, optim: DictConfig, grid: Grid, grad_clip: float = 1.0,
                    schedule: str | None = None) -> Any:
    """The run's optimizer over the parameters this rank holds (`schedule` = parallel.schedule, used
    with pp > 1 to know which of them this rank counts in the global norm)."""
    moment_dtype = torch.bfloat16 if optim.moment_dtype == "bf16" else torch.float32
    param_dtype = torch.bfloat16 if optim.get("param_dtype", "fp32") == "bf16" else torch.float32
    kwargs = dict(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.zero == "deepspeed":
        if grid.pp > 1:
            raise ValueError(f"optim.zero=deepspeed with parallel.pp={grid.pp}: DeepSpeed's global norm "
                             "would count DualPipe's stage copies and the shared embedding twice; use "
                             "optim.zero=ours with pipeline parallelism (or parallel.pp=1)")
        if grid.ep > 1:
            raise ValueError(f"optim.zero=deepspeed with parallel.ep={grid.ep}: DeepSpeed's stage-1 "
                             "optimizer would average different ranks' expert slots over the dp group "
                             "as if they were one tensor; use optim.zero=ours with expert parallelism")
        from twinpipe.trainer.optim.deepspeed_zero import DeepSpeedZero1

        return DeepSpeedZero1(model, grid, no_decay=no_decay, grad_clip=grad_clip, **kwargs)
    counted = owned_by_rank(model, grid, schedule)
    expert_kwargs: dict[str, Any] = {}
    if grid.ep > 1:
        from twinpipe.parallel.experts.grad_reduction import expert_grad_sq, reduce_expert_grads
        from twinpipe.parallel.experts.layer import is_expert_param

        expert_kwargs = dict(
            expert_param=lambda n, p: is_expert_param(p), ep_group=grid.ep_group, ep_rank=grid.ep_rank,
            reduce_experts=lambda: reduce_expert_grads(model, grid.edp_group, grid.dp_group, grid.dp),
            expert_grad_sq=lambda: expert_grad_sq(model, counted))
        if optim.get("shard_experts", False) and grid.dp > grid.ep:
            expert_kwargs.update(expert_shard_group=grid.edp_group, expert_shard_mesh=_edp_mesh(grid))
    local = [(n, p) for n, p in model.named_parameters() if not p.is_meta]
    return ZeroAdamW(local, no_decay=no_decay, dp_group=grid.dp_group, dp_mesh=grid.dp_mesh,
                     pp_group=grid.pp_group if grid.pp > 1 else None,
                     counted=lambda n, p: counted(n),
                     dense_key=dense_bucket_key(grid.pp_rank, grid.pp),
                     moment_dtype=moment_dtype, param_dtype=param_dtype, **expert_kwargs, **kwargs)
