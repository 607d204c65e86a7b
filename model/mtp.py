"""Multi-token prediction module (DeepSeek-V3 section 2.2): one extra block per prediction depth.

h_k = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1})])) at position i; the output head is the main
model's (applied after this layer's own final `norm`). The concatenation order (embedding first)
follows DeepSeek's checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import prefix_mask
from .block import Block
from .config import ModelConfig
from .norm import RMSNorm

if TYPE_CHECKING:
    from .kv_cache import LatentKVCache


class MTPLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: "LatentKVCache | None" = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h_prev [B, T, H] (previous depth, before the final norm), emb_next [B, T, H] (embedding of
        the token one step ahead) -> h_k [B, T, H] (before `norm`); mask [B, 1, T, T] as Block's."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, T, H]
        return self.block(h, position_ids, cache, mask)

    def reset_parameters(self, std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        nn.init.normal_(self.eh_proj.weight, std=std)
        self.block.reset_parameters(std)


def mtp_depths(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, position_ids: torch.Tensor,
               mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The MTP chain after the main blocks: h [B, T, H] (last block's output), emb [B, T, H] (the
    tokens' embeddings), mask [B, 1, T, T] or None -> [h_1, h_2, ...], h_k [B, T-k, H] before layer
    k's `norm` (depth k predicts token i+k+1 at position i; depths with no position left are skipped)."""
    T = h.shape[1]
    out = []
    for k, layer in enumerate(layers, start=1):
        if T - k <= 0:
            break
        h = layer(h[:, :T - k], emb[:, k:], position_ids[:, :T - k], mask=prefix_mask(mask, T - k))  # [B, T-k, H]
        out.append(h)
    return out
