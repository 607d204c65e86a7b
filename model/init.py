"""Deterministic initialisation by parameter name: any rank of any layout builds exactly its part.

`Transformer(config)` draws its initial weights from torch's global random stream in module order, so
a rank can only reproduce them by drawing everything before its own part. `init_by_name` instead
draws each parameter from its own generator, seeded by (seed, the parameter's name in the full
model) and, for stacked expert weights [E, ...], by (seed, name, expert): a pipeline rank that holds
layers 30-31, or an expert-parallel rank that holds experts 64-127, initialises exactly what one
process would, and nothing else. The rules are the model's own (`Transformer.init_weights`):
Normal(0, std) for every matrix, ones for RMSNorm gains; the router bias is a buffer (zeros).

The values come from a CPU generator (the same numbers on every machine and for every device) and
are copied to the parameter's device.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def name_seed(seed: int, name: str, row: int | None = None) -> int:
    """A 63-bit generator seed from (seed, parameter name[, expert row]), stable across runs."""
    key = f"{seed}/{name}" if row is None else f"{seed}/{name}/{row}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def _normal(shape: Sequence[int], seed: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).mul_(std)


@torch.no_grad()
def init_by_name(param: torch.Tensor, name: str, seed: int, std: float,
                 expert_rows: Sequence[int] | None = None) -> None:
    """Fill `param` (any device, not meta) with its deterministic initial value.

    name: the parameter's name in the full model (e.g. `layers.3.mlp.experts.gate_proj`);
    expert_rows: for stacked expert weights [S, ...], the logical expert of each row (an expert-
      parallel rank's slots, replicas included); each expert is drawn from its own generator.
    """
    if param.ndim < 2:  # RMSNorm gains
        param.fill_(1.0)
        return
    if expert_rows is None:
        param.copy_(_normal(param.shape, name_seed(seed, name), std))
        return
    if len(expert_rows) != param.shape[0]:
        raise ValueError(f"{name}: {len(expert_rows)} expert rows for a tensor of {param.shape[0]}")
    for i, expert in enumerate(expert_rows):
        param[i].copy_(_normal(param.shape[1:], name_seed(seed, name, int(expert)), std))


def is_stacked_experts(module: torch.nn.Module) -> bool:
    """Whether `module` holds stacked expert weights [E, ...] (an `Experts` or a subclass)."""
    from .experts import Experts

    return isinstance(module, Experts)


def init_model_by_name(model: torch.nn.Module, seed: int, std: float) -> None:
    """`init_by_name` for every parameter of a whole (one-process) model; expert weights row by row
    (expert e of every layer from its own generator), router biases zeroed."""
    for module_name, module in model.named_modules():
        rows = range(module.gate_proj.shape[0]) if is_stacked_experts(module) else None
        for pname, param in module.named_parameters(recurse=False):
            if param.is_meta:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            init_by_name(param, full, seed, std, expert_rows=rows)
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and not bias.is_meta:
            bias.zero_()
