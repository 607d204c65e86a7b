"""The router: sigmoid scores, bias-corrected group-limited top-k selection (DeepSeek-V3 `noaux_tc`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Gate(nn.Module):
    """x [N, H] -> (topk_weight [N, K] fp32, topk_idx [N, K] int64, scores [N, E] fp32).

    s = sigmoid(x W^T). Selection uses s + b: each group of E / n_group experts scores the sum of its
    top-2 biased scores, the best `topk_group` groups stay, and the top-K experts among them are picked.
    The gate values are the *unbiased* s of the picks, normalized to sum 1 (norm_topk_prob) and times
    routed_scaling_factor. `e_score_correction_bias` is a persistent fp32 buffer that the trainer
    updates (it is not trained and stays fp32 when the module changes dtype).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Move the bias with the module but keep it fp32: an empty probe tells the target device.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.float32, device=bias.device)).device
        if bias.device.type == "meta":
            self.e_score_correction_bias = torch.empty_like(bias, device=device)
        else:
            self.e_score_correction_bias = bias.to(device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N = x.shape[0]
        with torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") \
                else contextlib.nullcontext():  # the router stays fp32 under bf16 autocast
            scores = F.linear(x.float(), self.weight.float()).sigmoid()           # [N, E]
        biased = scores + self.e_score_correction_bias                            # [N, E]
        per_group = self.num_experts // self.n_group
        group_scores = biased.view(N, self.n_group, per_group).topk(2, dim=-1).values.sum(-1)  # [N, G]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices           # [N, G']
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand(N, self.n_group, per_group).reshape(N, -1)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
        topk_idx = biased.topk(self.top_k, dim=-1, sorted=False).indices          # [N, K]
        return self.pick_weights(scores, topk_idx), topk_idx, scores

    def pick_weights(self, scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """The gate values of given picks: scores [N, E] (unbiased), topk_idx [N, K] -> [N, K] fp32.
        Also how picks made elsewhere (a rollout's routes, replayed) get their weights from live scores,
        so the router keeps its gradient."""
        topk_weight = scores.gather(1, topk_idx)                                  # [N, K]
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight * self.routed_scaling_factor

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        self.e_score_correction_bias.zero_()
