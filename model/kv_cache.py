"""KV cache for MLA: per layer only the compressed latent c_kv and the rotated k_pe are stored.

Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (576 for DeepSeek-V3),
side by side in one row [c_kv | k_pe] (absorbed attention scores both halves with one matmul),
against 2 * heads * head_dim for a full K/V cache (see `bytes_per_token`). A `valid` mask per slot
marks padding, so left- and right-padded prompts and finished sequences are all handled per
sequence: padded slots are never attended and do not advance a sequence's positions. A pipeline
stage keeps only its own layers (`layers`), so a rank's cache grows with the blocks it runs, not
with the model.

Slots are filled in step by the whole batch (every sequence advances by the same number of slots per
step). Continuous batching gives a sequence's row to a new prompt (`load_rows`: its prefilled
latents copied to the row's first slots); from then on the rows write at their own slot
(`fill` [B]), still one slot each per decoding step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ModelConfig


class LatentKVCache:
    """latent [L, B, S, kv_lora_rank + qk_rope_head_dim] (c_kv | k_pe) for the L layers it serves:
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
        self.row = {layer: i for i, layer in enumerate(layers)}  # layer_idx -> row of latent
        num_layers = len(self.row)
        self.max_len = max_len
        self.absorb = absorb
        self.kv_lora_rank = config.kv_lora_rank
        self.latent = torch.zeros(num_layers, batch_size, max_len, config.kv_lora_rank + config.qk_rope_head_dim,
                                  dtype=dtype, device=device)                            # [L, B, S, r + dr]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)   # [B, S]
        self.num_valid = torch.zeros(batch_size, dtype=torch.long, device=device)        # [B]
        self.length = 0                            # slots in use: every row's (uniform) or the longest row's
        self.fill: torch.Tensor | None = None      # [B] slots in use per row once rows were reloaded
        self.fill_list: list[int] | None = None    # the same on the host
        self.mask: torch.Tensor | None = None
        self.blocked: torch.Tensor | None = None   # ~mask
        self._step = 0
        self._slots: torch.Tensor | None = None    # [B, T] the open step's slot per row (per-row fill)
        self._rope: tuple | None = None            # (position_ids, dtype, cos, sin) of the open step

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

    @property
    def c_kv(self) -> torch.Tensor:
        """[L, B, S, kv_lora_rank] (a view)."""
        return self.latent[..., :self.kv_lora_rank]

    @property
    def k_pe(self) -> torch.Tensor:
        """[L, B, S, qk_rope_head_dim] (a view)."""
        return self.latent[..., self.kv_lora_rank:]

    def begin(self, num_tokens: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Open a step of `num_tokens` slots; valid [B, T] bool (None = all valid).
        Returns the position ids [B, T]: each sequence counts only its valid tokens."""
        B, device = self.valid.shape[0], self.valid.device
        start, end = self.length, self.length + num_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {num_tokens} tokens > max_len={self.max_len}")
        if valid is None:
            valid = torch.ones(B, num_tokens, dtype=torch.bool, device=device)
        valid = valid.to(device=device, dtype=torch.bool)
        positions = (self.num_valid[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
        k_slot = torch.arange(end, device=device)                                        # [S]
        if self.fill is None:
            self.valid[:, start:end] = valid
            q_slot = k_slot[start:, None]                                                # [T, 1]
        else:
            self._slots = self.fill[:, None] + torch.arange(num_tokens, device=device)   # [B, T]
            self.valid.scatter_(1, self._slots, valid)
            q_slot = self._slots[:, :, None]                                             # [B, T, 1]
        # A padded query attends to itself only, so its row stays finite (and is never read).
        if num_tokens == 1 and self.fill is None:
            mask = self.valid[:, None, :end].clone()                                     # [B, 1, S]
            mask[:, :, end - 1] = True
        else:
            mask = ((k_slot <= q_slot) & self.valid[:, None, :end]) | (k_slot == q_slot)  # [B, T, S]
        self.mask = mask.unsqueeze(1)                                                    # [B, 1, T, S]
        self.blocked = ~self.mask
        self._step = num_tokens
        self._rope = None
        return positions

    def rope(self, rotary: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype):
        """rotary(position_ids, dtype), computed once per step (every layer of a model shares its
        rotary frequencies: they come from the one config)."""
        if self._rope is None or self._rope[0] is not position_ids or self._rope[1] != dtype:
            self._rope = (position_ids, dtype, *rotary(position_ids, dtype))
        return self._rope[2], self._rope[3]

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Store c_kv [B, T, r] and k_pe [B, T, dr] of `layer` in the open step; return all slots so
        far: [B, S, r + dr] (c_kv | k_pe)."""
        end, rows, r = self.length + self._step, self.latent[self.row[layer]], self.kv_lora_rank
        if self.fill is None:
            start = self.length
            rows[:, start:end, :r] = c_kv
            rows[:, start:end, r:] = k_pe
        else:
            batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
            rows[batch, self._slots] = torch.cat([c_kv, k_pe], dim=-1)
        return rows[:, :end]

    def commit(self) -> None:
        """Close the step: the slots become history."""
        if self.fill is None:
            self.num_valid += self.valid[:, self.length:self.length + self._step].sum(1)
        else:
            self.num_valid += self.valid.gather(1, self._slots).sum(1)
            self.fill += self._step
            self.fill_list = [n + self._step for n in self.fill_list]
        self.length += self._step
        self._step = 0

    def rollback(self, length: int) -> None:
        """Forget slots from `length` on (speculative decoding rejects drafted tokens)."""
        if self.fill is not None:
            raise ValueError("rollback: not after load_rows (rows fill their own slots)")
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to {length}: must be within [0, {self.length}]")
        self.num_valid -= self.valid[:, length:self.length].sum(1)
        self.valid[:, length:] = False
        self.length = length

    def reset(self) -> None:
        """Empty, for another batch of sequences (the tensors are kept)."""
        self.valid.zero_()
        self.num_valid.zero_()
        self.length, self.fill, self.fill_list, self._step = 0, None, None, 0

    def load_rows(self, rows: list[int], prefilled: "LatentKVCache") -> None:
        """Give rows `rows` to the sequences of `prefilled` (a cache of len(rows) rows and the same
        layers, after their prefill): its slots are copied to the rows' first slots, the rest of the
        rows is cleared. From the next step on each row writes at its own slot."""
        n = prefilled.length
        if n > self.max_len:
            raise ValueError(f"load_rows: {n} prefilled slots > max_len={self.max_len}")
        index = self.clear_rows(rows, n)
        self.latent[:, index, :n] = prefilled.latent[:, :, :n]
        self.valid[index, :n] = prefilled.valid[:, :n]
        self.num_valid[index] = prefilled.num_valid

    def clear_rows(self, rows: list[int], fill: int = 0) -> torch.Tensor:
        """Forget rows `rows` (nothing valid, no position used); they write from slot `fill` on.
        Returns their index tensor."""
        B, device = self.valid.shape[0], self.valid.device
        if self.fill is None:
            self.fill = torch.full((B,), self.length, dtype=torch.long, device=device)
            self.fill_list = [self.length] * B
        index = torch.tensor(rows, dtype=torch.long, device=device)
        self.valid[index] = False
        self.num_valid[index] = 0
        self.fill[index] = fill
        for row in rows:
            self.fill_list[row] = fill
        self.length = max(self.fill_list)
        return index
