"""FP8 kernel backends behind one interface: emulate (torch), triton, cublas, auto.

A backend bundles the two quantizers and the two GEMMs. `auto` resolves once per device type to the
fastest available (on Hopper: cuBLAS blockwise for dense GEMMs whose K is a multiple of 128 and N of
16, our Triton kernels for the other dense GEMMs, grouped GEMMs and quantization; on other GPUs Triton;
on CPU emulation) and logs its choice in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import torch

from twinpipe.fp8 import emulate, quant
from twinpipe.model.fp8_format import weight_quant

log = logging.getLogger(__name__)

BACKENDS = ("emulate", "triton", "cublas", "auto")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    act_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]      # (x, block_size, pow2, amax_floor)
    weight_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]   # (w, block_size, pow2)
    gemm: Callable[..., torch.Tensor]            # (a, a_s, b, b_s, out_dtype, block_size)
    grouped_gemm: Callable[..., torch.Tensor]    # (a, a_s, b, b_s, offsets, out_dtype, block_size)
    k_grouped_gemm: Callable[..., torch.Tensor]  # (a, a_s, b, b_s, offsets, out_dtype, block_size)


def _emulate() -> Backend:
    return Backend("emulate", quant.act_quant, weight_quant, emulate.emulate_gemm,
                   emulate.emulate_grouped_gemm, emulate.emulate_k_grouped_gemm)


def _triton() -> Backend:
    from twinpipe.fp8 import triton_gemm, triton_quant
    return Backend("triton", triton_quant.triton_act_quant, triton_quant.triton_weight_quant,
                   triton_gemm.triton_gemm, triton_gemm.triton_grouped_gemm, triton_gemm.triton_k_grouped_gemm)


def _cublas() -> Backend:
    from twinpipe.fp8 import cublas
    return Backend("cublas", quant.act_quant, weight_quant, cublas.cublas_gemm,
                   cublas.cublas_grouped_gemm, cublas.cublas_k_grouped_gemm)


def cublas_or_triton(cublas_gemm: Callable[..., torch.Tensor], triton_gemm: Callable[..., torch.Tensor]
                     ) -> Callable[..., torch.Tensor]:
    """`auto`'s dense GEMM: cuBLAS where `_scaled_mm` takes the shape (N and K multiples of 16) and K is
    whole 128-blocks, Triton elsewhere. Wgrad's K is the token count, e.g. 4 x 2047 = 8188 rows in an
    MTP layer at sequence length 2048, which `_scaled_mm` refuses; whether cuBLAS's blockwise kernels
    take a partial last K block (K = 288: a kv_a Dgrad) is not established, so those go to Triton too."""
    def gemm(a, a_s, b, b_s, out_dtype, block_size=128):
        k, n = a.shape[-1], b.shape[0]
        use = cublas_gemm if k % 128 == 0 and n % 16 == 0 else triton_gemm
        return use(a, a_s, b, b_s, out_dtype, block_size)
    return gemm


@functools.lru_cache(maxsize=None)
def _auto(device_type: str) -> Backend:
    if device_type == "cuda":
        from twinpipe.fp8.cublas import cublas_unavailable_reason
        triton = _triton()
        reason = cublas_unavailable_reason(torch.cuda.current_device())
        if reason is None:
            # cuBLAS for dense GEMMs; cuBLAS has no blockwise grouped GEMM, so experts stay on Triton
            log.info("fp8 backend auto -> cublas dense GEMMs (K % 128 == 0, N % 16 == 0), triton for the "
                     "other dense GEMMs, grouped GEMMs and quantization")
            return Backend("auto:cublas+triton", triton.act_quant, triton.weight_quant,
                           cublas_or_triton(_cublas().gemm, triton.gemm), triton.grouped_gemm, triton.k_grouped_gemm)
        log.info("fp8 backend auto -> triton (cublas unavailable: %s)", reason)
        return triton
    log.info("fp8 backend auto -> emulate (tensors on %s; the FP8 kernels need a CUDA GPU)", device_type)
    return _emulate()


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """The backend called `name` (one of BACKENDS) for tensors on `device`."""
    if name == "emulate":
        return _emulate()
    if name == "triton":
        return _triton()
    if name == "cublas":
        return _cublas()
    if name == "auto":
        return _auto(torch.device(device).type)
    raise ValueError(f"fp8 backend {name!r}: allowed values are {', '.join(BACKENDS)}")


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype | None = None, backend: str = "auto", block_size: int = 128
             ) -> torch.Tensor:
    """a @ b.T with DeepSeek's semantics.

    a [..., K] float8_e4m3fn with 1×128 dequant scales a_s [..., ceil(K/128)] (fp32);
    b [N, K] float8_e4m3fn with 128×128 scales b_s [ceil(N/128), ceil(K/128)] (or 1×128 scales [N, ...]).
    Returns [..., N] in `out_dtype` (default: torch's default dtype). FP32 accumulation, scales applied
    per 128-wide K block.
    """
    out_dtype = out_dtype or torch.get_default_dtype()
    return get_backend(backend, a.device).gemm(a, a_s, b, b_s, out_dtype, block_size)


def fp8_grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype | None = None, backend: str = "auto",
                     block_size: int = 128) -> torch.Tensor:
    """Per contiguous segment e (rows offsets[e]:offsets[e+1] of a [M, K]): a_seg @ b[e].T -> [M, N]."""
    out_dtype = out_dtype or torch.get_default_dtype()
    return get_backend(backend, a.device).grouped_gemm(a, a_s, b, b_s, offsets, out_dtype, block_size)
