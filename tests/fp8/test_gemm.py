"""Block-scaled FP8 GEMMs: emulation against FP32 references, Triton (interpreted) against emulation,
backend selection and errors."""

import logging

import pytest
import torch

from twinpipe.fp8 import act_dequant, act_quant, fp8_gemm, fp8_grouped_gemm, get_backend, weight_dequant, weight_quant
from twinpipe.fp8.emulate import emulate_gemm, emulate_grouped_gemm

EPS32 = 2.0 ** -24


def _operands(m, n, k, seed=0, b_per_row=False):
    g = torch.Generator().manual_seed(seed)
    a, a_s = act_quant(torch.randn(m, k, generator=g))
    b_float = torch.randn(n, k, generator=g)
    b, b_s = act_quant(b_float) if b_per_row else weight_quant(b_float)
    return a, a_s, b, b_s


def _dequant_b(b, b_s):
    return act_dequant(b, b_s) if b_s.shape[0] == b.shape[0] else weight_dequant(b, b_s)


def _reorder_bound(a, a_s, b, b_s):
    """Any two FP32 summation orders of the K products differ by at most ~2·K·eps32·sum|a_k b_k|
    (Higham's gamma_K bound for each order, added); the products themselves are exact."""
    k = a.shape[-1]
    abs_prod = act_dequant(a, a_s).double().abs() @ _dequant_b(b, b_s).double().abs().T
    return (2 * (k + 2) * EPS32 * abs_prod).float()


@pytest.mark.parametrize("m,n,k,per_row", [(64, 128, 128, False), (70, 200, 300, False),
                                           (33, 130, 384, True), (1, 1, 5, False)])
def test_emulate_equals_fp64_product_of_dequantized_operands(m, n, k, per_row):
    a, a_s, b, b_s = _operands(m, n, k, b_per_row=per_row)
    out = emulate_gemm(a, a_s, b, b_s, torch.float32)
    ref = act_dequant(a, a_s).double() @ _dequant_b(b, b_s).double().T
    assert out.shape == (m, n)
    assert torch.all((out.double() - ref).abs() <= _reorder_bound(a, a_s, b, b_s))


def test_emulate_close_to_unquantized_fp32_matmul():
    torch.manual_seed(1)
    x, w = torch.randn(96, 384), torch.randn(256, 384)
    out = fp8_gemm(*act_quant(x), *weight_quant(w), out_dtype=torch.float32, backend="emulate")
    ref = x @ w.T
    # each operand carries <= 2^-4 relative rounding error (3 mantissa bits), about 2^-4/sqrt(3)
    # RMS for uniform rounding; for independent operands the product's relative Frobenius error is
    # ~sqrt(2)·3.6% ≈ 5%. Measured 3.0-3.6%; 5% leaves room without hiding a wrong scale (>= 100%).
    assert (out - ref).norm() / ref.norm() < 0.05


def test_leading_dims_and_out_dtype():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    q, s = act_quant(x)
    b, b_s = weight_quant(torch.randn(128, 256))
    out = fp8_gemm(q, s, b, b_s, out_dtype=torch.bfloat16, backend="emulate")
    assert out.shape == (2, 3, 128) and out.dtype == torch.bfloat16
    flat = fp8_gemm(q.reshape(6, 256), s.reshape(6, 2), b, b_s, out_dtype=torch.bfloat16, backend="emulate")
    torch.testing.assert_close(out.reshape(6, 128), flat, rtol=0, atol=0)


def test_bad_operands_are_named():
    a, a_s, b, b_s = _operands(8, 256, 256)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        emulate_gemm(a.float(), a_s, b, b_s, torch.float32)
    with pytest.raises(ValueError, match="b_s shape"):
        emulate_gemm(a, a_s, b, b_s[:1], torch.float32)
    with pytest.raises(ValueError, match="a_s shape"):
        emulate_gemm(a, a_s[:, :1], b, b_s, torch.float32)
    with pytest.raises(ValueError, match="backend 'nope'"):
        fp8_gemm(a, a_s, b, b_s, backend="nope")


def test_grouped_emulate_matches_per_expert_dense():
    a, a_s, _, _ = _operands(50, 1, 300, seed=3)
    w, w_s = weight_quant(torch.randn(4, 200, 300))
    offsets = torch.tensor([0, 0, 17, 18, 50])
    out = fp8_grouped_gemm(a, a_s, w, w_s, offsets, out_dtype=torch.float32, backend="emulate")
    for e, (lo, hi) in enumerate([(0, 0), (0, 17), (17, 18), (18, 50)]):
        dense = emulate_gemm(a[lo:hi], a_s[lo:hi], w[e], w_s[e], torch.float32)
        # one batched product over padded segments vs one product per expert: BLAS may sum a block's
        # 128 products in another order
        assert torch.all((out[lo:hi] - dense).abs() <= _reorder_bound(a[lo:hi], a_s[lo:hi], w[e], w_s[e]))


def test_cublas_refuses_clearly_without_a_hopper_gpu():
    a, a_s, b, b_s = _operands(16, 128, 128)
    with pytest.raises(RuntimeError, match="fp8 backend 'cublas' is not available"):
        fp8_gemm(a, a_s, b, b_s, backend="cublas")


def test_auto_on_cpu_is_emulate_with_one_log_line(caplog):
    from twinpipe.fp8 import backend as backend_mod
    backend_mod._auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="twinpipe.fp8.backend"):
        assert get_backend("auto", "cpu").name == "emulate"
        assert get_backend("auto", "cpu").name == "emulate"
    assert len([r for r in caplog.records if "auto -> emulate" in r.message]) == 1


# ---- Triton kernels under TRITON_INTERPRET=1 (tests/fp8/conftest.py) -------------------------------

@pytest.mark.parametrize("m,n,k,per_row,use_tma", [(70, 200, 300, False, False), (70, 200, 300, False, True),
                                                   (40, 130, 384, True, False)])
def test_triton_gemm_equals_emulate(m, n, k, per_row, use_tma):
    from twinpipe.fp8.triton_gemm import triton_gemm
    a, a_s, b, b_s = _operands(m, n, k, seed=4, b_per_row=per_row)
    ref = emulate_gemm(a, a_s, b, b_s, torch.float32)
    out = triton_gemm(a, a_s, b, b_s, torch.float32, use_tma=use_tma)
    # same products, same per-block scale promotion; only the FP32 order inside a block differs
    assert torch.all((out - ref).abs() <= _reorder_bound(a, a_s, b, b_s))
    out16 = triton_gemm(a, a_s, b, b_s, torch.bfloat16, use_tma=use_tma)
    # rounding to bf16 after a reordered sum: at most one bf16 step (2^-8 relative) apart
    assert torch.all((out16.float() - ref).abs() <= ref.abs() * 2.0 ** -7 + _reorder_bound(a, a_s, b, b_s))


def test_triton_grouped_gemm_equals_emulate_with_empty_and_tiny_groups():
    from twinpipe.fp8.triton_gemm import triton_grouped_gemm
    a, a_s, _, _ = _operands(45, 1, 300, seed=5)
    w, w_s = weight_quant(torch.randn(4, 130, 300))
    offsets = torch.tensor([0, 0, 1, 34, 45])
    ref = emulate_grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    out = triton_grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    bound = torch.cat([_reorder_bound(a[lo:hi], a_s[lo:hi], w[e], w_s[e])
                       for e, (lo, hi) in enumerate([(0, 0), (0, 1), (1, 34), (34, 45)])])
    assert torch.all((out - ref).abs() <= bound)


def test_emulation_ignores_autocast():
    a, a_s, b, b_s = _operands(32, 256, 384, seed=6)
    plain = emulate_gemm(a, a_s, b, b_s, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = emulate_gemm(a, a_s, b, b_s, torch.float32)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


def test_grouped_emulate_per_expert_fallback_agrees(monkeypatch):
    from twinpipe.fp8 import emulate
    a, a_s, _, _ = _operands(50, 1, 300, seed=7)
    w, w_s = weight_quant(torch.randn(3, 140, 300))
    offsets = torch.tensor([0, 20, 20, 50])
    batched = emulate_grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    monkeypatch.setattr(emulate, "_EMULATE_CHUNK_ELEMENTS", 1)      # force the per-expert loop
    looped = emulate_grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    bound = torch.cat([_reorder_bound(a[lo:hi], a_s[lo:hi], w[e], w_s[e])
                       for e, (lo, hi) in enumerate([(0, 20), (20, 20), (20, 50)])])
    assert torch.all((batched - looped).abs() <= bound)


@pytest.mark.parametrize("m,n,k,per_row", [(256, 384, 512, False), (100, 256, 384, False), (256, 384, 512, True)])
def test_cublas_operands_pass_torch_scaled_mm_layout_checks(m, n, k, per_row):
    """Without a GPU, torch's meta kernel still checks the operand/scale shapes and majorness that the
    blockwise cuBLAS path requires (1×128 × 128×128 for Fprop/Dgrad, 1×128 × 1×128 for Wgrad)."""
    from twinpipe.fp8.cublas import _scaled
    f8 = torch.float8_e4m3fn
    a, b = torch.empty(m, k, dtype=f8, device="meta"), torch.empty(n, k, dtype=f8, device="meta")
    a_s = torch.empty(m, -(-k // 128), device="meta")
    b_s = torch.empty(n if per_row else -(-n // 128), -(-k // 128), device="meta")
    out = _scaled(a, a_s, b, b_s, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16


def _k_grouped_operands():
    g = torch.Generator().manual_seed(8)
    offsets = torch.tensor([0, 128, 128, 384, 512])          # one empty group, 128-aligned segments
    a, a_s = act_quant(torch.randn(130, 512, generator=g))   # [M, L]
    b, b_s = act_quant(torch.randn(70, 512, generator=g))    # [N, L]
    return a, a_s, b, b_s, offsets


def test_k_grouped_emulate_reduces_each_segment():
    from twinpipe.fp8.emulate import emulate_k_grouped_gemm
    a, a_s, b, b_s, offsets = _k_grouped_operands()
    out = emulate_k_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32)
    assert out.shape == (4, 130, 70) and torch.all(out[1] == 0)
    for g, (lo, hi) in enumerate([(0, 128), (128, 128), (128, 384), (384, 512)]):
        ref = act_dequant(a, a_s)[:, lo:hi].double() @ act_dequant(b, b_s)[:, lo:hi].double().T
        bound = _reorder_bound(a[:, lo:hi], a_s[:, lo // 128:hi // 128], b[:, lo:hi], b_s[:, lo // 128:hi // 128])
        assert torch.all((out[g].double() - ref).abs() <= bound)
    with pytest.raises(ValueError, match="not 128-aligned"):
        emulate_k_grouped_gemm(a, a_s, b, b_s, torch.tensor([0, 100, 512]), torch.float32)


def test_triton_k_grouped_gemm_equals_emulate():
    from twinpipe.fp8.emulate import emulate_k_grouped_gemm
    from twinpipe.fp8.triton_gemm import triton_k_grouped_gemm
    a, a_s, b, b_s, offsets = _k_grouped_operands()
    ref = emulate_k_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32)
    out = triton_k_grouped_gemm(a, a_s, b, b_s, offsets, torch.float32)
    bound = _reorder_bound(a, a_s, b, b_s)       # covers every segment's partial sums
    assert torch.all((out - ref).abs() <= bound)
