"""One transformer block: pre-norm MLA and pre-norm SwiGLU (dense) or MoE, each with a residual."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import MLA
from .config import ModelConfig
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm

if TYPE_CHECKING:
    from .kv_cache import LatentKVCache


class Block(nn.Module):
    """h -> h + attn(norm(h)) -> h + mlp(norm(h)); mlp is MoE from layer first_k_dense_replace on."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | MoE = (MoE(config) if config.is_moe_layer(layer_idx)
                               else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: "LatentKVCache | None" = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, H] -> [B, T, H]; mask [B, 1, T, T]: the packed-document mask (see MLA.forward)."""
        h = h + self.attention(h, position_ids, cache, mask)
        if isinstance(self.mlp, MoE):
            x, routed = self.route(h)
            return h + self.mlp(x, routed)
        return h + self.mlp(self.post_attention_layernorm(h))

    def attention(self, h: torch.Tensor, position_ids: torch.Tensor | None, cache: "LatentKVCache | None",
                  mask: torch.Tensor | None) -> torch.Tensor:
        """The attention sublayer without its residual: attn(norm(h)) [B, T, H]. One method, so
        recomputing it (train.recompute attention) keeps only h."""
        return self.self_attn(self.input_layernorm(h), position_ids, cache, mask)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The MoE's input x = norm(h) [B, T, H] and (x flattened [N, H], the router's topk_weight,
        topk_idx, scores of it) for `MoE.forward`. One method, so recomputing it (train.recompute
        router) keeps h, not the normed x the router reads (the experts keep their own copies of x)."""
        x = self.post_attention_layernorm(h)
        flat = x.reshape(-1, x.shape[-1])                                           # [N, H]
        return x, (flat, *self.mlp.gate(flat))

    def reset_parameters(self, std: float) -> None:
        self.input_layernorm.reset_parameters()
        self.post_attention_layernorm.reset_parameters()
        self.self_attn.reset_parameters(std)
        self.mlp.reset_parameters(std)
