"""Triton kernels for 1×128 activation and 128×128 weight quantization.

Operation for operation the arithmetic of `twinpipe.model.fp8_format` and `twinpipe.fp8.quant`
(correctly rounded divisions via `div_rn`, the same clamp and scale floor), so the results are
bit-identical to the torch reference.

Triton's CPU interpreter (`TRITON_INTERPRET=1`) rounds the fp32 -> e4m3 cast wrongly when rounding
carries into the exponent; with `EXACT_CAST` the value is first rounded to the E4M3 grid in fp32 (so the
cast itself is exact). On a GPU the hardware conversion (round-to-nearest-even, saturating) is used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from twinpipe.model.fp8_format import AMAX_FLOOR

FP8_MAX = 448.0


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_int32_offsets(kernel: str, *tensors: torch.Tensor) -> None:
    """The kernels form element offsets as int32 products (row * stride + column), correct while the
    largest offset into every tensor they address is below 2^31; past that they would read and write
    out of bounds (DeepSeek-V3's shapes stay below 2^30: 73,736 rows x 7168 at most in the GPU suite)."""
    for t in tensors:
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1 if t.numel() else 0
        if extent >= 2**31:
            raise ValueError(f"{kernel}: a tensor of shape {tuple(t.shape)} and strides {t.stride()} spans "
                             f"{extent} >= 2^31 elements, past the kernels' int32 offsets; split the call")


@triton.jit
def _round_scale_pow2(s):
    bits = s.to(tl.int32, bitcast=True)
    exponent = bits & 0x7F800000
    rounded = tl.where((bits & 0x007FFFFF) != 0, exponent + 0x00800000, exponent)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(y):
    """Round |y| <= 448 to the nearest E4M3 value (ties to even), sign kept, result still fp32."""
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648                                   # 0x80000000
    mag = tl.abs(y)
    exponent = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.maximum(exponent, 121)                        # below 2^-6: subnormal spacing 2^-9
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # spacing of 3 mantissa bits
    # 1.5 * 2^23: adding then subtracting rounds to an integer, ties to even (|mag / step| < 16)
    units = (tl.math.div_rn(mag, step) + 12582912.0) - 12582912.0
    rounded = (units * step).to(tl.int32, bitcast=True)
    return (rounded | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize(x, s, EXACT_CAST: tl.constexpr):
    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if EXACT_CAST:
        y = _round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, amax_floor,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, POW2: tl.constexpr,
                      EXACT_CAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)                    # [ROWS]
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)                  # [BLOCK]
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)                                        # [ROWS, BLOCK]
    amax = tl.max(tl.abs(x), axis=1)                            # [ROWS]
    s = tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)
    if POW2:
        s = _round_scale_pow2(s)
    q = _quantize(x, s[:, None], EXACT_CAST)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + pid_k, s, mask=rows < M)


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_qe, stride_qn,
                         stride_se, stride_sn, BLOCK: tl.constexpr, POW2: tl.constexpr,
                         EXACT_CAST: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_e = tl.program_id(2)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + pid_e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)                                        # [BLOCK, BLOCK]
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if POW2:
        s = _round_scale_pow2(s)
    q = _quantize(w, s, EXACT_CAST)
    tl.store(q_ptr + pid_e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
    tl.store(s_ptr + pid_e * stride_se + pid_n * stride_sn + pid_k, s)


def triton_act_quant(x: torch.Tensor, block_size: int = 128, pow2: bool = False,
                     amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `twinpipe.fp8.quant.act_quant`: x [..., K] -> q [..., K], s [..., ceil(K/bs)]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    nbk = math.ceil(k / block_size)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)   # [M, K]
    s = torch.empty(m, nbk, dtype=torch.float32, device=x.device)       # [M, nbk]
    check_int32_offsets("triton_act_quant", x2)
    rows = 64 if interpreting() else 8     # the interpreter pays per program, not per element
    if m > 0 and k > 0:
        _act_quant_kernel[(triton.cdiv(m, rows), nbk)](
            x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0), float(amax_floor),
            BLOCK=block_size, ROWS=rows, POW2=pow2, EXACT_CAST=interpreting(), num_warps=4)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], nbk)


def triton_weight_quant(w: torch.Tensor, block_size: int = 128, pow2: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `twinpipe.model.fp8_format.weight_quant`: w [..., N, K] -> q, s [..., nbn, nbk]."""
    n, k = w.shape[-2:]
    w3 = w.reshape(-1, n, k)
    if w3.stride(-1) != 1:
        w3 = w3.contiguous()
    e = w3.shape[0]
    nbn, nbk = math.ceil(n / block_size), math.ceil(k / block_size)
    q = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=w.device)    # [E, N, K]
    s = torch.empty(e, nbn, nbk, dtype=torch.float32, device=w.device)      # [E, nbn, nbk]
    check_int32_offsets("triton_weight_quant", w3)
    if e > 0 and n > 0 and k > 0:
        _weight_quant_kernel[(nbn, nbk, e)](
            w3, q, s, n, k, w3.stride(0), w3.stride(1), q.stride(0), q.stride(1), s.stride(0),
            s.stride(1), BLOCK=block_size, POW2=pow2, EXACT_CAST=interpreting(), num_warps=8)
    return q.reshape(w.shape), s.reshape(*w.shape[:-2], nbn, nbk)
