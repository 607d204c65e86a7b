"""FP8 block-scaled GEMM throughput: our Triton kernels vs torch BF16 vs cuBLAS `_scaled_mm` blockwise.

    python bench/fp8_gemm.py                 # all issue-4 shapes, JSON to bench/results/
    python bench/fp8_gemm.py --quick         # two dense shapes and one grouped shape

Dense: M = 4096 tokens times each (N, K) weight of DeepSeek-V3 (issue 4). Grouped: 8, 16 and 32 experts
with about 4096 tokens each (counts drawn around 4096, so segments are not tile-aligned), weights
(N, K) = (4096, 7168) and (7168, 2048). The FP8 GEMMs take pre-quantized operands (1×128 activation
tiles, 128×128 weight blocks) and write BF16; the quantization kernels are timed separately. TFLOPS =
2·M·N·K / time, time from `triton.testing.do_bench` (median, L2 flushed between runs). Every FP8 result
is checked against the torch emulation (`twinpipe.fp8.emulate`) and its relative error recorded. The
dense Triton GEMM is timed with TMA descriptor loads (Hopper) and with plain pointer loads.

Needs a CUDA GPU (Hopper for cuBLAS blockwise); imports only torch, triton and twinpipe.fp8, so it runs
on a box without hydra/deepspeed/wandb/datasets (`pip install --no-deps --no-build-isolation --no-index
-e .` installs the package there).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

DENSE_SHAPES = [(7168, 2048), (2048, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
                (7168, 18432), (18432, 7168)]
GROUPED_SHAPES = [(4096, 7168), (7168, 2048)]
GROUPED_EXPERTS = [8, 16, 32]
M_DENSE = 4096
TOKENS_PER_EXPERT = 4096


def _tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _time(fn) -> float | None:
    import triton.testing
    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    except Exception as exc:  # noqa: BLE001 - a backend that fails is reported, not fatal
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return None


def bench_dense(m: int, n: int, k: int, cublas_ok: bool) -> dict:
    from twinpipe.fp8.cublas import cublas_gemm
    from twinpipe.fp8.emulate import emulate_gemm
    from twinpipe.fp8.triton_gemm import triton_gemm
    from twinpipe.fp8.triton_quant import triton_act_quant, triton_weight_quant

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = triton_act_quant(x)
    wq, ws = triton_weight_quant(w)
    ref = emulate_gemm(xq, xs, wq, ws, torch.float32)
    row: dict = {"kind": "dense", "M": m, "N": n, "K": k}

    ms = _time(lambda: x @ w.T)
    row["bf16_ms"], row["bf16_tflops"] = ms, ms and _tflops(m, n, k, ms)
    ms = _time(lambda: triton_gemm(xq, xs, wq, ws, torch.bfloat16))
    row["triton_ms"], row["triton_tflops"] = ms, ms and _tflops(m, n, k, ms)
    row["triton_rel_err_vs_emulate"] = _rel_err(triton_gemm(xq, xs, wq, ws, torch.bfloat16), ref)
    from twinpipe.fp8.triton_gemm import _TMA_STATE
    row["triton_tma"] = _TMA_STATE["ok"]
    ms = _time(lambda: triton_gemm(xq, xs, wq, ws, torch.bfloat16, use_tma=False))
    row["triton_pointer_loads_ms"], row["triton_pointer_loads_tflops"] = ms, ms and _tflops(m, n, k, ms)
    if cublas_ok:
        ms = _time(lambda: cublas_gemm(xq, xs, wq, ws, torch.bfloat16))
        row["cublas_ms"], row["cublas_tflops"] = ms, ms and _tflops(m, n, k, ms)
        if ms is not None:
            row["cublas_rel_err_vs_emulate"] = _rel_err(cublas_gemm(xq, xs, wq, ws, torch.bfloat16), ref)
    row["act_quant_ms"] = _time(lambda: triton_act_quant(x))
    row["fp8_rel_err_vs_bf16"] = _rel_err(ref, (x.float() @ w.float().T))
    return row


def _grouped_bf16(x, w_t, offsets):
    """BF16 baseline: torch._grouped_mm on Hopper, else one matmul per expert."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w_t, offs=offsets[1:].to(torch.int32))
    return torch.cat([x[lo:hi] @ w_t[e] for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(),
                                                                          offsets[1:].tolist()))])


def bench_grouped(num_experts: int, n: int, k: int, cublas_ok: bool, seed: int = 0) -> dict:
    from twinpipe.fp8.cublas import cublas_grouped_gemm
    from twinpipe.fp8.emulate import emulate_grouped_gemm
    from twinpipe.fp8.triton_gemm import triton_grouped_gemm
    from twinpipe.fp8.triton_quant import triton_act_quant, triton_weight_quant

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(TOKENS_PER_EXPERT - 512, TOKENS_PER_EXPERT + 512, (num_experts,), generator=g)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).cuda()
    m = int(counts.sum())
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = triton_act_quant(x)
    wq, ws = triton_weight_quant(w)
    row: dict = {"kind": "grouped", "experts": num_experts, "M": m, "N": n, "K": k}
    w_t = w.transpose(1, 2)                                               # [E, K, N] for x @ w_t
    ms = _time(lambda: _grouped_bf16(x, w_t, offsets))
    row["bf16_ms"], row["bf16_tflops"] = ms, ms and _tflops(m, n, k, ms)
    ms = _time(lambda: triton_grouped_gemm(xq, xs, wq, ws, offsets, torch.bfloat16))
    row["triton_ms"], row["triton_tflops"] = ms, ms and _tflops(m, n, k, ms)
    ref = emulate_grouped_gemm(xq, xs, wq, ws, offsets, torch.float32)
    row["triton_rel_err_vs_emulate"] = _rel_err(triton_grouped_gemm(xq, xs, wq, ws, offsets, torch.bfloat16), ref)
    if cublas_ok:
        ms = _time(lambda: cublas_grouped_gemm(xq, xs, wq, ws, offsets, torch.bfloat16))
        row["cublas_loop_ms"], row["cublas_loop_tflops"] = ms, ms and _tflops(m, n, k, ms)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two dense shapes and one grouped shape")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for the JSON results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/fp8_gemm.py measures GPU kernels and needs a CUDA device; none is visible here "
              "(CPU correctness of the same kernels is covered by tests/fp8 under TRITON_INTERPRET=1).",
              file=sys.stderr)
        return 2

    from twinpipe.fp8.cublas import cublas_unavailable_reason
    reason = cublas_unavailable_reason(torch.cuda.current_device())
    if reason:
        print(f"cuBLAS blockwise skipped: {reason}", file=sys.stderr)
    dense = DENSE_SHAPES[:2] if args.quick else DENSE_SHAPES
    grouped = [(8, *GROUPED_SHAPES[0])] if args.quick else [(e, n, k) for e in GROUPED_EXPERTS
                                                             for n, k in GROUPED_SHAPES]
    rows = []
    for n, k in dense:
        rows.append(bench_dense(M_DENSE, n, k, reason is None))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    for e, n, k in grouped:
        rows.append(bench_grouped(e, n, k, reason is None))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    import triton
    result = {
        "bench": "fp8_gemm", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "python": platform.python_version(),
        "cublas_blockwise": reason or "available", "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    path = out_dir / f"fp8_gemm_{tag}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
