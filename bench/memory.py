"""Memory of a training step (issue 17): selective recomputation, chunked cross-entropy, asynchronous
checkpoints. Every configuration runs in a process of its own (fork on CPU, spawn on CUDA), so one
configuration's allocations never count in another's peak.

Sections (--sections, default all):
  step        one training step (forward_train + PretrainLoss + backward + AdamW) of --preset at
              --seq-len for each train.recompute option (chunked CE, loss.ce_chunk_mib=--ce-chunk-mib),
              and with no recomputation and the plain CE (ce_chunk_mib=0).
  layer       forward + backward of one MoE block shaped like --layer-preset (default DeepSeek-V3's:
              hidden 7168, MLA 128 heads, q/kv LoRA 1536/512, 8 of the routed experts per token with
              moe_intermediate 2048, one shared expert) on [1, --layer-seq-len] random hidden states, for
              each recompute option. --layer-experts routed experts (default 16 instead of 256): each
              token still reaches 8 experts of V3's size, so the activations are V3's; only the weights
              shrink (all 256 would be 11.3 G parameters in one layer).
  ce          the loss alone on [--ce-tokens, --ce-hidden] hidden states for each vocabulary size of
              --vocabs: plain (lm_head then cross-entropy: fp32 [tokens, vocab] logits) against chunked.
  checkpoint  --saves checkpoints of the --preset model (weights + AdamW state) with --steps-between
              training steps between saves, synchronous against checkpoint.async_save: the step loop's
              stall per save (trainer/checkpoint/writer.py), the write speed, the step time meanwhile.

Memory is counted two ways:
  activations_mb, peak_mb   exact, on any device: `LiveBytes` sees every tensor an operator returns in
              one (warmed-up) step and when its storage is freed. activations_mb is what is still held
              when the forward (and loss) ends: the activations kept for the backward, the definition
              the recompute goal is about; peak_mb is the most held at once in the step (activations,
              recomputed ones, gradients, the optimizer's temporaries). A kernel's private scratch
              (e.g. inside SDPA) is not an operator output and is not counted; the same on every device.
  alloc_peak_mb  the allocator's view over the timed steps: on CUDA max_memory_allocated over what was
              allocated before them; on CPU the peak RSS (VmHWM) over the RSS before them, which glibc's
              reuse of freed memory makes noise at small shapes.
Step times are measured without the counter (it intercepts every operator). Gradients (4 bytes per
parameter, `grad_mb`) are inside every configuration's peak alike.

    python bench/memory.py --smoke                    # seconds on a CPU: tiny shapes, every section
    python bench/memory.py                            # the real run, on one GPU (H100: ~10 minutes)

Writes bench/results/memory_<device>[_smoke].json and prints it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import weakref
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from twinpipe.model.block import Block
from twinpipe.model.config import ModelConfig
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.recompute import apply_recompute
from twinpipe.trainer.chunked_ce import linear_cross_entropy_sum, rows_for_budget
from twinpipe.trainer.loss import GLOBAL_COUNTS, PretrainLoss, cross_entropy_sum
from twinpipe.trainer.optim.zero import ZeroAdamW

RESULTS = Path(__file__).resolve().parent / "results"
RECOMPUTE = ["none", "norms", "mla_up", "moe", "full", ["norms", "mla_up"], ["norms", "mla_up", "moe"]]


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by operators inside the mode and not yet freed: `live`
    now and `peak` since entering. Each output storage is counted once (views and in-place results
    share it) and uncounted by a weak-reference callback when it is freed; an output on an input's
    storage (a view or in-place update of a tensor made before the mode: a weight's transpose, the
    optimizer's update) is not new memory."""

    active: list["LiveBytes"] = []  # the modes entered, innermost last (`as_kernels`)

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.live = self.peak = 0
        self.inside_kernel = 0

    def __enter__(self) -> "LiveBytes":
        LiveBytes.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        LiveBytes.active.remove(self)
        return super().__exit__(*exc)

    def kernel(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) counted as one kernel: what it frees before returning (an emulation's
        temporaries) never raises the peak; its outputs do."""
        self.inside_kernel += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self.inside_kernel -= 1
            self.peak = max(self.peak, self.live)

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                key = id(st)
                if key not in self.sizes and key not in inputs:
                    self.sizes[key] = st.nbytes()
                    self.refs[key] = weakref.ref(st, lambda _, k=key: self._freed(k))
                    self.live += self.sizes[key]
        if not self.inside_kernel:
            self.peak = max(self.peak, self.live)
        return out


def as_kernels(backend: Any) -> Any:
    """An FP8 backend (`twinpipe.fp8.backend.Backend`) whose quantizers and GEMMs count as one kernel
    each under the innermost `LiveBytes` (`LiveBytes.kernel`): the emulation's fp32 temporaries (a
    dequantised weight, |x| for the amax) are not GPU memory, the outputs are."""
    import dataclasses

    def wrap(fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            mode = LiveBytes.active[-1] if LiveBytes.active else None
            return mode.kernel(fn, *args, **kwargs) if mode else fn(*args, **kwargs)
        return run

    names = ("act_quant", "weight_quant", "gemm", "grouped_gemm", "k_grouped_gemm")
    return dataclasses.replace(backend, **{n: wrap(getattr(backend, n)) for n in names})


class PeakMeter:
    """Peak memory above what is allocated when it is made (MB): the CUDA allocator's, or on the CPU the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS then."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
            self.base = _status_kib("VmRSS")

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_status_kib("VmHWM") - self.base) / 1024


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _amp(device: torch.device):
    """BF16 autocast on CUDA (as the trainer's train.dtype=bf16); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _train_setup(preset: str, seq_len: int, batch: int, recompute: Any, ce_chunk_mib: float, device: torch.device):
    """The model (recompute applied), our AdamW, one micro-batch and `step()`: forward, loss, backward, AdamW."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg).to(device)
    apply_recompute(model, recompute)
    opt = ZeroAdamW(model.named_parameters())
    loss_fn = PretrainLoss(0.3, cfg.num_nextn_predict_layers, ce_chunk_mib)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    mb = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    mb[GLOBAL_COUNTS] = loss_fn.normalizers(mb)

    def forward() -> torch.Tensor:
        with _amp(device):
            loss, _ = loss_fn(model.forward_train(mb["input_ids"]), mb)
        return loss

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        opt.reduce_gradients()
        opt.step(1e-4, min(1.0, 1.0 / (opt.grad_norm() + 1e-6)))
        opt.zero_grad()

    return cfg, model, opt, forward, backward


def counted(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
    """One step under `LiveBytes`: what the forward leaves held for the backward, and the step's peak (MB)."""
    with LiveBytes() as mem:
        out = forward()
        held = mem.live
        backward(out)
        del out
    return {"activations_mb": held / 2**20, "peak_mb": mem.peak / 2**20}


def step_case(preset: str, seq_len: int, batch: int, recompute: Any, ce_chunk_mib: float, steps: int,
              device: torch.device) -> dict:
    cfg, _, _, forward, backward = _train_setup(preset, seq_len, batch, recompute, ce_chunk_mib, device)
    step = lambda: backward(forward())  # noqa: E731
    step()  # warm-up: optimizer state allocated
    mem = counted(forward, backward)
    meter = PeakMeter(device)
    times = [_timed(step, device) for _ in range(steps)]
    return {"recompute": recompute, "ce_chunk_mib": ce_chunk_mib, **mem, "alloc_peak_mb": meter.peak_mb(),
            "step_s": statistics.median(times), "grad_mb": 4 * cfg.num_parameters() / 2**20}


def layer_case(preset: str, experts: int, seq_len: int, recompute: Any, steps: int, device: torch.device) -> dict:
    base = ModelConfig.preset(preset)
    top_k = min(base.num_experts_per_tok, experts)
    cfg = ModelConfig.preset(preset, num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=experts,
                             num_experts_per_tok=top_k, n_group=1, topk_group=1, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    block = Block(cfg, 0).to(device)
    apply_recompute(block, recompute)
    x = torch.randn(1, seq_len, cfg.hidden_size, device=device, requires_grad=True)  # [1, T, H]
    grad_out = torch.randn_like(x)

    def forward() -> torch.Tensor:
        with _amp(device):
            return block(x)

    def backward(y: torch.Tensor) -> None:
        y.backward(grad_out)
        x.grad = None
        block.zero_grad(set_to_none=True)

    step = lambda: backward(forward())  # noqa: E731
    step()
    mem = counted(forward, backward)
    meter = PeakMeter(device)
    times = [_timed(step, device) for _ in range(steps)]
    return {"recompute": recompute, **mem, "alloc_peak_mb": meter.peak_mb(), "step_s": statistics.median(times),
            "layer_params": sum(p.numel() for p in block.parameters()), "experts": experts, "top_k": top_k,
            "grad_mb": sum(4 * p.numel() for p in block.parameters()) / 2**20}


def ce_case(vocab: int, tokens: int, hidden: int, ce_chunk_mib: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)  # [N, H]
    w = (0.02 * torch.randn(vocab, hidden, device=device)).requires_grad_()  # [V, H]
    labels = torch.randint(0, vocab, (tokens,), device=device)  # [N]

    def forward() -> torch.Tensor:
        with _amp(device):
            if ce_chunk_mib:
                return linear_cross_entropy_sum(h, w, labels, rows_for_budget(ce_chunk_mib, vocab))
            return cross_entropy_sum(F.linear(h, w), labels)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        h.grad = w.grad = None

    step = lambda: backward(forward())  # noqa: E731
    step()
    mem = counted(forward, backward)
    meter = PeakMeter(device)
    seconds = _timed(step, device)
    grads = 4 * (tokens + vocab) * hidden / 2**20
    return {"vocab": vocab, "ce_chunk_mib": ce_chunk_mib, **mem, "alloc_peak_mb": meter.peak_mb(), "step_s": seconds,
            "fp32_logits_mb": 4 * tokens * vocab / 2**20, "grad_mb": grads, "peak_over_grads_mb": mem["peak_mb"] - grads}


def checkpoint_case(preset: str, seq_len: int, batch: int, async_save: bool, saves: int, steps_between: int,
                    folder: str, device: torch.device) -> dict:
    from twinpipe.trainer.checkpoint import io as ckpt
    from twinpipe.trainer.checkpoint import format as fmt
    from twinpipe.trainer.checkpoint.writer import CheckpointWriter

    _, model, opt, forward, backward = _train_setup(preset, seq_len, batch, "none", 256.0, device)
    step = lambda: backward(forward())  # noqa: E731
    step()
    plain = [_timed(step, device) for _ in range(steps_between)]
    writer = CheckpointWriter(async_save)
    stalls, during, written = [], [], []
    run_dir = Path(tempfile.mkdtemp(dir=folder))
    try:
        for i in range(1, saves + 1):
            state = fmt.training_state(model, opt, 0, 1)
            writer.save(run_dir, i, state, {fmt.RNG: ckpt.rng_state()}, {fmt.STEP: i}, "", None, 1)
            report = writer.report()  # sync: the write's figures too
            stalls.append(report.pop("checkpoint_stall_s"))
            during += [_timed(step, device) for _ in range(steps_between)]  # while an async write runs
            written += [report, writer.report()]
        writer.close()
        written.append(writer.report())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    writes = [w for w in written if "checkpoint_gb_per_s" in w]
    return {"async_save": async_save, "stall_s": stalls, "stall_s_after_first": statistics.mean(stalls[1:] or stalls),
            "checkpoint_gb": writes[-1]["checkpoint_gb"],
            "write_gb_per_s": statistics.median(w["checkpoint_gb_per_s"] for w in writes),
            "step_s_plain": statistics.median(plain), "step_s_while_saving": statistics.median(during)}


def _child(queue: Any, fn: Callable, args: tuple) -> None:
    import traceback

    torch.set_num_threads(args[-1])
    try:
        queue.put(fn(*args[:-1]))
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def isolated(fn: Callable, *args: Any, threads: int) -> dict:
    """fn(*args) in a fresh process (its own peak memory); its result dict."""
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, (*args, threads)))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__}{args}: failed in its process:\n{result['error']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="step,layer,ce,checkpoint")
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration (median)")
    ap.add_argument("--ce-chunk-mib", type=float, default=256.0)
    ap.add_argument("--layer-preset", default="v3_671b", choices=["tiny", "small", "v3_671b"])
    ap.add_argument("--layer-experts", type=int, default=16)
    ap.add_argument("--layer-seq-len", type=int, default=4096)
    ap.add_argument("--vocabs", default="32768,65536,129280,262144")
    ap.add_argument("--ce-tokens", type=int, default=4096)
    ap.add_argument("--ce-hidden", type=int, default=7168)
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--steps-between", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=None, help="where the checkpoint section writes (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds on a CPU (not figures to quote)")
    ap.add_argument("--recompute", default=None,
                    help="comma-separated options to run instead of all, the first the reference (a list as a+b: "
                         "none,norms+mla_up,full)")
    ap.add_argument("--out", default=None, help="the JSON (default bench/results/memory_<device>[_smoke].json)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.seq_len, args.steps, args.layer_preset, args.layer_experts = "tiny", 64, 1, "tiny", 4
        args.layer_seq_len, args.vocabs, args.ce_tokens, args.ce_hidden = 64, "4096,16384", 256, 64
        args.saves, args.steps_between, args.ce_chunk_mib = 2, 1, 1.0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = args.sections.split(",")
    options = RECOMPUTE if args.recompute is None else [
        o.split("+") if "+" in o else o for o in args.recompute.split(",")]
    iso = lambda fn, *a: isolated(fn, *a, threads=args.threads)  # noqa: E731
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                              "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "torch": torch.__version__,
                              "host": platform.node(), "threads": args.threads, "smoke": args.smoke, "args": vars(args),
                              "load_avg_1min_start": os.getloadavg()[0]}
    if "step" in sections:
        cases = [iso(step_case, args.preset, args.seq_len, args.batch, "none", 0.0, args.steps, device)]
        cases += [iso(step_case, args.preset, args.seq_len, args.batch, r, args.ce_chunk_mib, args.steps, device)
                  for r in options]
        result["step"] = _relative(cases, cases[1])
    if "layer" in sections:
        cases = [iso(layer_case, args.layer_preset, args.layer_experts, args.layer_seq_len, r, args.steps, device)
                 for r in options]
        result["layer"] = _relative(cases, cases[0])
    if "ce" in sections:
        result["ce"] = [iso(ce_case, int(v), args.ce_tokens, args.ce_hidden, mib, device)
                        for v in args.vocabs.split(",") for mib in (0.0, args.ce_chunk_mib)]
    if "checkpoint" in sections:
        folder = args.ckpt_dir or tempfile.gettempdir()
        sync, asyn = (iso(checkpoint_case, args.preset, args.seq_len, args.batch, a, args.saves, args.steps_between,
                          folder, device) for a in (False, True))
        result["checkpoint"] = {"sync": sync, "async": asyn,
                                "async_stall_over_sync": asyn["stall_s_after_first"] / sync["stall_s_after_first"]}
    result["load_avg_1min_end"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"memory_{device.type}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"saved {path}")


def _relative(cases: list[dict], ref: dict) -> list[dict]:
    """Each case with its activations, peak and step time over `ref`'s (no recomputation, same CE)."""
    for c in cases:
        c["activations_vs_none"] = c["activations_mb"] / ref["activations_mb"]
        c["peak_vs_none"] = c["peak_mb"] / ref["peak_mb"]
        c["time_vs_none"] = c["step_s"] / ref["step_s"]
    return cases


if __name__ == "__main__":
    main()
