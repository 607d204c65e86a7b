"""Working memory of the backward (issue 16): the transient bytes above what persists and what is saved
for backward, which `twinpipe-plan` counts as `working_bytes`.

Sections (--sections, default both):
  experts  the FP8 routed experts' backward (`FP8GroupedSwiGLU`, emulate) at DeepSeek-V3's widths
           (hidden 7168, moe_intermediate 2048, --experts local experts) for --rows routed rows, fp32 and
           bf16 rows and weights: the peak of live bytes during the backward above its start (the
           incoming gradient not counted), with the backward before issue 16's memory work (the oracle of
           tests/fp8/test_experts.py: it holds everything to its end, so its bytes per row, fit over the
           row counts, extrapolate to --v3-rows, 32768 = 4096 tokens x 8 picks per EP rank) and now
           (against `plan.fp8_experts_backward_bytes`, which gives the V3 figure).
  block    one block's forward + backward (`working_peak`) of the tiny and mid test configs, MoE and
           dense, fp32 and FP8 emulate, with --recompute, against `plan.working_bytes`.

Counted with `bench.memory.LiveBytes` (every operator output until freed), each FP8 kernel as one
(`as_kernels`: its outputs, not the emulation's fp32 temporaries, as on a GPU); the raw emulated figure
is printed beside it.

    python bench/working_memory.py --sections experts   # ~10 minutes on 2 shared CPU cores
    python bench/working_memory.py --sections block     # ~1 minute
Writes bench/results/working_memory_cpu_<sections>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench.memory`, and tests/ for the former backward

from bench.memory import LiveBytes, as_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def experts_case(rows: int, experts: int, hidden: int, inter: int, before: bool, kernels: bool,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Peak live bytes of one FP8GroupedSwiGLU backward (all gradients, gate weights on) above its start."""
    from twinpipe.fp8 import FP8Experts
    from twinpipe.fp8.backend import get_backend
    from twinpipe.fp8.experts import FP8GroupedSwiGLU
    from twinpipe.model.experts import Experts

    function = FP8GroupedSwiGLU
    if before:
        from tests.fp8.test_experts import _backward_before

        class Before(FP8GroupedSwiGLU):
            backward = staticmethod(_backward_before)
        function = Before
    torch.manual_seed(0)
    mod = Experts(experts, hidden, inter)
    mod.reset_parameters(0.02)
    fp8 = FP8Experts.from_experts(mod.to(dtype), "emulate")
    counts = torch.full((experts,), rows // experts)
    counts[0] += rows - int(counts.sum())
    x = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    w = torch.rand(rows, requires_grad=True)
    backend = get_backend("emulate")
    backend = as_kernels(backend) if kernels else backend
    offsets = F.pad(counts.cumsum(0), (1, 0))
    for _ in range(2):  # the first backward makes the weights' cached transposes: not working memory
        y = function.apply(x, fp8.gate_proj, fp8.up_proj, fp8.down_proj, offsets, fp8.fp8_weight_caches, backend,
                           None, w)
        g = torch.randn_like(y)
        with LiveBytes() as mem:
            y.backward(g)
        del y, g
        x.grad = w.grad = None
        fp8.zero_grad(set_to_none=True)
    return {"rows": rows, "before": before, "kernels": kernels, "dtype": str(dtype), "peak_bytes": mem.peak}


def working_peak(model: torch.nn.Module, layer: int, batch: int, seq_len: int, where: bool = False) -> dict:
    """Block `layer` of `model` (as `build_model` makes it: FP8 and train.recompute applied), forward and
    backward on random hidden states [batch, seq_len, H]: `saved` the bytes the forward leaves (its
    output included), `working` the peak during the backward above them, the incoming gradient
    included. The block's gradients exist before (zeros: what ZeRO-1's bucket and the expert slots hold
    after the first micro-batch), so a parameter's gradient is working memory until added in. Each FP8
    kernel counts as one (`as_kernels`). With `where`, also the operator and source lines at the peak."""
    from twinpipe.fp8 import backend as fp8_backend

    block = model.layers[layer]
    h = torch.randn(batch, seq_len, model.config.hidden_size, requires_grad=True)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    for p in block.parameters():
        p.grad = torch.zeros_like(p)
    emulate = fp8_backend._emulate
    fp8_backend._emulate = lambda: as_kernels(emulate())
    at_peak: list = []
    try:
        for _ in range(2):  # the first backward makes the FP8 weights' cached transposes
            with LiveBytes() as mem:
                out = block(h, positions)
                saved = mem.live
                mem.peak = saved
                if where:
                    _trace_peak(mem, at_peak)
                out.backward(torch.randn_like(out))
            del out
    finally:
        fp8_backend._emulate = emulate
    return {"saved": saved, "working": mem.peak - saved, **({"where": at_peak[-1:]} if where else {})}


def _trace_peak(mem: LiveBytes, at_peak: list) -> None:
    """Record the operator and the twinpipe lines each time `mem` reaches a new peak (debugging)."""
    import traceback

    dispatch = type(mem).__torch_dispatch__

    def traced(self, func, types, args=(), kwargs=None):
        before = self.peak
        out = dispatch(self, func, types, args, kwargs)
        if self.peak > before:
            lines = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                     if "twinpipe" in f.filename or "/work/main/" in f.filename][-6:]
            at_peak.append((self.peak, str(func), lines))
        return out
    mem.__torch_dispatch__ = traced.__get__(mem)


BLOCK_CASES = [(size, recompute, fp8) for fp8 in ("emulate", "off") for size in ("tiny", "mid")
               for recompute in ("none", "[norms,mla_up]", "[norms,mla_up,attention,router]")]


def block_cases() -> list[dict]:
    """Every block's working memory (`working_peak`) of the tiny and mid configs of tests/trainer/test_plan.py
    against the plan's per-rank `working_bytes` (the largest block's)."""
    from tests.trainer.test_plan import MID, TINY, recipe
    from twinpipe.trainer.build import build_model
    from twinpipe.trainer.cli import plan as planner

    out = []
    for size, recompute, fp8 in BLOCK_CASES:
        cfg = recipe(*(TINY if size == "tiny" else MID), "train.global_batch=2", f"train.recompute={recompute}",
                     f"fp8.backend={fp8}")
        [planned] = planner.plan(cfg, attention="math", check_fit=False)["ranks"]
        torch.manual_seed(0)
        model = build_model(cfg, torch.device("cpu"))
        blocks = [working_peak(model, b, cfg.train.micro_batch, cfg.train.seq_len) for b in range(len(model.layers))]
        measured = max(b["working"] for b in blocks)
        out.append({"size": size, "recompute": recompute, "fp8": fp8, "blocks": blocks, "measured": measured,
                    "plan": planned["working_bytes"], "plan_over_measured": planned["working_bytes"] / measured})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "blocks"}), flush=True)
    return out


def _fit(cases: list[dict]) -> tuple[float, float]:
    """(bytes per row, fixed bytes) through the two row counts."""
    (r0, p0), (r1, p1) = [(c["rows"], c["peak_bytes"]) for c in cases[:2]]
    per_row = (p1 - p0) / (r1 - r0)
    return per_row, p0 - per_row * r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="experts,block")
    ap.add_argument("--rows", default="512,1024")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--v3-rows", type=int, default=32768)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the rows' and weights' dtypes")
    ap.add_argument("--emulated", action="store_true", help="also count the emulation's temporaries")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"device": platform.processor(), "torch": torch.__version__, "host": platform.node(),
                              "load_avg_1min_start": os.getloadavg()[0]}
    if "experts" in args.sections:
        out = {}
        from twinpipe.trainer.cli.plan import fp8_experts_backward_bytes

        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            for before in (True, False):
                for kernels in (True, False) if args.emulated else (True,):
                    cases = [experts_case(int(r), args.experts, 7168, 2048, before, kernels, dtype)
                             for r in args.rows.split(",")]
                    key = f"{name}_{'before' if before else 'now'}_{'kernels' if kernels else 'emulated'}"
                    entry: dict[str, Any] = {"cases": cases}
                    if before:  # everything held to the end: linear in the rows
                        per_row, fixed = _fit(cases)
                        entry.update(bytes_per_row=per_row, fixed_bytes=fixed,
                                     v3_gib_extrapolated=(per_row * args.v3_rows + fixed) / 2**30)
                    else:  # the larger of phases (plan.fp8_experts_backward_bytes), less the incoming gradient
                        size = dtype.itemsize
                        model = lambda m: fp8_experts_backward_bytes(m, 7168, 2048, args.experts, size, size) \
                            - m * 7168 * size  # noqa: E731
                        entry.update(plan_over_measured=[model(c["rows"]) / c["peak_bytes"] for c in cases],
                                     v3_gib_plan=model(args.v3_rows) / 2**30)
                    out[key] = entry
                    print(key, json.dumps(entry), flush=True)
        result["experts"] = out
    if "block" in args.sections:
        result["block"] = block_cases()
    result["load_avg_1min_end"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"working_memory_cpu_{args.sections.replace(',', '_')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
