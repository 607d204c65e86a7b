"""KV cache for MLA: per layer only the compressed latent c_kv and the rotated k_pe are stored.

Slots are shared by the batch (every sequence advances by the same number of slots per step); a
`valid` mask per slot marks padding, so left- and right-padded prompts and finished sequences are all
handled per sequence: padded slots are never attended and do not advance a sequence's positions.
Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (576 for DeepSeek-V3),
against 2 * heads * head_dim for a full K/V cache (see `bytes_per_token`). A pipeline stage keeps only
its own layers (`layers`), so a rank's cache grows with the blocks it runs, not with the model.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ModelConfig


class LatentKVCache:
    """c_kv [L, B, S, kv_lora_rank] and k_pe [L, B, S, qk_rope_head_dim] for the L layers it serves:
    `layers` (the layer_idx of a pipeline stage's blocks), default every main and MTP layer.

    A step: `positions = cache.begin(T, valid)`; every layer calls `cache.update(layer, c_kv, k_pe)`
    and reads `cache.mask` [B, 1, T, S] (True = attend); then `cache.commit()`.
    `absorb` forces MLA's absorbed form (True: attention on the latent) or the naive reference form
    (False); None lets each step take the one with fewer FLOPs (absorbed for decoding, naive for long
    prefills; `MLA.use_absorbed`).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", absorb: bool | None = None,
                 layers: Sequence[int] | None = None):
        if layers is None:
            layers = range(config.num_hidden_layers + config.num_nextn_predict_layers)
        self.row = {layer: i for i, layer in enumerate(layers)}  # layer_idx -> row of c_kv / k_pe
        num_layers = len(self.row)
        self.max_len = max_len
        self.absorb = absorb
        self.c_kv = torch.zeros(num_layers, batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch_size, max_len, config.qk_rope_head_dim, dtype=dtype,
                                device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)   # [B, S]
        self.num_valid = torch.zeros(batch_size, dtype=torch.long, device=device)        # [B]
        self.length = 0
        self.mask: torch.Tensor | None = None
        self._step = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int,
                  absorb: bool | None = None, layers: Sequence[int] | None = None) -> "LatentKVCache":
        """A cache in the dtype and on the device of the model's first local block's weights."""
        weight = next(p for p in model.parameters() if not p.is_meta and p.is_floating_point())
        return cls(model.config, batch_size, max_len, weight.dtype, weight.device, absorb, layers)

    @staticmethod
    def bytes_per_token(config: ModelConfig, bytes_per_value: int = 2, latent: bool = True) -> int:
        """Cache bytes per token over the main layers: latent (c_kv + k_pe) or naive full K and V."""
        if latent:
            per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        else:
            per_layer = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        return per_layer * config.num_hidden_layers * bytes_per_value

    def begin(self, num_tokens: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Open a step of `num_tokens` slots; valid [B, T] bool (None = all valid).
        Returns the position ids [B, T]: each sequence counts only its valid tokens."""
        B = self.valid.shape[0]
        start, end = self.length, self.length + num_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {num_tokens} tokens > max_len={self.max_len}")
        if valid is None:
            valid = torch.ones(B, num_tokens, dtype=torch.bool, device=self.valid.device)
        valid = valid.to(device=self.valid.device, dtype=torch.bool)
        self.valid[:, start:end] = valid
        positions = (self.num_valid[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        q_slot = torch.arange(start, end, device=valid.device)[:, None]                  # [T, 1]
        k_slot = torch.arange(end, device=valid.device)[None, :]                         # [1, S]
        causal = k_slot <= q_slot                                                        # [T, S]
        # A padded query attends to itself only, so its row stays finite (and is never read).
        mask = (causal[None] & self.valid[:, None, :end]) | (k_slot == q_slot)[None]     # [B, T, S]
        self.mask = mask.unsqueeze(1)                                                    # [B, 1, T, S]
        self._step = num_tokens
        return positions

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [B, T, r] and k_pe [B, T, dr] of `layer` in the open step; return all slots so
        far: [B, S, r], [B, S, dr]."""
        start, end, row = self.length, self.length + self._step, self.row[layer]
        self.c_kv[row, :, start:end] = c_kv
        self.k_pe[row, :, start:end] = k_pe
        return self.c_kv[row, :, :end], self.k_pe[row, :, :end]

    def commit(self) -> None:
        """Close the step: the slots become history."""
        start, end = self.length, self.length + self._step
        self.num_valid += self.valid[:, start:end].sum(1)
        self.length = end
        self._step = 0

    def rollback(self, length: int) -> None:
        """Forget slots from `length` on (speculative decoding rejects drafted tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to {length}: must be within [0, {self.length}]")
        self.num_valid -= self.valid[:, length:self.length].sum(1)
        self.valid[:, length:] = False
        self.length = length
