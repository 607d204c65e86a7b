"""Triton FP8 GEMMs with per-K-block scale promotion: dense (NT) and grouped over expert segments.

Both compute, per output tile, `acc += dot(a_q[:, Kj], b_q[:, Kj].T) * a_s[:, j] * b_s[:, j]` for every
128-wide K block j: the FP8 tensor-core dot covers exactly one scale block and its FP32 result is
promoted into an FP32 accumulator (DeepSeek-V3 §3.3, N_C = 128), the order of `twinpipe.fp8.emulate`.

Written for Hopper: persistent kernels (one program per SM walking the tiles, grouped tile order for L2
reuse), large autotuned tiles with software pipelining, and operand loads through TMA tensor
descriptors (`tl.make_tensor_descriptor`) when the layout allows it. Under `TRITON_INTERPRET=1` the
same kernels run on CPU with one small fixed configuration (autotuning there would only cost time).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from twinpipe.fp8.emulate import (b_scales_are_per_row, check_gemm_operands, check_grouped_operands,
                                  check_k_grouped_operands)
from twinpipe.fp8.triton_quant import check_int32_offsets, interpreting

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, s, w in [(128, 128, 4, 8), (128, 256, 3, 8), (256, 128, 3, 8), (64, 128, 4, 4),
                         (128, 128, 3, 4), (64, 256, 4, 8)]
]
log = logging.getLogger(__name__)
_TMA_STATE = {"ok": True}
_INTERPRETER_META = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 2}


@functools.lru_cache(maxsize=None)
def _num_programs(device_index: int) -> int:
    if interpreting():
        return 3
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _set_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)
    triton.set_allocator(alloc)


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-tile") order: GROUP_M row tiles share the B columns they load."""
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows_in_group
    pid_n = (tile_id % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _scaled_tile(a_ptr, as_ptr, b_ptr, bs_ptr, a_desc, b_desc, row0, row_end, col0, N, K,
                 stride_am, stride_asm, stride_bn, stride_bsn,
                 B_PER_ROW: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """FP32 [BLOCK_M, BLOCK_N] = sum_j dot(A rows, B rows over K block j) * a_s * b_s."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < row_end
    n_mask = offs_n < N
    if B_PER_ROW:
        bs_rows = offs_n
    else:
        bs_rows = offs_n // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kb * BLOCK_K
        if USE_TMA:
            a = a_desc.load([row0, k0])                                   # [BLOCK_M, BLOCK_K] fp8
            b = b_desc.load([col0, k0])                              # [BLOCK_N, BLOCK_K] fp8
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (k0 + offs_k)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=m_mask, other=0.0)      # [BLOCK_M]
        b_s = tl.load(bs_ptr + bs_rows * stride_bsn + kb, mask=n_mask, other=0.0)     # [BLOCK_N]
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm, NUM_PROGRAMS,
                     B_PER_ROW: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    a_desc = None
    b_desc = None
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = _scaled_tile(a_ptr, as_ptr, b_ptr, bs_ptr, a_desc, b_desc, pid_m * BLOCK_M, M, pid_n * BLOCK_N,
                           N, K, stride_am, stride_asm, stride_bn, stride_bsn,
                           B_PER_ROW, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, NUM_GROUPS, N, K,
                             stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn,
                             stride_cm, NUM_PROGRAMS,
                             BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             GROUP_M: tl.constexpr):
    """Persistent walk over (group, row tile, column tile); group g owns rows offsets[g]:offsets[g+1]."""
    tile_id = tl.program_id(0)
    tiles_before = tile_id * 0                       # tiles of the groups already passed
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for g in range(NUM_GROUPS):
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
        num_pid_m = tl.cdiv(end - start, BLOCK_M)
        group_tiles = num_pid_m * num_pid_n
        while tile_id < tiles_before + group_tiles:
            pid_m, pid_n = _tile_coords(tile_id - tiles_before, num_pid_m, num_pid_n, GROUP_M)
            row0 = start + pid_m * BLOCK_M
            acc = _scaled_tile(a_ptr, as_ptr, b_ptr + g * stride_be, bs_ptr + g * stride_bse, None, None,
                               row0, end, pid_n * BLOCK_N, N, K, stride_am, stride_asm, stride_bn, stride_bsn,
                               False, False, BLOCK_M, BLOCK_N, BLOCK_K)
            offs_m = row0 + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (offs_m[:, None] < end) & (offs_n[None, :] < N)
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :],
                     acc.to(c_ptr.dtype.element_ty), mask=mask)
            tile_id += NUM_PROGRAMS
        tiles_before += group_tiles


@triton.jit
def _fp8_k_grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offsets_ptr, NUM_GROUPS, M, N,
                               stride_am, stride_asm, stride_bn, stride_bsn, stride_ce, stride_cm,
                               NUM_PROGRAMS, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C[g] [M, N] = A[:, seg g] · B[:, seg g]ᵀ, the reduction running over group g's (128-aligned)
    column segment offsets[g]:offsets[g+1]; both operands scaled 1×128 along it (Wgrad of experts)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(tl.program_id(0), NUM_GROUPS * group_tiles, NUM_PROGRAMS):
        g = tile_id // group_tiles
        pid_m, pid_n = _tile_coords(tile_id % group_tiles, num_pid_m, num_pid_n, GROUP_M)
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
        kb0 = start // BLOCK_K
        acc = _scaled_tile(a_ptr + start, as_ptr + kb0, b_ptr + start, bs_ptr + kb0, None, None,
                           pid_m * BLOCK_M, M, pid_n * BLOCK_N, N, end - start,
                           stride_am, stride_asm, stride_bn, stride_bsn, True, False, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + g * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=mask)


_fp8_gemm_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "B_PER_ROW", "USE_TMA"])(_fp8_gemm_kernel)
_fp8_grouped_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"])(_fp8_grouped_gemm_kernel)
_fp8_k_grouped_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N"])(_fp8_k_grouped_gemm_kernel)


def _launch(kernel_plain, kernel_tuned, num_tiles_fn, device, *args, **kwargs):
    num_programs = _num_programs((device.index or 0) if device.type == "cuda" else 0)
    if interpreting():
        grid = (max(1, min(num_programs, num_tiles_fn(_INTERPRETER_META))),)
        kernel_plain[grid](*args, num_programs, **kwargs, **_INTERPRETER_META)
    else:
        def grid(meta):
            return (max(1, min(num_programs, num_tiles_fn(meta))),)
        kernel_tuned[grid](*args, num_programs, **kwargs)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype, block_size: int = 128, use_tma: bool | None = None
                ) -> torch.Tensor:
    """a [..., K] fp8, a_s [..., nbk]; b [N, K] fp8, b_s [ceil(N/128) or N, nbk] -> [..., N]."""
    nbk = check_gemm_operands(a, a_s, b, b_s, block_size)
    k, n = a.shape[-1], b.shape[0]
    b_per_row = b_scales_are_per_row(b_s, n, nbk, block_size)
    a2 = _rows_contiguous(a.reshape(-1, k))                  # [M, K]
    as2 = _rows_contiguous(a_s.reshape(-1, nbk).float())     # [M, nbk]
    b = _rows_contiguous(b)
    b_s = _rows_contiguous(b_s.float())
    m = a2.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)  # [M, N]
    auto_tma = use_tma is None
    if auto_tma:   # TMA needs Hopper or newer and 16-byte aligned rows; off after one failed compile
        use_tma = (_TMA_STATE["ok"] and not interpreting() and a.is_cuda
                   and torch.cuda.get_device_capability(a.device)[0] >= 9
                   and k % 16 == 0 and a2.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)
    check_int32_offsets("triton_gemm", a2, b, out)
    if m > 0 and n > 0:
        args = (a2, as2, b, b_s, out, m, n, k, a2.stride(0), as2.stride(0), b.stride(0), b_s.stride(0),
                out.stride(0))
        tiles = lambda meta: triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])  # noqa: E731
        try:
            if use_tma and not interpreting():
                _set_tma_allocator()   # inside the try: a Triton without set_allocator falls back below
            _launch(_fp8_gemm_kernel, _fp8_gemm_tuned, tiles, a.device, *args,
                    B_PER_ROW=b_per_row, USE_TMA=bool(use_tma), BLOCK_K=block_size)
        except Exception as exc:  # noqa: BLE001 - a Triton build without working TMA: pointer loads
            if not (auto_tma and use_tma):
                raise
            _TMA_STATE["ok"] = False
            log.warning("fp8 triton GEMM: TMA descriptors failed (%s); using pointer loads from now on",
                        str(exc).splitlines()[0][:200])
            _launch(_fp8_gemm_kernel, _fp8_gemm_tuned, tiles, a.device, *args,
                    B_PER_ROW=b_per_row, USE_TMA=False, BLOCK_K=block_size)
    return out.reshape(*a.shape[:-1], n)


def triton_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                        offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                        ) -> torch.Tensor:
    """a [M, K] rows grouped by offsets [E+1]; b [E, N, K], b_s [E, nbn, nbk] -> [M, N]."""
    check_grouped_operands(a, b, b_s, offsets, block_size)
    e, n, k = b.shape
    m = a.shape[0]
    a = _rows_contiguous(a)
    a_s = _rows_contiguous(a_s.float())
    b = b.contiguous()
    b_s = b_s.float().contiguous()
    offsets = offsets.to(device=a.device, dtype=torch.int32)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)   # [M, N]
    check_int32_offsets("triton_grouped_gemm", a, b, out)
    if m > 0 and n > 0:
        # upper bound on the tiles without reading the counts on the host: every group may end with a
        # partial row tile
        _launch(_fp8_grouped_gemm_kernel, _fp8_grouped_tuned,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"]),
                a.device, a, a_s, b, b_s, out, offsets, e, n, k, a.stride(0), a_s.stride(0),
                b.stride(0), b.stride(1), b_s.stride(0), b_s.stride(1), out.stride(0),
                BLOCK_K=block_size)
    return out


def triton_k_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                          offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                          ) -> torch.Tensor:
    """out[g] = a[:, seg g] @ b[:, seg g].T: a [M, L], b [N, L] fp8 with 1×128 scales along L
    ([M, L/128], [N, L/128]); offsets [G+1] multiples of block_size -> out [G, M, N]."""
    check_k_grouped_operands(a, a_s, b, b_s, offsets, block_size)
    m, n = a.shape[0], b.shape[0]
    num_groups = offsets.numel() - 1
    a, b = _rows_contiguous(a), _rows_contiguous(b)
    a_s, b_s = _rows_contiguous(a_s.float()), _rows_contiguous(b_s.float())
    offsets = offsets.to(device=a.device, dtype=torch.int32)
    out = torch.empty(num_groups, m, n, dtype=out_dtype, device=a.device)   # [G, M, N]
    check_int32_offsets("triton_k_grouped_gemm", a, b, out)
    if num_groups > 0 and m > 0 and n > 0:
        _launch(_fp8_k_grouped_gemm_kernel, _fp8_k_grouped_tuned,
                lambda meta: num_groups * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                a.device, a, a_s, b, b_s, out, offsets, num_groups, m, n, a.stride(0), a_s.stride(0),
                b.stride(0), b_s.stride(0), out.stride(0), out.stride(1), BLOCK_K=block_size)
    return out
