"""FP8 E4M3 with block scales: the number format of DeepSeek-V3's FP8 weights (docs/reference.md §1, §2).

A weight W[..., N, K] is stored as `float8_e4m3fn` q and one FP32 *dequantization* scale per
128×128 block of the last two dimensions (`weight_scale_inv` in HF checkpoints): W ≈ q · s. The
arithmetic, shared with the activation tiles of `twinpipe.fp8.quant` and repeated operation for
operation by the Triton kernels (`twinpipe.fp8.triton_quant`), so all give bit-identical results:

    amax = max |x| over the block                        (fp32)
    s    = max(amax, floor) / 448                        (fp32, correctly rounded division;
                                                          floor = 1e-4, DeepSeek's)
    s    = 2 ** ceil(log2(s))                            (only with pow2=True, "ue8m0"; done on the bits)
    q    = e4m3(clamp(x / s, -448, 448))                 (correctly rounded division, round-to-nearest-even)

Shapes whose dimensions are not multiples of the block size get a partial last block, as in the HF
checkpoint format: scales have `ceil(dim / block_size)` entries per dimension and the partial block's
amax is taken over its real elements only. An all-zero block gets s = floor/448 and q = 0, never NaN.
The checkpoint reader and writer (`safetensors_io`) use it; FP8 training builds on it (`twinpipe.fp8`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def check_block_size(block_size: int) -> None:
    """Refuse a block size that is not a positive integer."""
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


def to_e4m3(x_scaled: torch.Tensor) -> torch.Tensor:
    """Already scaled values -> float8_e4m3fn, saturating at ±448 (round to nearest even)."""
    return torch.clamp(x_scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def weight_quant(w: torch.Tensor, block_size: int = 128, pow2: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize per block_size×block_size block of the last two dimensions.

    w [..., N, K] -> q [..., N, K] float8_e4m3fn, s [..., ceil(N/bs), ceil(K/bs)] fp32.
    Leading dimensions (stacked experts [E, N, K]) are independent matrices.
    """
    check_block_size(block_size)
    if w.dim() < 2:
        raise ValueError(f"weight_quant: w must be at least 2-D [..., N, K], got shape {tuple(w.shape)}")
    n, k = w.shape[-2:]
    nb_n, nb_k = math.ceil(n / block_size), math.ceil(k / block_size)
    wf = F.pad(w.float(), (0, nb_k * block_size - k, 0, nb_n * block_size - n))
    blocks = wf.unflatten(-1, (nb_k, block_size)).unflatten(-3, (nb_n, block_size))  # [..., nbn, bs, nbk, bs]
    s = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2)                      # [..., nbn, nbk]
    q = to_e4m3(blocks / s[..., :, None, :, None])                                   # [..., nbn, bs, nbk, bs]
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
    check_block_size(block_size)
    n, k = q.shape[-2:]
    expected = (math.ceil(n / block_size), math.ceil(k / block_size))
    if tuple(s.shape[-2:]) != expected or s.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"weight_dequant: scales {tuple(s.shape)} do not match q {tuple(q.shape)}; "
                         f"expected [..., {expected[0]}, {expected[1]}] for block_size={block_size}")
    return (q.float() * expand_block_scales(s, (n, k), block_size)).to(dtype)
