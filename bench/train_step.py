"""Training-step throughput per model preset: tokens/s, peak memory and (on GPU) MFU.

One step = forward_train + pretraining loss (CE + 0.3 MTP) + backward + our AdamW (one rank, ZeRO-1
with dp = 1), on random token ids (throughput does not depend on the text). FP32 on CPU; BF16 autocast
on GPU with MFU against the GPU's dense BF16 peak (trainer/flops.py documents the FLOP count).
Needs only torch (no Hydra/DeepSpeed), so it runs on the lent GPU image as is.

    python bench/train_step.py                       # tiny on CPU
    python bench/train_step.py --preset small --batch 8 --seq-len 2048   # on a GPU
    python bench/train_step.py --preset small --fp8 auto  # FP8 block-scaled GEMMs (compare with --fp8 off)
    python bench/train_step.py --preset v3_671b      # too big for one device: FLOPs/token only

Writes bench/results/train_step_<preset>_<device>[_fp8-<backend>].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from twinpipe.model.config import ModelConfig
from twinpipe.model.transformer import Transformer
from twinpipe.trainer.flops import flops_per_token, peak_flops
from twinpipe.trainer.loss import GLOBAL_COUNTS, PretrainLoss
from twinpipe.trainer.optim.zero import ZeroAdamW

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(preset: str, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device,
          dtype: str, fp8: str = "off") -> dict:
    cfg = ModelConfig.preset(preset)
    result = {"preset": preset, "device": str(device), "dtype": dtype, "fp8": fp8, "batch": batch,
              "seq_len": seq_len,
              "params": cfg.num_parameters(), "flops_per_token": flops_per_token(cfg, seq_len),
              "torch": torch.__version__, "host": platform.node(), "threads": torch.get_num_threads()}
    if preset == "v3_671b":
        result["skipped"] = "671B parameters do not fit one device; FLOPs per token only"
        return result
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if fp8 != "off":
        from twinpipe.fp8 import convert_model

        convert_model(model, fp8)
    opt = ZeroAdamW(model.named_parameters())  # decay all but norms (trainer/optim/optimizer.py)
    loss_fn = PretrainLoss(0.3, mtp_depths=cfg.num_nextn_predict_layers)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    mb = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    mb[GLOBAL_COUNTS] = loss_fn.normalizers(mb)  # one micro-batch: its own counts are the global ones
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" and device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    rss0 = _rss_mb()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            out = model.forward_train(mb["input_ids"])
            loss, _ = loss_fn(out, mb)
        loss.backward()
        opt.reduce_gradients()
        opt.step(1e-4, min(1.0, 1.0 / (opt.grad_norm() + 1e-6)))
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median
    result.update(step_s_median=step_s, tokens_per_s=batch * seq_len / step_s, loss_last=float(loss.detach()))
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        peak = peak_flops(None, fp8=fp8 != "off")
        if peak:
            result["peak_tflops"] = peak / 1e12
            result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak
    else:
        result["peak_rss_mb"] = _rss_mb()
        result["rss_growth_mb"] = _rss_mb() - rss0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "v3_671b"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--fp8", default="off", choices=["off", "emulate", "triton", "cublas", "auto"],
                    help="swap Linear layers and experts for FP8 ones (twinpipe.fp8.convert_model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    result = bench(args.preset, args.batch, args.seq_len, args.steps, args.warmup, device, dtype, args.fp8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.fp8 == "off" else f"_fp8-{args.fp8}"
    path = RESULTS / f"train_step_{args.preset}_{device.type}{suffix}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
