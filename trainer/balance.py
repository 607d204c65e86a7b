"""Auxiliary-loss-free load balancing: the router-bias update (DeepSeek-V3 report §2.1.2).

After each optimizer step, from the per-expert token counts c_i of the *whole global batch* (summed
over the data-parallel ranks, which with expert parallelism also covers the ep ranks since every rank
counts the logical experts its own tokens picked):

    b_i += γ · sign(mean(c) − c_i)

so an overloaded expert becomes less likely to be selected and an idle one more likely. The bias only
changes which experts are *selected*, never the gate values. `center=True` subtracts the mean of each
update (torchtitan's variant; DeepSeek and Megatron do not). The biases are the fp32 buffers
`gate.e_score_correction_bias`, so they travel with the model's state dict into checkpoints.

`ExpertLoadTracker` sums the counts over every MoE forward of a step (micro-batches, pipeline chunks,
MTP blocks included) with forward hooks, so it works under any step runner.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.recompute import recomputing


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each MoE layer in module order: modules with a `gate` holding the bias buffer."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "gate") and hasattr(m.gate, "e_score_correction_bias")]


class ExpertLoadTracker:
    """Accumulates `last_counts` [E] and `last_balance_loss` of each MoE layer after every training-mode
    forward (`model.eval()` forwards, e.g. SFT's evaluation, are not counted), where they are: nothing
    is read back from the device during the step."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        self.counts = [None] * len(self.layers)
        self.balance = [None] * len(self.layers)  # float64: the sum Python floats gave before
        self.calls = [0] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training:  # evaluation / generation during a run moves no router bias
                return
            if recomputing():  # a block recomputed in the backward (train.recompute=full) is no new forward
                return
            c = module.last_counts.detach().to(torch.int64)
            self.counts[i] = c.clone() if self.counts[i] is None else self.counts[i] + c
            bal = getattr(module, "last_balance_loss", None)
            if bal is not None:
                bal = bal.detach().to(torch.float64)
                self.balance[i] = bal if self.balance[i] is None else self.balance[i] + bal
            self.calls[i] += 1
        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts [num_moe_layers, E] int64 since the last take (zeros for layers that did not run on
        this rank) and the mean balance loss per forward, summed over layers (0-d float64), both on the
        model's device; then reset."""
        device = next((c.device for c in self.counts if c is not None), self.device)
        num_experts = [m.gate.e_score_correction_bias.numel() for _, m in self.layers]
        rows = [c if c is not None else torch.zeros(e, dtype=torch.int64, device=device)
                for c, e in zip(self.counts, num_experts)]
        counts = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64, device=device)
        # divided by a tensor: a CUDA division by a Python number multiplies by its reciprocal
        means = [b / torch.full((), n, dtype=torch.float64, device=b.device)
                 for b, n in zip(self.balance, self.calls) if n and b is not None]
        balance = sum(means, torch.zeros((), dtype=torch.float64, device=device))
        self.counts = [None] * len(self.layers)
        self.balance = [None] * len(self.layers)
        self.calls = [0] * len(self.layers)
        return counts, balance

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def global_counts(counts: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum the per-rank counts [L, E] over `group` (the data-parallel group)."""
    if group is not None and dist.get_world_size(group) > 1:
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
    return counts


@torch.no_grad()
def update_router_bias(model: nn.Module, counts: torch.Tensor, gamma: float, center: bool = False) -> None:
    """b_i += γ·sign(mean(c) − c_i) for every MoE layer; counts [num_moe_layers, E] are global counts."""
    layers = moe_layers(model)
    if counts.shape[0] != len(layers):
        raise ValueError(f"expert counts have {counts.shape[0]} layers, the model has {len(layers)} MoE layers")
    if gamma == 0.0:
        return
    for (_, moe), c in zip(layers, counts):
        bias = moe.gate.e_score_correction_bias  # [E] fp32
        c = c.to(torch.float32)
        update = gamma * torch.sign(c.mean() - c)  # [E]
        if center:
            update -= update.mean()
        # from host counts: a blocking copy to a GPU would wait for all the step's queued work
        bias.add_(update.to(bias.device, bias.dtype, non_blocking=True))


def load_max_over_mean(counts: torch.Tensor) -> float:
    """max_i c_i / mean(c) per layer, averaged over layers (1.0 = perfectly balanced)."""
    if counts.numel() == 0:
        return 1.0
    c = counts.to(torch.float64)
    mean = c.mean(dim=1).clamp_min(1e-12)
    return float((c.max(dim=1).values / mean).mean())
