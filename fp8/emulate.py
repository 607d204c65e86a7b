"""The reference FP8 GEMMs in torch: what the GPU kernels compute, up to FP32 summation order.

Per 128-wide K block j the FP8 operands are multiplied exactly (E4M3 products fit in FP32) and summed
in FP32, then the partial product is promoted into an FP32 accumulator with both dequant scales:

    acc += (a_q[:, Kj] @ b_q[:, Kj].T) * a_s[:, j] * b_s[:, j]

which is the DeepSeek-V3 recipe (promotion every N_C = 128 elements) and the order of operations of the
Triton kernels (`twinpipe.fp8.triton_gemm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# partial products held at once by the emulation ([nbk, rows, N] fp32): 64 MiB
_EMULATE_CHUNK_ELEMENTS = 1 << 24


def b_scales_are_per_row(b_s: torch.Tensor, n: int, num_k_blocks: int, block_size: int) -> bool:
    """Whether the scales of b [N, K] are per 1×128 tile ([N, nbk], activations as in Wgrad) rather
    than per 128×128 block ([ceil(N/bs), nbk], weights); both describe the same thing when N == 1."""
    if b_s.dim() != 2 or b_s.shape[1] != num_k_blocks:
        raise ValueError(f"b_s shape {tuple(b_s.shape)}: expected [ceil(N/{block_size}), {num_k_blocks}] "
                         f"or [N={n}, {num_k_blocks}]")
    if b_s.shape[0] == n:
        return True
    if b_s.shape[0] == math.ceil(n / block_size):
        return False
    raise ValueError(f"b_s shape {tuple(b_s.shape)}: first dim must be N={n} (1x{block_size} tiles) or "
                     f"ceil(N/{block_size})={math.ceil(n / block_size)} ({block_size}x{block_size} blocks)")


def b_scales_per_row(b_s: torch.Tensor, n: int, num_k_blocks: int, block_size: int) -> torch.Tensor:
    """Scales of b [N, K] as one row per output column: [N, nbk]."""
    if b_scales_are_per_row(b_s, n, num_k_blocks, block_size):
        return b_s.float()
    return b_s.float().repeat_interleave(block_size, dim=0)[:n]


def check_gemm_operands(a, a_s, b, b_s, block_size):
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_gemm: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"fp8_gemm: a [..., K] and b [N, K] must share K, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    nbk = math.ceil(a.shape[-1] / block_size)
    if tuple(a_s.shape) != (*a.shape[:-1], nbk):
        raise ValueError(f"fp8_gemm: a_s shape {tuple(a_s.shape)} does not match a {tuple(a.shape)}; "
                         f"expected {(*a.shape[:-1], nbk)}")
    return nbk


def emulate_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: torch.dtype, block_size: int = 128) -> torch.Tensor:
    """a [..., K] fp8, a_s [..., nbk]; b [N, K] fp8, b_s [ceil(N/bs) or N, nbk] -> a @ b.T [..., N]."""
    nbk = check_gemm_operands(a, a_s, b, b_s, block_size)
    k, n = a.shape[-1], b.shape[0]
    pad = nbk * block_size - k
    a2 = a.reshape(-1, k)                                              # [M, K]
    m = a2.shape[0]
    as2 = a_s.reshape(-1, nbk).float()                                 # [M, nbk]
    bs_rows = b_scales_per_row(b_s, n, nbk, block_size)                # [N, nbk]
    b_blocks = _pad_k(b.float(), pad).view(n, nbk, block_size).permute(1, 2, 0)  # [nbk, bs, N]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)         # [M, N]
    rows = max(1, _EMULATE_CHUNK_ELEMENTS // max(1, nbk * n))          # bounds the [nbk, rows, N] partials
    with torch.autocast(a.device.type, enabled=False):                 # FP32 products, even under autocast
        _emulate_rows(a2, as2, b_blocks, bs_rows, out, rows, nbk, pad, block_size)
    return out.reshape(*a.shape[:-1], n)


def _pad_k(t: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(t, (0, pad)) if pad else t


def _emulate_rows(a2, as2, b_blocks, bs_rows, out, rows, nbk, pad, block_size):
    m = a2.shape[0]
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        a_blocks = _pad_k(a2[r0:r1].float(), pad).view(r1 - r0, nbk, block_size).transpose(0, 1)
        parts = torch.bmm(a_blocks, b_blocks)                          # [nbk, rows, N]: exact products, FP32 sums
        parts = parts * as2[r0:r1].T[:, :, None] * bs_rows.T[:, None, :]
        acc = parts[0].clone()                                         # promotion, one K block at a time
        for j in range(1, nbk):
            acc += parts[j]
        out[r0:r1] = acc.to(out.dtype)


def segment_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] per group from offsets [E + 1] (offsets[0] = 0, offsets[-1] = M)."""
    o = offsets.tolist()
    return list(zip(o[:-1], o[1:]))


def check_grouped_operands(a, b, b_s, offsets, block_size):
    if b.dim() != 3:
        raise ValueError(f"fp8_grouped_gemm: b must be [E, N, K], got {tuple(b.shape)}")
    e, n, k = b.shape
    expected = (e, math.ceil(n / block_size), math.ceil(k / block_size))
    if tuple(b_s.shape) != expected:
        raise ValueError(f"fp8_grouped_gemm: b_s shape {tuple(b_s.shape)}, expected {expected}")
    if offsets.shape != (e + 1,):
        raise ValueError(f"fp8_grouped_gemm: offsets shape {tuple(offsets.shape)}, expected ({e + 1},)")
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"fp8_grouped_gemm: a must be [M, K={k}], got {tuple(a.shape)}")


def emulate_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                         offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                         ) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of a [M, K] times b[e].T: out [M, N] (contiguous expert segments).

    All experts in one batched product over segments padded to the longest one (the padding rows are
    zeros and are dropped); a per-expert loop when that padded product would be too large.
    """
    check_grouped_operands(a, b, b_s, offsets, block_size)
    e, n, k = b.shape
    m, nbk = a.shape[0], math.ceil(k / block_size)
    offsets = offsets.to(device=a.device, dtype=torch.long)
    counts = offsets.diff()                                                     # [E]
    c_max = int(counts.max()) if m else 0
    if m == 0 or e * nbk * c_max * n > 4 * _EMULATE_CHUNK_ELEMENTS:
        out = torch.zeros(m, n, dtype=out_dtype, device=a.device)               # [M, N]
        for g, (lo, hi) in enumerate(segment_bounds(offsets)):
            if hi > lo:
                out[lo:hi] = emulate_gemm(a[lo:hi], a_s[lo:hi], b[g], b_s[g], out_dtype, block_size)
        return out
    expert = torch.repeat_interleave(torch.arange(e, device=a.device), counts)  # [M]
    row = torch.arange(m, device=a.device) - offsets[:-1][expert]               # [M]
    a_pad = torch.zeros(e, c_max, nbk * block_size, device=a.device)            # [E, C, nbk*bs]
    a_pad[expert, row, :k] = a.float()
    s_pad = torch.zeros(e, c_max, nbk, device=a.device)                         # [E, C, nbk]
    s_pad[expert, row] = a_s.float()
    bs_rows = b_s.float().repeat_interleave(block_size, dim=1)[:, :n]           # [E, N, nbk]
    with torch.autocast(a.device.type, enabled=False):
        a_blocks = a_pad.view(e, c_max, nbk, block_size).transpose(1, 2)        # [E, nbk, C, bs]
        b_blocks = _pad_k(b.float(), nbk * block_size - k).view(e, n, nbk, block_size).permute(0, 2, 3, 1)
        parts = torch.matmul(a_blocks, b_blocks)                                # [E, nbk, C, N]
        parts = parts * s_pad.transpose(1, 2)[..., None] * bs_rows.transpose(1, 2)[:, :, None, :]
        acc = parts[:, 0].clone()                                               # [E, C, N]
        for j in range(1, nbk):
            acc += parts[:, j]
    return acc[expert, row].to(out_dtype)


def check_k_grouped_operands(a, a_s, b, b_s, offsets, block_size):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_k_grouped_gemm: a [M, L] and b [N, L] must share L, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    nbl = math.ceil(a.shape[1] / block_size)
    if tuple(a_s.shape) != (a.shape[0], nbl) or tuple(b_s.shape) != (b.shape[0], nbl):
        raise ValueError(f"fp8_k_grouped_gemm: scales {tuple(a_s.shape)}, {tuple(b_s.shape)}; expected "
                         f"{(a.shape[0], nbl)} and {(b.shape[0], nbl)} (1x{block_size} along L)")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"fp8_k_grouped_gemm: offsets must be [G + 1], got shape {tuple(offsets.shape)}")


def k_grouped_by_segments(gemm, a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                          offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                          ) -> torch.Tensor:
    """out[g] = gemm(a[:, seg g], b[:, seg g]) over 128-aligned segments of L: [G, M, N] (expert Wgrad),
    one `gemm(a, a_s, b, b_s, out_dtype, block_size)` call per non-empty segment."""
    check_k_grouped_operands(a, a_s, b, b_s, offsets, block_size)
    bounds = segment_bounds(offsets)
    out = torch.zeros(len(bounds), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)  # [G, M, N]
    for g, (lo, hi) in enumerate(bounds):
        if lo % block_size or (hi % block_size and hi != a.shape[1]):
            raise ValueError(f"fp8_k_grouped_gemm: segment {g} = [{lo}, {hi}) is not {block_size}-aligned")
        if hi > lo:
            blocks = slice(lo // block_size, math.ceil(hi / block_size))
            out[g] = gemm(a[:, lo:hi], a_s[:, blocks], b[:, lo:hi], b_s[:, blocks], out_dtype, block_size)
    return out


def emulate_k_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                           offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128
                           ) -> torch.Tensor:
    """out[g] = a[:, seg g] @ b[:, seg g].T over 128-aligned segments of L: [G, M, N] (expert Wgrad)."""
    return k_grouped_by_segments(emulate_gemm, a, a_s, b, b_s, offsets, out_dtype, block_size)
