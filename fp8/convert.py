"""Swap a model's Linear layers and routed experts for their FP8 versions, in place.

Converted: every `nn.Linear` of attention and MLPs (dense MLP, shared experts, MTP block) and every
`Experts` module. Kept in BF16/FP32 (DeepSeek-V3 §3.3): the embedding, `lm_head`, the MoE `gate`,
norms, the MTP `eh_proj` and the attention core. Parameters are the same objects, so optimizer state,
checkpoints and the HF mapping are unchanged.
"""

from __future__ import annotations

import logging

from torch import nn

from twinpipe.fp8.backend import BACKENDS
from twinpipe.fp8.experts import FP8Experts
from twinpipe.fp8.linear import FP8Linear
from twinpipe.model.experts import Experts

log = logging.getLogger(__name__)

SKIPPED_NAMES = ("embed_tokens", "lm_head", "gate", "eh_proj")


def _skipped(qualified_name: str) -> bool:
    return any(part in SKIPPED_NAMES for part in qualified_name.split("."))


def convert_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, nn.Linear (outside the skipped names) and Experts with FP8 subclasses."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend {backend!r}: allowed values are {', '.join(BACKENDS)}")
    num_linear = num_experts = 0
    for name, module in model.named_modules():
        if _skipped(name):
            continue
        if isinstance(module, (FP8Linear, FP8Experts)):
            module.fp8_backend = backend
        elif type(module) is nn.Linear:
            FP8Linear.from_linear(module, backend)
            num_linear += 1
        elif isinstance(module, Experts):
            FP8Experts.from_experts(module, backend)
            num_experts += 1
    log.info("fp8 (%s): converted %d Linear layers and %d expert groups", backend, num_linear, num_experts)
    return model
