"""The optimizer of a run: AdamW (β = 0.9, 0.95; weight decay 0.1) with ZeRO-1 over data parallelism.

Weight decay exemptions (`no_decay`): every parameter with fewer than 2 dimensions — RMSNorm weights
(decaying a norm's gain towards 0 only fights the normalisation) and biases (our projections have
none, but a converted or user layer may). Embeddings and the output head *are* decayed: DeepSeek's
report applies 0.1 to the model without naming exceptions and Megatron-Core (which trains V3) exempts
only norms and biases. The router bias `e_score_correction_bias` is a buffer, not a parameter: no
gradient, no decay, no optimizer state — `balance.py` moves it.

`optim.zero=ours` is `trainer/zero.py`; `optim.zero=deepspeed` is DeepSpeed's
`DeepSpeedZeroOptimizer` stage 1 behind the same calls (`trainer/deepspeed_zero.py`).
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


def build_optimizer(model: nn.Module, optim: DictConfig, grid: Grid, grad_clip: float = 1.0) -> Any:
    moment_dtype = torch.bfloat16 if optim.moment_dtype == "bf16" else torch.float32
    kwargs = dict(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.zero == "deepspeed":
        from twinpipe.trainer.deepspeed_zero import DeepSpeedZero1

        return DeepSpeedZero1(model, grid, no_decay=no_decay, grad_clip=grad_clip, **kwargs)
    # pp_group=None: the pipeline runner (parallel/pipeline_runner.py) leaves the *whole* model's
    # gradient on every pipeline rank (one replica per rank), so norms are not summed over pp.
    return ZeroAdamW(model.named_parameters(), no_decay=no_decay, dp_group=grid.dp_group,
                     dp_mesh=grid.dp_mesh, pp_group=None, moment_dtype=moment_dtype, **kwargs)
