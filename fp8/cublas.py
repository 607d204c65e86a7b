"""cuBLAS blockwise FP8 GEMM through `torch._scaled_mm` (Hopper, CUDA >= 12.9, torch >= 2.9).

`_scaled_mm(a [M, K] row-major, b [K, N] column-major, scale_a, scale_b)` accepts DeepSeek's layouts:
scale_a [M, ceil(K/128)] (1×128) with scale_b [ceil(K/128), ceil(N/128)] (128×128) or
[ceil(K/128), N] (1×128, for Wgrad). cuBLAS wants the 1×128 scales M-major ("outer-dim major"),
so they are passed as the transpose of a contiguous [nbk, M] tensor. There is no blockwise grouped
GEMM in cuBLAS for Hopper, so the grouped forms loop over the expert segments.
"""

from __future__ import annotations

import functools

import torch

from twinpipe.fp8.emulate import (check_gemm_operands, check_grouped_operands, k_grouped_by_segments,
                                  segment_bounds)


@functools.lru_cache(maxsize=None)
def cublas_unavailable_reason(device_index: int = 0) -> str | None:
    """None when blockwise `_scaled_mm` runs on this machine, else why not (probed once)."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch._scaled_mm blockwise needs a Hopper GPU)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major != 9:
        return f"compute capability {major}.{minor}: blockwise _scaled_mm scaling is implemented for 9.x"
    try:
        a = torch.zeros(256, 256, device=f"cuda:{device_index}", dtype=torch.float8_e4m3fn)
        _scaled(a, torch.ones(256, 2, device=a.device), a, torch.ones(2, 2, device=a.device),
                torch.bfloat16)
    except RuntimeError as exc:  # the build lacks blockwise support (e.g. CUDA < 12.9)
        return f"torch._scaled_mm rejected blockwise scales: {str(exc).splitlines()[0]}"
    return None


def _scaled(a, a_s, b, b_s, out_dtype):
    """a [M, K] fp8, a_s [M, nbk]; b [N, K] fp8, b_s [nbn or N, nbk] -> [M, N]."""
    scale_a = a_s.float().t().contiguous().t()            # [M, nbk], M-major
    scale_b = b_s.float().t().contiguous()                 # [nbk, nbn] or, 1×128 (Wgrad), [nbk, N]
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=out_dtype)


def _require(device: torch.device) -> None:
    reason = cublas_unavailable_reason(device.index or 0) if device.type == "cuda" else (
        f"tensors on {device}: torch._scaled_mm blockwise needs CUDA tensors on a Hopper GPU")
    if reason is not None:
        raise RuntimeError(f"fp8 backend 'cublas' is not available: {reason}; "
                           "use backend='triton', 'emulate' or 'auto'")


def cublas_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype, block_size: int = 128) -> torch.Tensor:
    if block_size != 128:
        raise ValueError(f"block_size={block_size}: cuBLAS blockwise scaling supports only 128")
    nbk = check_gemm_operands(a, a_s, b, b_s, block_size)
    _require(a.device)
    k, n = a.shape[-1], b.shape[0]
    if k % 16 or n % 16:
        raise ValueError(f"fp8 backend 'cublas': K={k} and N={n} must be multiples of 16")
    out = _scaled(a.reshape(-1, k), a_s.reshape(-1, nbk), b, b_s, out_dtype)   # [M, N]
    return out.reshape(*a.shape[:-1], n)


def cublas_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                        offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                        ) -> torch.Tensor:
    check_grouped_operands(a, b, b_s, offsets, block_size)
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)   # [M, N]
    for e, (lo, hi) in enumerate(segment_bounds(offsets)):
        if hi > lo:
            out[lo:hi] = cublas_gemm(a[lo:hi], a_s[lo:hi], b[e], b_s[e], out_dtype, block_size)
    return out


def cublas_k_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                          offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                          ) -> torch.Tensor:
    """out[g] = a[:, seg g] @ b[:, seg g].T over 128-aligned segments (expert Wgrad), one call each."""
    return k_grouped_by_segments(cublas_gemm, a, a_s, b, b_s, offsets, out_dtype, block_size)
