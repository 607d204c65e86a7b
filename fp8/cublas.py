"""cuBLAS blockwise FP8 GEMM through `torch._scaled_mm` (Hopper, CUDA >= 12.9, torch >= 2.9).

`_scaled_mm(a [M, K] row-major, b [K, N] column-major, scale_a, scale_b)` accepts DeepSeek's layouts:
scale_a [M, ceil(K/128)] (1×128) with scale_b [ceil(K/128), ceil(N/128)] (128×128) or
[ceil(K/128), N] (1×128, for Wgrad). Torch checks the scales' strides on the GPU only (its meta kernel
checks shapes): ScaledBlas.cpp's `get_joint_scaling` reads scale_a as is and scale_b through `.t()`.
A 1×128 scale must be outer-dim major (scale_a strides (1, M); scale_b.t() strides (1, N)), so both are
transposes of contiguous [nbk, rows] tensors. The 128×128 scale_b.t() [nbn, nbk] must be row-major
with a leading stride of nbk (torch's main branch) or of nbk rounded up to 4 (the 2.9-era Blas.cpp);
the two agree when nbk % 4 == 0 and the probe below finds which one this torch wants otherwise. There
is no blockwise grouped GEMM in cuBLAS for Hopper, so the grouped forms loop over the expert segments.
"""

from __future__ import annotations

import functools

import torch

from twinpipe.fp8.emulate import (check_gemm_operands, check_grouped_operands, k_grouped_by_segments,
                                  segment_bounds)


_LAYOUT = {"pad_128x128": False}   # whether scale_b.t()'s leading stride is nbk rounded up to 4


@functools.lru_cache(maxsize=None)
def cublas_unavailable_reason(device_index: int = 0) -> str | None:
    """None when blockwise `_scaled_mm` runs on this machine, else why not (probed once). The probe has
    K = 384 (3 K blocks), where the two 128×128 scale layouts torch has required differ; the one that
    this torch accepts is kept for every later call."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch._scaled_mm blockwise needs a Hopper GPU)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major != 9:
        return f"compute capability {major}.{minor}: blockwise _scaled_mm scaling is implemented for 9.x"
    device = torch.device("cuda", device_index)
    a = torch.zeros(256, 384, device=device, dtype=torch.float8_e4m3fn)
    a_s, b_s = torch.ones(256, 3, device=device), torch.ones(2, 3, device=device)
    errors = []
    for pad in (False, True):
        _LAYOUT["pad_128x128"] = pad
        try:
            _scaled(a, a_s, a, b_s, torch.bfloat16)
            return None
        except (RuntimeError, ValueError) as exc:  # no blockwise support (e.g. CUDA < 12.9), or not this layout
            errors.append(str(exc).splitlines()[0])
    _LAYOUT["pad_128x128"] = False
    return f"torch._scaled_mm rejected blockwise scales: {'; '.join(dict.fromkeys(errors))}"


def _scale_a(a_s: torch.Tensor) -> torch.Tensor:
    """[M, nbk] with strides (1, M): 1×128 scales, outer-dim (M) major."""
    return a_s.float().t().contiguous().t()


def _scale_b(b_s: torch.Tensor, n: int) -> torch.Tensor:
    """b_s [nbn, nbk] (128×128) or [N, nbk] (1×128) -> scale_b [nbk, nbn] or [nbk, N] as cuBLAS reads it."""
    if b_s.shape[0] == n:                                  # 1×128: scale_b.t() [N, nbk] N-major
        return b_s.float().t().contiguous()
    nbn, nbk = b_s.shape                                   # 128×128: scale_b.t() [nbn, nbk] row-major
    lead = -(-nbk // 4) * 4 if _LAYOUT["pad_128x128"] else nbk
    rows = b_s.float()
    if lead != nbk or rows.stride() != (nbk, 1):
        rows = torch.zeros(nbn, lead, device=b_s.device, dtype=torch.float32)
        rows[:, :nbk] = b_s
    return rows[:, :nbk].t()


def _scaled(a, a_s, b, b_s, out_dtype):
    """a [M, K] fp8, a_s [M, nbk]; b [N, K] fp8, b_s [nbn or N, nbk] -> [M, N]."""
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=_scale_a(a_s),
                            scale_b=_scale_b(b_s, b.shape[0]), out_dtype=out_dtype)


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
