"""The optimizer of a run: AdamW (β = 0.9, 0.95; weight decay 0.1) with ZeRO-1 over data parallelism.

Weight decay exemptions (`no_decay`): every parameter with fewer than 2 dimensions — RMSNorm weights
(decaying a norm's gain towards 0 only fights the normalisation) and biases (our projections have
none, but a converted or user layer may). Embeddings and the output head *are* decayed: DeepSeek's
report applies 0.1 to the model without naming exceptions and Megatron-Core (which trains V3) exempts
only norms and biases. The router bias `e_score_correction_bias` is a buffer, not a parameter: no
gradient, no decay, no optimizer state — `balance.py` moves it.

`optim.zero=ours` is `trainer/zero.py`; `optim.zero=deepspeed` is DeepSpeed's
`DeepSpeedZeroOptimizer` stage 1 behind the same calls (`trainer/deepspeed_zero.py`). With
parallel.ep > 1 the expert weights (already split over the ep group) get a local AdamW inside ours and
their gradients are reduced by `twinpipe.parallel.ep_groups.reduce_expert_grads`.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from twinpipe.parallel.grid import Grid
from twinpipe.trainer.zero import ZeroAdamW


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Parameters exempt from weight decay: norms and biases (ndim < 2)."""
    return param.ndim < 2


def expert_grad_sq(model: nn.Module) -> torch.Tensor:
    """Squared gradient norm of this rank's expert slots, each *logical* expert counted once: a slot
    whose expert has c replicas (EPLB) weighs 1/c, so the global norm (summed over the ep group)
    equals the one of the same model without expert parallelism."""
    from twinpipe.parallel.expert_parallel import expert_parallel_layers

    total = torch.zeros((), dtype=torch.float64)
    for layer in expert_parallel_layers(model):
        weight = 1.0 / layer.logcnt[layer.local_logical_ids()].double()  # [S]
        for p in layer.local.parameters():
            if p.grad is not None:
                total += (p.grad.double().pow(2).flatten(1).sum(1).cpu() * weight.cpu()).sum()
    return total


def build_optimizer(model: nn.Module, optim: DictConfig, grid: Grid, grad_clip: float = 1.0) -> Any:
    moment_dtype = torch.bfloat16 if optim.moment_dtype == "bf16" else torch.float32
    kwargs = dict(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.zero == "deepspeed":
        from twinpipe.trainer.deepspeed_zero import DeepSpeedZero1

        return DeepSpeedZero1(model, grid, no_decay=no_decay, grad_clip=grad_clip, **kwargs)
    # pp_group=None: the pipeline runner (parallel/pipeline_runner.py) leaves the *whole* model's
    # gradient on every pipeline rank (one replica per rank), so norms are not summed over pp.
    expert_kwargs: dict[str, Any] = {}
    if grid.ep > 1:
        from twinpipe.parallel.ep_groups import reduce_expert_grads
        from twinpipe.parallel.expert_parallel import is_expert_param

        expert_kwargs = dict(
            expert_param=lambda n, p: is_expert_param(p), ep_group=grid.ep_group, ep_rank=grid.ep_rank,
            reduce_experts=lambda: reduce_expert_grads(model, grid.edp_group, grid.dp_group, grid.dp),
            expert_grad_sq=lambda: expert_grad_sq(model))
    return ZeroAdamW(model.named_parameters(), no_decay=no_decay, dp_group=grid.dp_group,
                     dp_mesh=grid.dp_mesh, pp_group=None, moment_dtype=moment_dtype,
                     **expert_kwargs, **kwargs)
