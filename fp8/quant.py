"""Activation tiles in FP8 E4M3 (DeepSeek-V3 report §3.3, docs/reference.md §2), the torch reference.

Activations and activation gradients are scaled per 1×128 tile along the last dimension, with the
scale rule, E4M3 rounding and partial-tile handling of the weight blocks (`twinpipe.model.fp8_format`,
where the arithmetic is written out); every scale is a *dequantization* scale in FP32: x ≈ q · s. The
Triton kernels (`twinpipe.fp8.triton_quant`) repeat it operation for operation (bit-identical).

Why gradients get their own floor (`GRAD_AMAX_FLOOR` instead of DeepSeek's 1e-4): activation
gradients of a loss divided by the number of micro-batches are small, and in the tiny recipe 40-60%
of their 1x128 tiles have amax < 1e-4. With DeepSeek's floor those tiles would sit on a fixed grid
(steps of 1e-4/448 * 2^-9) instead of being scaled to their own range, so FP8 numerics would depend on
the micro-batch count. 1e-30 keeps every scale a normal FP32 number (s >= 2.2e-33) while letting any
real gradient tile use the full E4M3 range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twinpipe.model.fp8_format import AMAX_FLOOR, check_block_size, scale_from_amax, to_e4m3

GRAD_AMAX_FLOOR = 1e-30


def act_quant(x: torch.Tensor, block_size: int = 128, pow2: bool = False, amax_floor: float = AMAX_FLOOR
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per 1×block_size tile along the last dimension (gradients: amax_floor=GRAD_AMAX_FLOOR).

    x [..., K] (any float dtype) -> q [..., K] float8_e4m3fn, s [..., ceil(K/block_size)] fp32.
    """
    check_block_size(block_size)
    if x.dim() == 0:
        raise ValueError("act_quant: x must have at least one dimension, got a scalar")
    k = x.shape[-1]
    num_blocks = math.ceil(k / block_size)
    pad = num_blocks * block_size - k
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()            # [..., nb * bs]
    tiles = xf.unflatten(-1, (num_blocks, block_size))               # [..., nb, bs]
    s = scale_from_amax(tiles.abs().amax(dim=-1), pow2, amax_floor)  # [..., nb]
    q = to_e4m3(tiles / s.unsqueeze(-1))                             # [..., nb, bs]
    q = q.flatten(-2)[..., :k]                                       # [..., K]
    return q, s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `act_quant`: q [..., K], s [..., ceil(K/block_size)] -> x [..., K]."""
    check_block_size(block_size)
    k = q.shape[-1]
    if s.shape[-1] != math.ceil(k / block_size) or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"act_dequant: scales {tuple(s.shape)} do not match q {tuple(q.shape)} "
                         f"with block_size={block_size}")
    s_full = s.float().repeat_interleave(block_size, dim=-1)[..., :k]  # [..., K]
    return (q.float() * s_full).to(dtype)
