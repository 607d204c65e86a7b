"""The MoE feed-forward: router, routed experts, shared experts, and the sequence-wise balance loss.

The balance loss reaches the gradient inside the graph: it is attached to the MoE output by
`AttachAuxLoss`, whose backward gives the loss a gradient of its layer's `aux_loss_scale` and passes the
output gradient through unchanged, so pipeline stages and gradient accumulation need nothing extra
beyond `set_aux_loss_scale(modules, 1 / num_micro_batches)`, which the step runners call.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import ModelConfig
from .experts import Experts, count_per_expert
from .gate import Gate
from .mlp import MLP


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """L_bal = sum_i f_i P_i per sequence, averaged over sequences (docs/reference.md §1).

    scores [B, T, E] (unbiased sigmoid), topk_idx [B, T, K];
    f_i = E / (K T) * #tokens of the sequence routed to i; P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    """
    B, T, K = topk_idx.shape
    picks = torch.zeros(B, num_experts, dtype=scores.dtype, device=scores.device)
    picks.scatter_add_(1, topk_idx.reshape(B, T * K), torch.ones_like(topk_idx, dtype=scores.dtype)
                       .reshape(B, T * K))                                          # [B, E]
    f = picks * (num_experts / (K * T))                                             # [B, E]
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)                             # [B, E]
    return (f * p).sum(-1).mean()


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `output`; in backward the aux loss gets gradient `scale` (its layer's
    aux_loss_scale when the forward ran)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class MoE(nn.Module):
    """x [B, T, H] -> experts(x) weighted by the gate + shared_experts(x).

    After each call: `last_counts` [E] int64 (each top-k pick counted) and `last_balance_loss`
    (aux_loss_alpha * L_bal, detached: the amount added to the objective; 0 in an inference forward,
    eval mode without grad, where nothing is added to an objective). `aux_loss_scale` is the
    gradient the balance loss gets (1; the step runners set 1 / num_micro_batches, see
    `set_aux_loss_scale`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.aux_loss_alpha = config.aux_loss_alpha
        self.aux_loss_scale = 1.0
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
                               if config.n_shared_experts > 0 else None)
        self.last_counts: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, routed: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. `routed`: (x flattened, the gate's output for it) when the caller ran
        the gate (`Block.route`); the experts read that same view of x, so the gradients meet as here."""
        B, T, H = x.shape
        if routed is None:
            flat = x.reshape(B * T, H)                                              # [N, H]
            routed = (flat, *self.gate(flat))
        flat, topk_weight, topk_idx, scores = routed                                # [N, H], [N, K], [N, K], [N, E]
        y = self.experts(flat, topk_idx, topk_weight).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self.last_counts = count_per_expert(topk_idx.reshape(-1), self.num_experts)
        if self.aux_loss_alpha > 0 and (self.training or torch.is_grad_enabled()):
            aux = self.aux_loss_alpha * sequence_balance_loss(
                scores.view(B, T, -1), topk_idx.view(B, T, -1), self.num_experts)
            self.last_balance_loss = aux.detach()
            if aux.requires_grad:
                y = AttachAuxLoss.apply(y, aux, self.aux_loss_scale)
        else:
            self.last_balance_loss = torch.zeros((), device=x.device)
        return y

    def reset_parameters(self, std: float) -> None:
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(std)


def set_aux_loss_scale(modules: nn.Module | Iterable[nn.Module], scale: float) -> None:
    """Set `aux_loss_scale` of every MoE inside `modules` (a model, or a runner's stage modules):
    1 / num_micro_batches averages the balance loss over gradient accumulation like the LM loss."""
    for root in [modules] if isinstance(modules, nn.Module) else modules:
        for module in root.modules():
            if isinstance(module, MoE):
                module.aux_loss_scale = scale
