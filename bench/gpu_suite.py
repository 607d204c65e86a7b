"""The GPU suite: FP8 kernel correctness, FP8 GEMM throughput and a BF16-vs-FP8 training step, in one run.

    python bench/gpu_suite.py            # on one H100/H200: about 5 minutes (budget: 8)
    python bench/gpu_suite.py --dry      # the same code paths on CPU: Triton interpreter, tiny shapes

Writes bench/results/gpu/<gpu>/{correctness,gemm,train_step}.json and summary.md (the table below,
with the issue-15 goals checked); <gpu> is the device name ("cpu-dry" for --dry). Three parts:

1. correctness: every FP8 kernel of every backend (Triton; cuBLAS blockwise `_scaled_mm` where the GPU
   has it) against the torch emulation: activation and weight quantization (bitwise), dense, grouped
   and k-grouped GEMMs at aligned and odd shapes. Relative Frobenius error vs the emulation's FP32
   result: <= 1e-5 for FP32 output (the same FP8 products summed in FP32 in another order: ~1e-7),
   <= 1e-2 for BF16 output (its rounding: 2^-9 rms per element, 2^-8 where the Triton interpreter
   truncates); a wrong block scale or tile is off by order 1. cuBLAS is checked in BF16 only;
2. gemm: TFLOPS at DeepSeek-V3's shapes (M = 4096; N x K = 7168x2048, 4096x7168, 7168x16384,
   24576x1536, 2112x7168; grouped 4 and 8 experts x 8192 rows at 4096x7168 and 7168x2048): torch BF16
   matmul / `_grouped_mm`, our Triton FP8, blockwise `torch._scaled_mm` and DeepGEMM when importable,
   with the ratios measured in the same run;
3. train_step: `bench/train_step.py`'s step (forward_train + loss + backward + AdamW) of the `small`
   preset (0.74B parameters, V3-shaped: MLA, 32 routed + 1 shared expert, MTP), BF16 autocast vs FP8
   (`fp8=auto`): tokens/s, MFU against the detected BF16 peak, peak memory; and greedy decode tokens/s
   with the latent cache (`bench/generate.py`).

Needs only torch and triton (no Hydra/DeepSpeed/wandb/datasets), as the lent GPU image has.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("bench.gpu_suite")
RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
GOALS = {"dense_vs_bf16": 1.6, "dense_vs_scaled_mm": 1.0, "grouped_vs_bf16": 1.5, "train_fp8_vs_bf16": 1.3,
         "mfu_bf16_peak": 0.45}


def shapes(dry: bool) -> dict:
    """Shapes of each part: DeepSeek-V3's on a GPU; for --dry a few shapes of the same kinds, shrunk (odd
    ones included) so the Triton interpreter takes seconds."""
    if dry:
        return {"m": 64, "dense": [(224, 64), (66, 224)], "grouped": [(4, 32, 128, 64)], "odd": [(77, 200, 320)],
                "preset": "tiny", "batch": 1, "seq_len": 32, "steps": 1, "warmup": 0, "decode": (1, 8, 4)}
    return {"m": 4096, "dense": [(7168, 2048), (4096, 7168), (7168, 16384), (24576, 1536), (2112, 7168)],
            "grouped": [(e, 8192, n, k) for e in (4, 8) for n, k in ((4096, 7168), (7168, 2048))],
            "odd": [(1000, 2112, 7168), (4095, 576, 1536), (77, 200, 320)],
            "preset": "small", "batch": 4, "seq_len": 2048, "steps": 8, "warmup": 3, "decode": (32, 64, 64)}


def timer(device) -> Callable[[Callable], float]:
    """fn -> milliseconds: triton's do_bench on CUDA (median, L2 flushed), else one run (--dry)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40))

    def once(fn: Callable) -> float:  # --dry: the code path, not a measurement
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def backends(device) -> dict[str, object]:
    """The FP8 backends to test on `device`, or why one is skipped (a string)."""
    from twinpipe.fp8.backend import get_backend
    from twinpipe.fp8.cublas import cublas_unavailable_reason

    found: dict[str, object] = {"triton": get_backend("triton", device)}
    reason = cublas_unavailable_reason(device.index or 0) if device.type == "cuda" else "no CUDA device"
    found["cublas"] = reason or get_backend("cublas", device)
    return found


def grouped_operands(num_experts: int, rows: int, n: int, k: int, device, seed: int = 0):
    """Segments of about `rows` tokens (not tile-aligned) -> x [M, K] bf16, w [E, N, K] bf16, offsets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(rows - rows // 8, rows + rows // 8 + 1, (num_experts,), generator=g)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(device)
    x = torch.randn(int(counts.sum()), k, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(num_experts, n, k, generator=g) * 0.02).to(device, torch.bfloat16)
    return x, w, offsets


def correctness(device, sizes: dict) -> list[dict]:
    """Every kernel of every backend against the emulation (module docstring, part 1)."""
    import torch

    from twinpipe.fp8.backend import get_backend

    ref = get_backend("emulate", device)
    rows = []
    for name, backend in backends(device).items():
        if isinstance(backend, str):
            rows.append({"backend": name, "skipped": backend})
            continue
        dtypes = (torch.bfloat16, torch.float32) if name == "triton" else (torch.bfloat16,)
        g = torch.Generator().manual_seed(1)
        for m, n, k in [(sizes["m"], *sizes["dense"][0])] + sizes["odd"]:
            x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
            w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
            xq, xs = ref.act_quant(x)
            wq, ws = ref.weight_quant(w)
            quant_ok = [torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                    b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                        for a, b in zip((*backend.act_quant(x), *backend.weight_quant(w)), (xq, xs, wq, ws))]
            want = ref.gemm(xq, xs, wq, ws, torch.float32)
            rows.append({"backend": name, "op": "quant", "shape": [m, n, k], "quant_bitwise": all(quant_ok)})
            rows += [{"backend": name, "op": "dense", "shape": [m, n, k], "out": str(dtype),
                      "rel_err": rel_err(backend.gemm(xq, xs, wq, ws, dtype), want)} for dtype in dtypes]
        for e, rows_per, n, k in sizes["grouped"][:1] + [(3, 45, 200, 136)]:
            x, w, offsets = grouped_operands(e, rows_per, n, k, device)
            xq, xs = ref.act_quant(x)
            wq, ws = ref.weight_quant(w)
            want = ref.grouped_gemm(xq, xs, wq, ws, offsets, torch.float32)
            rows += [{"backend": name, "op": "grouped", "shape": [e, int(offsets[-1]), n, k], "out": str(dtype),
                      "rel_err": rel_err(backend.grouped_gemm(xq, xs, wq, ws, offsets, dtype), want)}
                     for dtype in dtypes]
            # k-grouped (the expert Wgrad): [N, L] x [K, L] per segment of L -> [E, N, K]
            aligned = torch.nn.functional.pad(((offsets.diff() + 127) // 128 * 128).cumsum(0), (1, 0))
            length = int(aligned[-1])
            a = torch.randn(n, length, generator=g).to(device, torch.bfloat16)
            b = torch.randn(k, length, generator=g).to(device, torch.bfloat16)
            (aq, as_), (bq, bs) = ref.act_quant(a), ref.act_quant(b)
            want = ref.k_grouped_gemm(aq, as_, bq, bs, aligned, torch.float32)
            got = backend.k_grouped_gemm(aq, as_, bq, bs, aligned, torch.float32)
            rows.append({"backend": name, "op": "k_grouped", "shape": [e, length, n, k], "out": str(torch.float32),
                         "rel_err": rel_err(got, want)})
    limit = {str(torch.float32): 1e-5, str(torch.bfloat16): 1e-2}  # see the module docstring
    for row in rows:
        row["ok"] = row.get("quant_bitwise", True) and row.get("rel_err", 0.0) <= limit.get(row.get("out"), 0.0)
    return rows


def _deep_gemm_dense(xq, xs, wq, ws):
    """DeepGEMM's dense FP8 GEMM (its documented V1 API) when the package is importable, else None."""
    try:
        import deep_gemm
    except ImportError:
        return None
    import torch

    out = torch.empty(xq.shape[0], wq.shape[0], device=xq.device, dtype=torch.bfloat16)
    xs_t = deep_gemm.get_col_major_tma_aligned_tensor(xs)
    return lambda: deep_gemm.gemm_fp8_fp8_bf16_nt((xq, xs_t), (wq, ws), out)


def _measure(time_ms, row: dict, key: str, fn, flops: float) -> None:
    try:
        ms = time_ms(fn)
    except Exception as exc:  # noqa: BLE001 - a backend that fails is recorded, the suite goes on
        row[f"{key}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return
    row[f"{key}_ms"], row[f"{key}_tflops"] = ms, flops / (ms * 1e-3) / 1e12


def gemm(device, sizes: dict) -> list[dict]:
    """FP8 vs BF16 vs `_scaled_mm` (vs DeepGEMM) TFLOPS (module docstring, part 2)."""
    import torch

    found = backends(device)
    triton, cublas = found["triton"], found["cublas"]
    time_ms = timer(device)
    rows = []
    for n, k in sizes["dense"]:
        m = sizes["m"]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        xq, xs = triton.act_quant(x)
        wq, ws = triton.weight_quant(w)
        row, flops = {"kind": "dense", "M": m, "N": n, "K": k}, 2.0 * m * n * k
        _measure(time_ms, row, "bf16", lambda: x @ w.T, flops)
        _measure(time_ms, row, "fp8_triton", lambda: triton.gemm(xq, xs, wq, ws, torch.bfloat16), flops)
        if not isinstance(cublas, str):
            _measure(time_ms, row, "scaled_mm", lambda: cublas.gemm(xq, xs, wq, ws, torch.bfloat16), flops)
        deep = _deep_gemm_dense(xq, xs, wq, ws)
        if deep is not None:
            _measure(time_ms, row, "deep_gemm", deep, flops)
        rows.append(row)
    for e, rows_per, n, k in sizes["grouped"]:
        x, w, offsets = grouped_operands(e, rows_per, n, k, device)
        xq, xs = triton.act_quant(x)
        wq, ws = triton.weight_quant(w)
        m = x.shape[0]
        row, flops = {"kind": "grouped", "experts": e, "M": m, "N": n, "K": k}, 2.0 * m * n * k
        w_t = w.transpose(1, 2)                                                  # [E, K, N]
        offs = offsets[1:].to(torch.int32)
        _measure(time_ms, row, "bf16", lambda: torch._grouped_mm(x, w_t, offs=offs), flops)
        _measure(time_ms, row, "fp8_triton",
                 lambda: triton.grouped_gemm(xq, xs, wq, ws, offsets, torch.bfloat16), flops)
        rows.append(row)
    for row in rows:
        for other in ("bf16", "scaled_mm", "deep_gemm"):
            if f"{other}_ms" in row and "fp8_triton_ms" in row:
                row[f"fp8_vs_{other}"] = row[f"{other}_ms"] / row["fp8_triton_ms"]
    return rows


def train_step(device, sizes: dict) -> dict:
    """BF16 vs FP8 training step and decode (module docstring, part 3)."""
    import torch

    from twinpipe.bench.generate import time_decode
    from twinpipe.bench.train_step import bench
    from twinpipe.model.config import ModelConfig
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.flops import peak_flops

    dtype = "bf16" if device.type == "cuda" else "fp32"
    args = (sizes["preset"], sizes["batch"], sizes["seq_len"], sizes["steps"], sizes["warmup"], device, dtype)
    result = {"bf16" if device.type == "cuda" else "fp32": bench(*args, fp8="off"), "fp8": bench(*args, fp8="auto")}
    base, fp8 = result.values()
    result["fp8_vs_bf16_tokens_per_s"] = fp8["tokens_per_s"] / base["tokens_per_s"]
    peak = peak_flops(None, fp8=False)
    for run in (base, fp8):
        run["mfu_bf16_peak"] = run["tokens_per_s"] * run["flops_per_token"] / peak if peak else None
    batch, prompt_len, new_tokens = sizes["decode"]
    torch.manual_seed(0)
    cfg = ModelConfig.preset(sizes["preset"])
    model = Transformer(cfg).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    result["decode"] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                        **time_decode(model, prompts, new_tokens, absorb=None)}
    return result


def summary(meta: dict, checks: list[dict], gemms: list[dict], train: dict) -> str:
    """The markdown table of summary.md: each figure beside its goal."""
    def fmt(v):
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    def goal(v, key):
        if v is None or meta["dry"]:  # a dry run's ratios time the interpreter, not the kernels
            return fmt(v)
        return f"{v:.2f} {'met' if v >= GOALS[key] else 'MISSED'} (goal {GOALS[key]})"

    failed = [c for c in checks if not c["ok"]]
    lines = [f"# GPU suite on {meta['gpu']}{' (dry run: CPU, Triton interpreter, tiny shapes)' if meta['dry'] else ''}",
             "", f"torch {meta['torch']}, triton {meta['triton']}, {meta['seconds']:.0f} s", "",
             f"Correctness: {len(checks) - len(failed)}/{len(checks)} checks passed"
             + "".join(f"\n- FAILED {c}" for c in failed), "",
             "| GEMM | M | N | K | BF16 TFLOPS | FP8 TFLOPS | FP8/BF16 | FP8/_scaled_mm | FP8/DeepGEMM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gemms:
        key = "dense_vs_bf16" if r["kind"] == "dense" else "grouped_vs_bf16"
        kind = r["kind"] if r["kind"] == "dense" else f"grouped x{r['experts']}"
        lines.append(f"| {kind} | {r['M']} | {r['N']} | {r['K']} | {fmt(r.get('bf16_tflops'))} | "
                     f"{fmt(r.get('fp8_triton_tflops'))} | {goal(r.get('fp8_vs_bf16'), key)} | "
                     f"{goal(r.get('fp8_vs_scaled_mm'), 'dense_vs_scaled_mm') if r['kind'] == 'dense' else '-'} | "
                     f"{fmt(r.get('fp8_vs_deep_gemm'))} |")
    base_key = next(iter(train))
    lines += ["", "| train step | tokens/s | MFU (BF16 peak) | peak memory GB |", "|---|---|---|---|"]
    for key in (base_key, "fp8"):
        run = train[key]
        lines.append(f"| {key} | {fmt(run['tokens_per_s'])} | {goal(run['mfu_bf16_peak'], 'mfu_bf16_peak')} | "
                     f"{fmt(run.get('peak_memory_gb'))} |")
    lines += ["", f"FP8/{base_key} tokens/s: {goal(train['fp8_vs_bf16_tokens_per_s'], 'train_fp8_vs_bf16')}; "
              f"decode {fmt(train['decode']['decode_tokens_per_s'])} tokens/s "
              f"(batch {train['decode']['batch']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (a <gpu> folder goes in it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--dry: Triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is first imported, below
    import torch
    import triton
    if not args.dry and not torch.cuda.is_available():
        log.error("bench/gpu_suite.py needs a CUDA device; without one run it with --dry")
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    gpu = "cpu-dry" if args.dry else torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    sizes = shapes(args.dry)
    out = args.out / gpu
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = {"gpu": gpu, "dry": args.dry, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = {}
    for name, fn in (("correctness", correctness), ("gemm", gemm), ("train_step", train_step)):
        t0 = time.perf_counter()
        parts[name] = fn(device, sizes)
        seconds = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps({"meta": meta, "seconds": seconds, "result": parts[name]},
                                                     indent=1, default=str))
        log.info("%s: %.1f s", name, seconds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["seconds"] = time.perf_counter() - start
    table = summary(meta, parts["correctness"], parts["gemm"], parts["train_step"])
    (out / "summary.md").write_text(table)
    log.info("%s\nwrote %s", table, out)
    return 0 if all(c["ok"] for c in parts["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
