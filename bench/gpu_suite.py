"""The GPU suite: FP8 kernel correctness, FP8 GEMM throughput and a BF16-vs-FP8 training step, in one run.

    python bench/gpu_suite.py            # on one H100/H200: about 5 minutes, stopped at 7.5 (lease budget: 8)
    python bench/gpu_suite.py --dry      # the same code paths on CPU: Triton interpreter, tiny shapes

Writes bench/results/gpu/<gpu>/{correctness,gemm,train_step}.json and summary.md (the table below,
with the issue-15 goals checked); <gpu> is the device name ("cpu-dry" for --dry). Three parts:

1. correctness: every FP8 kernel of every backend (Triton; cuBLAS blockwise `_scaled_mm` where the GPU
   has it) against the torch emulation: activation and weight quantization (bitwise), dense, grouped
   and k-grouped GEMMs at aligned and odd shapes. Relative Frobenius error vs the emulation's FP32
   result, for FP32 output: <= 1e-5 in the interpreter (the same FP8 products summed in FP32 in another
   order: ~1e-7), <= 1e-3 on a GPU (Hopper's FP8 tensor cores keep ~14 bits while summing a 128-wide
   K block before it is promoted to FP32, DeepSeek-V3 report §3.3.2: ~6e-5 relative per block sum);
   <= 1e-2 for BF16 output (its rounding: 2^-9 rms per element, 2^-8 where the Triton interpreter
   truncates); a wrong block scale or tile is off by order 1. cuBLAS is checked in BF16 only, at the
   shapes whose N and K are multiples of 16 (`_scaled_mm` refuses the others);
2. gemm: TFLOPS at DeepSeek-V3's shapes (M = 4096; N x K = 7168x2048, 4096x7168, 7168x16384,
   24576x1536, 2112x7168; grouped 4 and 8 experts x 8192 rows at 4096x7168 and 7168x2048): torch BF16
   matmul / `_grouped_mm`, our Triton FP8, blockwise `torch._scaled_mm` and DeepGEMM when importable,
   with the ratios measured in the same run (median of `triton.testing.do_bench`, L2 flushed);
3. train_step: `bench/train_step.py`'s step (forward_train + loss + backward + AdamW) of the `small`
   preset (0.74B parameters, V3-shaped: MLA, 32 routed + 1 shared expert, MTP), BF16 autocast vs FP8
   (`fp8=auto`): tokens/s, MFU against the detected BF16 peak, peak memory; and greedy decode tokens/s
   with the latent cache (`bench/generate.py`), run before FP8 (whose autotuning takes longest).

Each part runs in a process of its own with a deadline: a part that raises, dies (a CUDA fault poisons
its process only) or overruns is recorded as such in its JSON and the summary, with the rows it finished,
and the next part still runs. Within a part each shape/run is tried on its own, and the part stops
starting new ones when its deadline is near. The whole suite stops after --budget seconds (450 by
default). Most of the time is Triton autotuning: 6 configs compiled (0.3-2 s each for sm_90a on a CPU)
and timed (~0.2 s) at each new (shape, dtype) key: 16 keys in correctness, 5 more in gemm, ~11 in the
FP8 training step (grouped and k-grouped GEMMs, and the dense ones cuBLAS does not take: the MTP layer's
Wgrad over 4 x 2047 tokens, kv_a's Dgrad at K = 288; ~20 more if cuBLAS is unavailable).

Needs torch and triton, and safetensors (twinpipe.model imports it; the lent GPU image has it), not
Hydra/DeepSpeed/wandb/datasets/transformers, and no installed twinpipe: `twinpipe` is this checkout
(`_import_twinpipe`). tests/fp8/test_gpu_suite.py runs --dry that way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

log = logging.getLogger("bench.gpu_suite")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu"
GOALS = {"dense_vs_bf16": 1.6, "dense_vs_scaled_mm": 1.0, "grouped_vs_bf16": 1.5, "train_fp8_vs_bf16": 1.3,
         "mfu_bf16_peak": 0.45}
PART_NAMES = ("correctness", "gemm", "train_step")
# seconds: the most a part may take, and the least kept for the parts after it (estimates for one H100:
# correctness ~125 s, of which ~110 s autotuning 16 Triton kernel keys; gemm ~50 s; train_step ~150 s
# with cuBLAS dense GEMMs, ~300 s if all the FP8 model's dense layers go to Triton)
PART_MAX_S = {"correctness": 170.0, "gemm": 100.0, "train_step": float("inf")}
PART_MIN_S = {"correctness": 0.0, "gemm": 60.0, "train_step": 150.0}
STOP_MARGIN_S = 20.0   # a part starts no new shape/run this close to its deadline


def _import_twinpipe() -> None:
    """`twinpipe` is this checkout, installed or not (the lent GPU image has no install): pyproject maps
    each twinpipe.<folder> to the checkout's <folder>, which a package whose __path__ is the checkout's
    root reproduces. Called before anything imports twinpipe."""
    import types

    package = types.ModuleType("twinpipe")
    package.__path__ = [str(ROOT)]
    sys.modules["twinpipe"] = package


def shapes(dry: bool) -> dict:
    """Shapes of each part: DeepSeek-V3's on a GPU; for --dry a few shapes of the same kinds, shrunk (odd
    ones included) so the Triton interpreter takes seconds."""
    if dry:
        return {"m": 64, "dense": [(224, 64), (66, 224)], "grouped": [(4, 32, 128, 64)], "odd": [(77, 200, 320)],
                "preset": "tiny", "batch": 1, "seq_len": 32, "steps": 1, "warmup": 0, "decode": (1, 8, 4)}
    return {"m": 4096, "dense": [(7168, 2048), (4096, 7168), (7168, 16384), (24576, 1536), (2112, 7168)],
            "grouped": [(e, 8192, n, k) for e in (4, 8) for n, k in ((4096, 7168), (7168, 2048))],
            # odd: partial tiles; M = 4095, 77 (cuBLAS's M-major scale_a, leading dim not a multiple of 4);
            # K = 288 (not a multiple of 128: the small preset's kv_a Dgrad, sent to cuBLAS by fp8=auto)
            "odd": [(1000, 2112, 7168), (4095, 576, 1536), (77, 200, 320), (77, 208, 288)],
            "preset": "small", "batch": 4, "seq_len": 2048, "steps": 8, "warmup": 3, "decode": (32, 64, 64)}


class Progress:
    """One part's JSON, rewritten after every shape/run it finishes, and the part's deadline."""

    def __init__(self, path: Path, meta: dict, deadline: float):
        self.path, self.meta, self.deadline, self.start = path, meta, deadline, time.time()

    def save(self, result, status: str = "running") -> None:
        _write_json(self.path, {"meta": self.meta, "status": status, "seconds": time.time() - self.start,
                                "result": result})

    def stopping(self) -> bool:
        return time.time() > self.deadline - STOP_MARGIN_S


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a part killed while writing leaves its previous JSON."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def timer(device) -> Callable[[Callable], float]:
    """fn -> milliseconds: triton's do_bench on CUDA (median, L2 flushed), else one run (--dry)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

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
    """Segments of about `rows` tokens (not tile-aligned) -> x [M, K] bf16, w [E, N, K] bf16, offsets.
    Drawn on `device` (V3's are 0.5G values); "meta" gives shapes only."""
    import torch

    device = torch.device(device)
    counts = torch.randint(rows - rows // 8, rows + rows // 8 + 1, (num_experts,),
                           generator=torch.Generator().manual_seed(seed))
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(device)
    g = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)
    x = torch.randn(int(counts.sum()), k, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(num_experts, n, k, generator=g, device=device) * 0.02).to(torch.bfloat16)
    return x, w, offsets


def _run_units(progress: Progress, rows: list, units: list[tuple[dict, Callable[[dict], list]]]) -> list:
    """Each unit: (what it is, fn(what) -> rows); one that raises leaves an error row, the others still run."""
    for what, fn in units:
        if progress.stopping():
            rows.append({**what, "skipped": "part deadline", "ok": False})
        else:
            try:
                rows += fn(what)
            except Exception as exc:  # noqa: BLE001 - recorded; the next unit runs
                rows.append({**what, "error": _error(exc), "ok": False})
                log.error("%s: %s", what, _error(exc))
        progress.save(rows)
    return rows


def correctness(device, sizes: dict, progress: Progress) -> list[dict]:
    """Every kernel of every backend against the emulation (module docstring, part 1)."""
    import torch

    from twinpipe.fp8.backend import get_backend

    ref = get_backend("emulate", device)
    limit = {str(torch.float32): 1e-3 if device.type == "cuda" else 1e-5, str(torch.bfloat16): 1e-2}  # docstring
    g = torch.Generator().manual_seed(1)

    def graded(rows: list[dict]) -> list[dict]:
        for row in rows:
            row["ok"] = row.get("quant_bitwise", True) and row.get("rel_err", 0.0) <= limit.get(row.get("out"), 0.0)
        return rows

    def dense(backend, dtypes):
        def run(what):
            m, n, k = what["shape"]
            x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
            w = (torch.randn(n, k, generator=g) * 0.02).to(device, torch.bfloat16)
            xq, xs = ref.act_quant(x)
            wq, ws = ref.weight_quant(w)
            quant_ok = [torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                    b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                        for a, b in zip((*backend.act_quant(x), *backend.weight_quant(w)), (xq, xs, wq, ws))]
            want = ref.gemm(xq, xs, wq, ws, torch.float32)
            return graded([{**what, "op": "quant", "quant_bitwise": all(quant_ok)}]
                          + [{**what, "op": "dense", "out": str(dtype),
                              "rel_err": rel_err(backend.gemm(xq, xs, wq, ws, dtype), want)} for dtype in dtypes])
        return run

    def grouped(backend, dtypes):
        def run(what):
            e, rows_per, n, k = what["shape"]
            x, w, offsets = grouped_operands(e, rows_per, n, k, device)
            xq, xs = ref.act_quant(x)
            wq, ws = ref.weight_quant(w)
            want = ref.grouped_gemm(xq, xs, wq, ws, offsets, torch.float32)
            rows = [{**what, "op": "grouped", "shape": [e, int(offsets[-1]), n, k], "out": str(dtype),
                     "rel_err": rel_err(backend.grouped_gemm(xq, xs, wq, ws, offsets, dtype), want)} for dtype in dtypes]
            # k-grouped (the expert Wgrad): [N, L] x [K, L] per segment of L -> [E, N, K]
            aligned = torch.nn.functional.pad(((offsets.diff() + 127) // 128 * 128).cumsum(0), (1, 0))
            length = int(aligned[-1])
            a = torch.randn(n, length, generator=g).to(device, torch.bfloat16)
            b = torch.randn(k, length, generator=g).to(device, torch.bfloat16)
            (aq, as_), (bq, bs) = ref.act_quant(a), ref.act_quant(b)
            want = ref.k_grouped_gemm(aq, as_, bq, bs, aligned, torch.float32)
            got = backend.k_grouped_gemm(aq, as_, bq, bs, aligned, torch.float32)
            rows.append({**what, "op": "k_grouped", "shape": [e, length, n, k], "out": str(torch.float32),
                         "rel_err": rel_err(got, want)})
            return graded(rows)
        return run

    units: list = []
    rows: list[dict] = []
    # cuBLAS first: it does not autotune, so a part stopped at its deadline has still checked it
    for name, backend in sorted(backends(device).items(), key=lambda item: item[0] != "cublas"):
        if isinstance(backend, str):
            rows.append({"backend": name, "skipped": backend, "ok": True})
            continue
        dtypes = (torch.bfloat16, torch.float32) if name == "triton" else (torch.bfloat16,)
        mine = [({"backend": name, "shape": [m, n, k]}, dense(backend, dtypes))
                for m, n, k in [(sizes["m"], *sizes["dense"][0])] + sizes["odd"]]
        mine += [({"backend": name, "shape": [e, rows_per, n, k]}, grouped(backend, dtypes))   # k-grouped: N = k
                 for e, rows_per, n, k in sizes["grouped"][:1] + [(3, 45, 200, 136)]]
        for what, fn in mine:  # _scaled_mm needs N and K multiples of 16 (cublas_gemm raises otherwise)
            if name == "cublas" and any(d % 16 for d in what["shape"][-2:]):
                rows.append({**what, "skipped": "cuBLAS: N, K not multiples of 16", "ok": True})
            else:
                units.append((what, fn))
    return _run_units(progress, rows, units)


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


def bf16_grouped_mm(x, w, offsets) -> Callable:
    """torch's BF16 grouped GEMM: x [M, K] by segment (offsets [E+1]) times w [E, N, K] -> [M, N]."""
    import torch

    w_t = w.transpose(1, 2)                                # [E, K, N], column-major per expert
    ends = offsets[1:].to(torch.int32)                     # _grouped_mm takes each segment's end, int32
    return lambda: torch._grouped_mm(x, w_t, offs=ends)


def _measure(time_ms, row: dict, key: str, fn: Callable[[], Callable | None], flops: float) -> None:
    """Time what fn() returns (fn builds it, so a failing setup is recorded too; None: not available)."""
    try:
        run = fn()
        if run is None:
            return
        ms = time_ms(run)
    except Exception as exc:  # noqa: BLE001 - a backend that fails is recorded, the suite goes on
        row[f"{key}_error"] = _error(exc)
        return
    row[f"{key}_ms"], row[f"{key}_tflops"] = ms, flops / (ms * 1e-3) / 1e12


def _ratios(row: dict) -> dict:
    """FP8 (Triton) speed over each other measured kernel's: other's time / FP8's."""
    for other in ("bf16", "scaled_mm", "deep_gemm"):
        if f"{other}_ms" in row and "fp8_triton_ms" in row:
            row[f"fp8_vs_{other}"] = row[f"{other}_ms"] / row["fp8_triton_ms"]
    return row


def gemm(device, sizes: dict, progress: Progress) -> list[dict]:
    """FP8 vs BF16 vs `_scaled_mm` (vs DeepGEMM) TFLOPS (module docstring, part 2)."""
    import torch

    found = backends(device)
    triton, cublas = found["triton"], found["cublas"]
    time_ms = timer(device)

    def dense(row):
        m, n, k = row["M"], row["N"], row["K"]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        xq, xs = triton.act_quant(x)
        wq, ws = triton.weight_quant(w)
        flops = 2.0 * m * n * k
        _measure(time_ms, row, "bf16", lambda: lambda: x @ w.T, flops)
        _measure(time_ms, row, "fp8_triton", lambda: lambda: triton.gemm(xq, xs, wq, ws, torch.bfloat16), flops)
        if not isinstance(cublas, str):
            _measure(time_ms, row, "scaled_mm", lambda: lambda: cublas.gemm(xq, xs, wq, ws, torch.bfloat16), flops)
        _measure(time_ms, row, "deep_gemm", lambda: _deep_gemm_dense(xq, xs, wq, ws), flops)
        return [_ratios(row)]

    def grouped(row):
        x, w, offsets = grouped_operands(row["experts"], row.pop("rows_per_expert"), row["N"], row["K"], device)
        xq, xs = triton.act_quant(x)
        wq, ws = triton.weight_quant(w)
        row["M"] = m = x.shape[0]
        flops = 2.0 * m * row["N"] * row["K"]
        _measure(time_ms, row, "bf16", lambda: bf16_grouped_mm(x, w, offsets), flops)
        _measure(time_ms, row, "fp8_triton",
                 lambda: lambda: triton.grouped_gemm(xq, xs, wq, ws, offsets, torch.bfloat16), flops)
        return [_ratios(row)]

    units = [({"kind": "dense", "M": sizes["m"], "N": n, "K": k}, dense) for n, k in sizes["dense"]]
    units += [({"kind": "grouped", "experts": e, "rows_per_expert": r, "N": n, "K": k}, grouped)
              for e, r, n, k in sizes["grouped"]]
    return _run_units(progress, [], units)


def train_step(device, sizes: dict, progress: Progress) -> dict:
    """BF16 vs FP8 training step and decode (module docstring, part 3); each run tried on its own."""
    import torch

    from twinpipe.bench.generate import time_decode
    from twinpipe.bench.train_step import bench
    from twinpipe.model.config import ModelConfig
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.flops import peak_flops

    dtype = "bf16" if device.type == "cuda" else "fp32"
    args = (sizes["preset"], sizes["batch"], sizes["seq_len"], sizes["steps"], sizes["warmup"], device, dtype)
    peak = peak_flops(None, fp8=False)

    def step(fp8: str) -> dict:
        run = bench(*args, fp8=fp8)
        run["mfu_bf16_peak"] = run["tokens_per_s"] * run["flops_per_token"] / peak if peak else None
        return run

    def decode() -> dict:
        batch, prompt_len, new_tokens = sizes["decode"]
        torch.manual_seed(0)
        cfg = ModelConfig.preset(sizes["preset"])
        model = Transformer(cfg).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
        return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                **time_decode(model, prompts, new_tokens, absorb=None)}

    result: dict = {}
    # decode before FP8: FP8 autotunes each new GEMM shape, the longest and least certain of the three
    for key, fn in ((dtype, lambda: step("off")), ("decode", decode), ("fp8", lambda: step("auto"))):
        if progress.stopping():
            result[key] = {"skipped": "part deadline"}
        else:
            try:
                result[key] = fn()
            except Exception as exc:  # noqa: BLE001 - recorded; the next run goes on
                result[key] = {"error": _error(exc)}
                log.error("train_step %s: %s", key, _error(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.save(result)
    if "tokens_per_s" in result[dtype] and "tokens_per_s" in result["fp8"]:
        result["fp8_vs_bf16_tokens_per_s"] = result["fp8"]["tokens_per_s"] / result[dtype]["tokens_per_s"]
    return result


PARTS = {"correctness": correctness, "gemm": gemm, "train_step": train_step}


def summary(meta: dict, parts: dict[str, dict]) -> str:
    """The markdown of summary.md: each part's status, each figure beside its goal."""
    def fmt(v):
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    def goal(v, key):
        if v is None or meta["dry"]:  # a dry run's ratios time the interpreter, not the kernels
            return fmt(v)
        return f"{v:.2f} {'met' if v >= GOALS[key] else 'MISSED'} (goal {GOALS[key]})"

    lines = [f"# GPU suite on {meta['gpu']}{' (dry run: CPU, Triton interpreter, tiny shapes)' if meta['dry'] else ''}",
             "", f"torch {meta['torch']}, triton {meta['triton']}, {meta['seconds']:.0f} s (budget {meta['budget_s']:.0f} s)",
             "", "| part | status | seconds |", "|---|---|---|"]
    results = {name: part.get("result") for name, part in parts.items()}
    for name, part in parts.items():
        error = results[name].get("error") if isinstance(results[name], dict) else None
        lines.append(f"| {name} | {part['status']}{f' ({error})' if error else ''} | {fmt(part.get('seconds'))} |")
    checks = results["correctness"] if isinstance(results["correctness"], list) else []
    failed = [c for c in checks if not c.get("ok")]
    lines += ["", f"Correctness: {len(checks) - len(failed)}/{len(checks)} checks passed"
              + "".join(f"\n- FAILED {c}" for c in failed), "",
              "| GEMM | M | N | K | BF16 TFLOPS | FP8 TFLOPS | FP8/BF16 | FP8/_scaled_mm | FP8/DeepGEMM |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["gemm"] if isinstance(results["gemm"], list) else []:
        key = "dense_vs_bf16" if r["kind"] == "dense" else "grouped_vs_bf16"
        kind = r["kind"] if r["kind"] == "dense" else f"grouped x{r['experts']}"
        errors = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("error") or k == "skipped")
        lines.append(f"| {kind} | {fmt(r.get('M'))} | {r['N']} | {r['K']} | {fmt(r.get('bf16_tflops'))} | "
                     f"{fmt(r.get('fp8_triton_tflops'))} | {goal(r.get('fp8_vs_bf16'), key)} | "
                     f"{goal(r.get('fp8_vs_scaled_mm'), 'dense_vs_scaled_mm') if r['kind'] == 'dense' else '-'} | "
                     f"{fmt(r.get('fp8_vs_deep_gemm'))} |" + (f" {errors}" if errors else ""))
    train = results["train_step"] if isinstance(results["train_step"], dict) else {}
    lines += ["", "| train step | tokens/s | MFU (BF16 peak) | peak memory GB |", "|---|---|---|---|"]
    base_key = "fp32" if meta["dry"] else "bf16"
    for key in (base_key, "fp8"):
        run = train.get(key, {"skipped": "not reached"})
        if "tokens_per_s" in run:
            lines.append(f"| {key} | {fmt(run['tokens_per_s'])} | {goal(run.get('mfu_bf16_peak'), 'mfu_bf16_peak')} | "
                         f"{fmt(run.get('peak_memory_gb'))} |")
        else:
            lines.append(f"| {key} | {run.get('error') or run.get('skipped')} | - | - |")
    decode = train.get("decode", {})
    lines += ["", f"FP8/{base_key} tokens/s: {goal(train.get('fp8_vs_bf16_tokens_per_s'), 'train_fp8_vs_bf16')}; "
              f"decode {fmt(decode.get('decode_tokens_per_s'))} tokens/s (batch {decode.get('batch', '-')})", ""]
    return "\n".join(lines)


def run_part(name: str, out: Path, meta: dict, deadline: float) -> int:
    """Child process: one part, its JSON rewritten as it goes; 0 when it finished (its rows may hold errors)."""
    import torch

    device = torch.device("cpu" if meta["dry"] else "cuda")
    progress = Progress(out / f"{name}.json", meta, deadline)
    progress.save(None)
    try:
        result = PARTS[name](device, shapes(meta["dry"]), progress)
    except Exception as exc:  # noqa: BLE001 - the part's own set-up failed: recorded for the summary
        progress.save({"error": _error(exc), "traceback": traceback.format_exc()[-4000:]}, status="error")
        log.error("%s failed:\n%s", name, traceback.format_exc())
        return 1
    progress.save(result, status="done")
    return 0


def run_parts(commands: dict[str, list[str]], out: Path, meta: dict, deadline: float) -> dict[str, dict]:
    """Parent: each part's command in its own process (a new session, so a timeout kills all it started),
    one after another, each until its deadline (PART_MAX_S, the suite's `deadline` less PART_MIN_S of the
    parts after it); the part's JSON as it left it, with its status: done, error, crashed (exit code)
    or timeout."""
    parts: dict[str, dict] = {}
    names = list(commands)
    for i, name in enumerate(names):
        start = time.time()
        end = min(start + PART_MAX_S.get(name, float("inf")),
                  deadline - sum(PART_MIN_S.get(later, 0.0) for later in names[i + 1:]))
        path = out / f"{name}.json"
        path.unlink(missing_ok=True)
        status = None
        if end - start < STOP_MARGIN_S:
            status = "skipped: suite deadline"
        else:
            proc = subprocess.Popen([*commands[name], "--deadline", f"{end:.1f}"], start_new_session=True)
            try:
                code = proc.wait(timeout=end - start)
                status = None if code == 0 else f"crashed: exit code {code}"
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)   # the part and whatever it started
                except ProcessLookupError:                # it ended on its own in between
                    pass
                proc.wait()
                status = f"timeout after {end - start:.0f} s"
        part = json.loads(path.read_text()) if path.exists() else {"meta": meta, "result": None}
        if status is not None and part.get("status") in (None, "running", "done"):
            part["status"] = status
        part["seconds"] = time.time() - start
        _write_json(path, part)
        parts[name] = part
        log.info("%s: %s, %.1f s", name, part["status"], part["seconds"])
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (a <gpu> folder goes in it)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite")
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)      # a child process: one part
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)         # its deadline (time.time())
    parser.add_argument("--meta", help=argparse.SUPPRESS)                         # the parent's meta, JSON
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--dry: Triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is first imported (here and in the parts)
    _import_twinpipe()
    if args.part:
        meta = json.loads(args.meta)
        return run_part(args.part, args.out / meta["gpu"], meta, args.deadline)
    import torch
    import triton
    if not args.dry and not torch.cuda.is_available():
        log.error("bench/gpu_suite.py needs a CUDA device; without one run it with --dry")
        return 2
    start = time.time()
    gpu = "cpu-dry" if args.dry else torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    out = args.out / gpu
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": gpu, "dry": args.dry, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "budget_s": args.budget}
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--meta", json.dumps(meta)]
    parts = run_parts({name: [*base, "--part", name, *(["--dry"] if args.dry else [])] for name in PART_NAMES},
                      out, meta, start + args.budget)
    meta["seconds"] = time.time() - start
    table = summary(meta, parts)
    (out / "summary.md").write_text(table)
    log.info("%s\nwrote %s", table, out)
    correct = parts["correctness"]["status"] == "done" and all(c.get("ok") for c in parts["correctness"]["result"])
    return 0 if correct and all(p["status"] == "done" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
