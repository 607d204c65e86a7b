"""Rotary position embedding for MLA's decoupled part, with YaRN context extension.

Frequencies and both YaRN temperature factors are computed once per model from the config, exactly as
transformers' `_compute_yarn_parameters` and `yarn_apply_mscale` do:
- `attention_factor` multiplies cos and sin (mscale(factor, mscale) / mscale(factor, mscale_all_dim));
- `softmax_mscale` multiplies the softmax scale (mscale(factor, mscale_all_dim) squared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeParams:
    inv_freq: torch.Tensor      # [rope_dim / 2] fp32, on CPU
    attention_factor: float     # multiplies cos/sin
    softmax_mscale: float       # multiplies the softmax scale 1/sqrt(qk_head_dim)


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim index whose wavelength makes `num_rotations` turns over `max_pos` tokens."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_params(config: ModelConfig) -> RopeParams:
    """RoPE inverse frequencies for qk_rope_head_dim, with YaRN when config.rope_scaling says so."""
    dim, base = config.qk_rope_head_dim, float(config.rope_theta)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # [dim/2]
    pos_freqs = base ** exponents
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind != "yarn":
        return RopeParams(1.0 / pos_freqs, 1.0, 1.0)
    original = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    factor = rs.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    low = _correction_dim(beta_fast, dim, base, original)
    high = _correction_dim(beta_slow, dim, base, original)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                                     # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    softmax_mscale = yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return RopeParams(inv_freq, float(attention_factor), float(softmax_mscale))


class RotaryEmbedding(nn.Module):
    """cos/sin per (sequence, position) for the rotary dims; the frequencies are not a state-dict entry.

    The fp32 inverse frequencies live on CPU and are copied once per device, so meta construction,
    `to_empty` and state-dict loading never leave them uninitialized.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        params = rope_params(config)
        self.attention_factor = params.attention_factor
        self.softmax_mscale = params.softmax_mscale
        self._inv_freq = params.inv_freq
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._per_device:
            self._per_device[device] = self._inv_freq.to(device)
        return self._per_device[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, T, rope_dim / 2] in `dtype`."""
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)  # [B, T, rope_dim/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, heads, rope_dim] by cos/sin [B, T, rope_dim/2].

    The pairs are (x[2i], x[2i+1]) when `interleave`, else (x[i], x[i + rope_dim/2]). The output is
    always laid out as [first of each pair, second of each pair] (what transformers returns in both
    cases); q and k get the same layout, so their dot product is unchanged.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                 # [B, T, 1, rope_dim/2]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
