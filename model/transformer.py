"""The DeepSeek-V3 transformer: embedding -> blocks -> norm -> head, plus MTP layers for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import document_causal_mask
from .block import Block
from .config import ModelConfig
from .moe import MoE
from .mtp import MTPLayer, mtp_depths
from .norm import RMSNorm

if TYPE_CHECKING:
    from .kv_cache import LatentKVCache


@dataclass
class TransformerOutput:
    """What `Transformer.forward_train` (and the pipeline's last stage) returns (docs/internals.md,
    forward contracts): the heads' *inputs* and the head weight, so a loss can take the logits in
    chunks (trainer/chunked_ce.py) instead of holding [B, T, V]; `logits` / `mtp_logits` compute
    them whole on first use, for losses that want them."""

    hidden: torch.Tensor                                      # [B, T, H] main head input (after the final norm)
    head_weight: torch.Tensor                                 # [V, H] lm_head.weight (shared with MTP)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # k-th: [B, T-k, H] after MTP norm k
    expert_counts: torch.Tensor | None = None                 # [num MoE layers incl. MTP, E] int64
    balance_loss: torch.Tensor | None = None                  # scalar, detached, summed over MoE layers

    @cached_property
    def logits(self) -> torch.Tensor:
        """[B, T, V] of the main head."""
        return F.linear(self.hidden, self.head_weight)

    @cached_property
    def mtp_logits(self) -> list[torch.Tensor]:
        """k-th: [B, T-k, V], position i predicts labels[:, i+k]."""
        return [F.linear(h, self.head_weight) for h in self.mtp_hidden]


class Transformer(nn.Module):
    """DeepSeek-V3 model; attribute names mirror HF so the checkpoint mapping is a prefix change."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.init_weights()

    # ---- weights ----
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (default config.initializer_range), ones for norms, zero
        router bias. Works after `to_empty` on a model built on the meta device."""
        std = self.config.initializer_range if std is None else std
        nn.init.normal_(self.embed_tokens.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters(std)
        for mtp in self.mtp:
            mtp.reset_parameters(std)

    def moe_layers(self) -> list[MoE]:
        """MoE modules in the order of `expert_counts` rows: main layers, then MTP blocks."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    # ---- pieces for pipeline stages ----
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> h [B, T, H]."""
        return self.embed_tokens(tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> logits [B, T, V] (final norm + lm_head)."""
        return self.lm_head(self.norm(h))

    def mtp_head(self, k: int, h_k: torch.Tensor) -> torch.Tensor:
        """Logits of MTP depth k (1-based) from its hidden state: [B, T', H] -> [B, T', V]."""
        return self.lm_head(self.mtp[k - 1].norm(h_k))

    # ---- forwards ----
    def hidden(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
               cache: "LatentKVCache | None" = None) -> torch.Tensor:
        """tokens [B, T] -> last block's output [B, T, H] (before the final norm). Without a cache,
        position_ids that restart inside a row keep packed documents apart (`document_causal_mask`)."""
        mask = None if cache is not None or position_ids is None else document_causal_mask(position_ids)
        return self._blocks(self.embed(tokens), position_ids, mask, cache)

    def _blocks(self, h: torch.Tensor, position_ids: torch.Tensor | None, mask: torch.Tensor | None,
                cache: "LatentKVCache | None" = None) -> torch.Tensor:
        """h [B, T, H] through every block, all under the one document mask [B, 1, T, T] (or None)."""
        for layer in self.layers:
            h = layer(h, position_ids, cache, mask)
        return h

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: "LatentKVCache | None" = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] of the main head.

        With a `cache` the tokens are appended to it (valid [B, T] bool marks padding as False;
        positions then come from the cache unless given) and attention covers the cached prefix.
        """
        if cache is None:
            return self.head(self.hidden(tokens, position_ids))
        positions = cache.begin(tokens.shape[1], valid)
        h = self.hidden(tokens, positions if position_ids is None else position_ids, cache)
        cache.commit()
        return self.head(h)

    def forward_train(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> TransformerOutput:
        """The main head's input, the MTP heads' inputs (depth k: [B, T-k, H], position i predicts
        labels[:, i+k]) and the head weight (their logits on demand), per-layer expert counts and the
        summed balance loss."""
        B, T = tokens.shape
        mask = None if position_ids is None else document_causal_mask(position_ids)  # [B, 1, T, T]
        if position_ids is None:
            position_ids = torch.arange(T, device=tokens.device).expand(B, T)
        moes = self.moe_layers()
        for moe in moes:
            moe.last_counts = moe.last_balance_loss = None
        h = self._blocks(self.embed(tokens), position_ids, mask)                    # [B, T, H]
        mtp_hidden = []
        if len(self.mtp):
            depths = mtp_depths(self.mtp, h, self.embed(tokens), position_ids, mask)  # h_k [B, T-k, H]
            mtp_hidden = [self.mtp[k].norm(h_k) for k, h_k in enumerate(depths)]
        E = self.config.n_routed_experts
        counts = torch.zeros(len(moes), E, dtype=torch.long, device=tokens.device)
        balance = torch.zeros((), device=tokens.device)
        for row, moe in enumerate(moes):
            if moe.last_counts is not None:  # an MTP depth is skipped when T <= k
                counts[row] = moe.last_counts
                balance = balance + moe.last_balance_loss
        return TransformerOutput(self.norm(h), self.lm_head.weight, mtp_hidden, counts, balance)
