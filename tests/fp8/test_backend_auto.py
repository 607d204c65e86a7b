"""`auto`'s dense GEMM on a Hopper GPU: which shapes go to cuBLAS and which to Triton (cublas_or_triton).
The small preset's FP8 training step at batch 4 x 2048 has all of these; before, every dense GEMM went
to cuBLAS and the MTP layer's Wgrad (K = 4 x 2047 = 8188 tokens) raised in cublas_gemm."""

import torch

from twinpipe.fp8.backend import cublas_or_triton


def test_dense_gemms_split_between_cublas_and_triton():
    calls = []
    gemm = cublas_or_triton(lambda *args: calls.append("cublas"), lambda *args: calls.append("triton"))
    f8 = torch.float8_e4m3fn
    cases = {  # (rows, N, K) -> the kernel that should run it
        (8192, 288, 1024): "cublas",     # kv_a forward
        (8192, 1024, 1536): "cublas",    # q_b Dgrad
        (1024, 384, 8192): "cublas",     # a main layer's Wgrad: K = 8192 tokens
        (1024, 384, 8188): "triton",     # the MTP layer's Wgrad: K = 8188 tokens, not a multiple of 16
        (8192, 1024, 288): "triton",     # kv_a Dgrad: K = 288, a partial last 128-block
        (77, 200, 320): "triton",        # N not a multiple of 16
    }
    for (m, n, k), want in cases.items():
        calls.clear()
        a, b = torch.empty(m, k, dtype=f8, device="meta"), torch.empty(n, k, dtype=f8, device="meta")
        gemm(a, torch.empty(m, -(-k // 128), device="meta"), b, torch.empty(n, -(-k // 128), device="meta"),
             torch.float32)
        assert calls == [want], (m, n, k)
