"""The scales twinpipe.fp8.cublas passes to `torch._scaled_mm`, checked without a GPU.

torch's meta kernel for `_scaled_mm` (torch/_meta_registrations.py) checks operand majorness, the
multiples of 16 and the scales' shapes, but not the scales' strides, which only the CUDA kernel checks
(aten/src/ATen/native/cuda/ScaledBlas.cpp, `get_joint_scaling`: scale_a against a, scale_b.t() against
b.t(); `is_blockwise_1x128_scaling`, `is_blockwise_128x128_scaling`). `_torch_cuda_accepts` below
restates those two stride rules; the 128×128 one in two versions: leading stride ceil(K/128) (torch's
main branch) or that rounded up to 4 (the Blas.cpp of torch 2.9). Each call is then made on meta
tensors, so torch's own shape checks run too.
"""

import pytest
import torch

from twinpipe.fp8 import cublas


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size_stride(scale: torch.Tensor, dim: int, size: int, stride: int) -> bool:
    # ScaledBlas.cpp's check_size_stride: a dimension of size <= 1 may have any stride
    return scale.size(dim) == size and (size <= 1 or scale.stride(dim) == stride)


def _blockwise_1x128(t: torch.Tensor, scale: torch.Tensor) -> bool:
    return (scale.dtype == torch.float32 and scale.dim() == 2 and _size_stride(scale, 0, t.size(0), 1)
            and _size_stride(scale, 1, _cdiv(t.size(1), 128), t.size(0)))


def _blockwise_128x128(t: torch.Tensor, scale: torch.Tensor, padded: bool) -> bool:
    nbk = _cdiv(t.size(1), 128)
    lead = _cdiv(nbk, 4) * 4 if padded else nbk
    return (scale.dtype == torch.float32 and scale.dim() == 2
            and _size_stride(scale, 0, _cdiv(t.size(0), 128), lead) and _size_stride(scale, 1, nbk, 1))


def _torch_cuda_accepts(mat1, mat2, scale_a, scale_b, padded: bool) -> str | None:
    """The blockwise pair torch's CUDA `_scaled_mm` picks for these operands, or None (it would raise
    'Invalid scaling configuration')."""
    a_ok = _blockwise_1x128(mat1, scale_a)
    if a_ok and _blockwise_128x128(mat2.t(), scale_b.t(), padded):
        return "1x128,128x128"
    if a_ok and _blockwise_1x128(mat2.t(), scale_b.t()):
        return "1x128,1x128"
    return None


# (M, N, K): DeepSeek-V3's dense shapes, the suite's odd ones, the `small` preset's q_b projection
# forward (K = q_lora_rank 384: 3 K blocks, where the two 128×128 stride rules differ) and Dgrad, and
# its kv_a Dgrad (K = 288, not a multiple of 128)
SHAPES = [(4096, 7168, 2048), (4096, 4096, 7168), (4096, 7168, 16384), (4096, 24576, 1536), (4096, 2112, 7168),
          (1000, 2112, 7168), (4095, 576, 1536), (77, 208, 288), (8192, 1536, 384), (8192, 384, 1536),
          (8192, 1024, 288), (77, 256, 128)]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("per_row", [False, True], ids=["128x128", "1x128-wgrad"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_scales_pass_torch_scaled_mm_checks(monkeypatch, m, n, k, per_row, padded):
    monkeypatch.setitem(cublas._LAYOUT, "pad_128x128", padded)
    seen = {}
    real = torch._scaled_mm

    def checked(mat1, mat2, scale_a, scale_b, out_dtype):
        seen["pair"] = _torch_cuda_accepts(mat1, mat2, scale_a, scale_b, padded)
        return real(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)   # the meta checks

    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, scale_a, scale_b, out_dtype: checked(a, b, scale_a,
                                                                                                scale_b, out_dtype))
    f8 = torch.float8_e4m3fn
    a, b = torch.empty(m, k, dtype=f8, device="meta"), torch.empty(n, k, dtype=f8, device="meta")
    a_s = torch.empty(m, _cdiv(k, 128), device="meta")
    b_s = torch.empty(n if per_row else _cdiv(n, 128), _cdiv(k, 128), device="meta")
    out = cublas._scaled(a, a_s, b, b_s, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert seen["pair"] == ("1x128,1x128" if per_row else "1x128,128x128")


def test_the_stride_rules_tell_layouts_apart():
    """The restated rules are not vacuous: the 128×128 scale_b that cublas passed before (the contiguous
    [nbk, nbn] transpose, so scale_b.t() was column-major) fails both versions, and the unpadded layout
    fails the padded rule where ceil(K/128) % 4 != 0 (and passes it where it is 0)."""
    f8 = torch.float8_e4m3fn
    for k, unpadded_passes_padded_rule in ((384, False), (512, True)):
        mat1 = torch.empty(256, k, dtype=f8)
        mat2 = torch.empty(256, k, dtype=f8).t()
        scale_a = torch.ones(k // 128, 256).t()                         # [M, nbk], strides (1, M)
        b_s = torch.ones(2, k // 128)                                   # [nbn, nbk]
        before = b_s.t().contiguous()                                   # strides (nbn, 1)
        assert not _torch_cuda_accepts(mat1, mat2, scale_a, before, padded=False)
        assert not _torch_cuda_accepts(mat1, mat2, scale_a, before, padded=True)
        assert _torch_cuda_accepts(mat1, mat2, scale_a, b_s.t(), padded=False) == "1x128,128x128"
        assert bool(_torch_cuda_accepts(mat1, mat2, scale_a, b_s.t(), padded=True)) == unpadded_passes_padded_rule
        # the 1×128 scale_a must be M-major: a contiguous [M, nbk] one is refused (nbk > 1)
        assert not _torch_cuda_accepts(mat1, mat2, scale_a.contiguous(), b_s.t(), padded=False)
