"""The Triton FP8 kernels index with int32 (row * stride + column): their wrappers refuse a tensor whose
largest offset reaches 2^31 instead of launching a kernel that would address memory out of bounds.
Meta tensors: nothing is allocated."""

import pytest
import torch

from twinpipe.fp8.triton_gemm import triton_gemm, triton_grouped_gemm, triton_k_grouped_gemm
from twinpipe.fp8.triton_quant import check_int32_offsets, triton_act_quant, triton_weight_quant

F32 = torch.float32


def _meta(*shape, dtype=torch.float8_e4m3fn):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_wrappers_refuse_offsets_past_int32():
    rows, k = 2**16, 2**15                                     # 2^31 elements
    with pytest.raises(ValueError, match=r"triton_act_quant: .* spans 2147483648 >= 2\^31"):
        triton_act_quant(_meta(rows, k, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="triton_weight_quant"):
        triton_weight_quant(_meta(2, rows // 2, k, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="triton_gemm"):
        triton_gemm(_meta(rows, k), _meta(rows, k // 128, dtype=F32), _meta(256, k), _meta(2, k // 128, dtype=F32),
                    torch.bfloat16)
    with pytest.raises(ValueError, match="triton_grouped_gemm"):           # the output [M, N]
        triton_grouped_gemm(_meta(rows, 128), _meta(rows, 1, dtype=F32), _meta(1, k, 128),
                            _meta(1, k // 128, 1, dtype=F32), torch.tensor([0, rows]), torch.bfloat16)
    with pytest.raises(ValueError, match="triton_k_grouped_gemm"):         # the output [G, M, N]
        triton_k_grouped_gemm(_meta(2**15, 256), _meta(2**15, 2, dtype=F32), _meta(2**15, 256),
                              _meta(2**15, 2, dtype=F32), torch.tensor([0, 128, 256]), F32)


def test_offsets_count_strides_not_elements():
    check_int32_offsets("k", _meta(2, 2**30)[:, :1])            # 2 elements, largest offset 2^30
    with pytest.raises(ValueError, match="spans 2147483649"):
        check_int32_offsets("k", _meta(3, 2**30)[:, :1])        # 3 elements, largest offset 2^31
    check_int32_offsets("k", _meta(73736, 7168))                # the GPU suite's largest operand
