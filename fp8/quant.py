"""Block quantization to FP8 E4M3 (DeepSeek-V3 report §3.3), the torch reference.

Activations (and activation gradients) are scaled per 1×128 tile along the last dimension; weights per
128×128 block. Every scale is a *dequantization* scale in FP32, the same convention as DeepSeek's
checkpoints (`weight_scale_inv`): x ≈ q · s.

The arithmetic is fixed here and repeated operation for operation by the Triton kernels
(`twinpipe.fp8.triton_quant`), so both give bit-identical results:

    amax = max |x| over the tile                         (fp32)
    s    = max(amax, floor) / 448                        (fp32, correctly rounded division;
                                                          floor = 1e-4, DeepSeek's, for weights and
                                                          activations; 1e-30 for gradients)
    s    = 2 ** ceil(log2(s))                            (only with pow2=True, "ue8m0"; done on the bits)
    q    = e4m3(clamp(x / s, -448, 448))                 (correctly rounded division, round-to-nearest-even)

Shapes whose quantized dimensions are not multiples of the block size get a partial last tile, as in
the HF checkpoint format: scales have `ceil(dim / block_size)` entries and the partial tile's amax is
taken over its real elements only. An all-zero tile gets s = floor/448 and q = 0, never NaN.

Why gradients get their own floor: activation gradients of a loss divided by the number of
micro-batches are small, and in the tiny recipe 40-60% of their 1x128 tiles have amax < 1e-4. With
DeepSeek's floor those tiles would sit on a fixed grid (steps of 1e-4/448 * 2^-9) instead of being
scaled to their own range, so FP8 numerics would depend on the micro-batch count. 1e-30 keeps every
scale a normal FP32 number (s >= 2.2e-33) while letting any real gradient tile use the full E4M3 range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
GRAD_AMAX_FLOOR = 1e-30


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size={block_size}: must be a positive integer (128 in DeepSeek-V3)")


def round_scale_pow2(s: torch.Tensor) -> torch.Tensor:
    """Round positive normal FP32 scales up to the next power of two (exact, on the bit pattern)."""
    bits = s.contiguous().view(torch.int32)
    exponent = bits & 0x7F800000
    has_mantissa = (bits & 0x007FFFFF) != 0
    return torch.where(has_mantissa, exponent + 0x00800000, exponent).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2: bool = False, amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """Dequant scale s = max(amax, amax_floor) / 448, optionally rounded up to a power of two."""
    s = torch.clamp(amax.float(), min=amax_floor) / FP8_MAX
    return round_scale_pow2(s) if pow2 else s


def _to_e4m3(x_scaled: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x_scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def act_quant(x: torch.Tensor, block_size: int = 128, pow2: bool = False, amax_floor: float = AMAX_FLOOR
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per 1×block_size tile along the last dimension (gradients: amax_floor=GRAD_AMAX_FLOOR).

    x [..., K] (any float dtype) -> q [..., K] float8_e4m3fn, s [..., ceil(K/block_size)] fp32.
    """
    _check_block_size(block_size)
    if x.dim() == 0:
        raise ValueError("act_quant: x must have at least one dimension, got a scalar")
    k = x.shape[-1]
    num_blocks = math.ceil(k / block_size)
    pad = num_blocks * block_size - k
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()            # [..., nb * bs]
    tiles = xf.unflatten(-1, (num_blocks, block_size))               # [..., nb, bs]
    s = scale_from_amax(tiles.abs().amax(dim=-1), pow2, amax_floor)  # [..., nb]
    q = _to_e4m3(tiles / s.unsqueeze(-1))                            # [..., nb, bs]
    q = q.flatten(-2)[..., :k]                                       # [..., K]
    return q, s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `act_quant`: q [..., K], s [..., ceil(K/block_size)] -> x [..., K]."""
    _check_block_size(block_size)
    k = q.shape[-1]
    if s.shape[-1] != math.ceil(k / block_size) or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"act_dequant: scales {tuple(s.shape)} do not match q {tuple(q.shape)} "
                         f"with block_size={block_size}")
    s_full = s.float().repeat_interleave(block_size, dim=-1)[..., :k]  # [..., K]
    return (q.float() * s_full).to(dtype)


def weight_quant(w: torch.Tensor, block_size: int = 128, pow2: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per block_size×block_size block of the last two dimensions.

    w [..., N, K] -> q [..., N, K] float8_e4m3fn, s [..., ceil(N/bs), ceil(K/bs)] fp32.
    Leading dimensions (stacked experts [E, N, K]) are independent matrices.
    """
    _check_block_size(block_size)
    if w.dim() < 2:
        raise ValueError(f"weight_quant: w must be at least 2-D [..., N, K], got shape {tuple(w.shape)}")
    n, k = w.shape[-2:]
    nb_n, nb_k = math.ceil(n / block_size), math.ceil(k / block_size)
    wf = F.pad(w.float(), (0, nb_k * block_size - k, 0, nb_n * block_size - n))
    blocks = wf.unflatten(-1, (nb_k, block_size)).unflatten(-3, (nb_n, block_size))  # [..., nbn, bs, nbk, bs]
    s = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2)                      # [..., nbn, nbk]
    q = _to_e4m3(blocks / s[..., :, None, :, None])                                  # [..., nbn, bs, nbk, bs]
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k]                                   # [..., N, K]
    return q, s


def expand_block_scales(s: torch.Tensor, shape: tuple[int, int], block_size: int = 128) -> torch.Tensor:
    """Per-element scales [..., N, K] from block scales [..., ceil(N/bs), ceil(K/bs)]."""
    n, k = shape
    return (s.float().repeat_interleave(block_size, dim=-2)[..., :n, :]
            .repeat_interleave(block_size, dim=-1)[..., :k])


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `weight_quant`: q [..., N, K] (fp8), s [..., ceil(N/bs), ceil(K/bs)] -> w [..., N, K]."""
    _check_block_size(block_size)
    n, k = q.shape[-2:]
    expected = (math.ceil(n / block_size), math.ceil(k / block_size))
    if tuple(s.shape[-2:]) != expected or s.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"weight_dequant: scales {tuple(s.shape)} do not match q {tuple(q.shape)}; "
                         f"expected [..., {expected[0]}, {expected[1]}] for block_size={block_size}")
    return (q.float() * expand_block_scales(s, (n, k), block_size)).to(dtype)
