"""What `fp8.cache_transposed: false` costs in time: the FP8 weight transposes every backward makes.

With the transposes not kept (`fp8/weight_cache.py`), each backward through a pipeline stage makes
Dgrad's FP8 Wᵀ of every FP8 weight of that stage from the cached W (`WeightCache.get_transposed`: the
E4M3 values and the 128x128 block scales transposed into contiguous copies) instead of reading a
kept one. This times exactly that copy for the FP8 weights one rank of a recipe holds (shapes from
`twinpipe-plan`'s meta model of that rank, default a middle pipeline rank of recipes/pretrain_v3.yaml),
one weight at a time on this machine's device, and reports per backward (one stage) and per step
(train.global_batch / (micro_batch x dp) micro-batches, each through one of the rank's stages), with
the bytes moved and the HBM roofline of the plan's GPU beside it (read + write of every transpose:
what `twinpipe-plan` adds to the step's compute).

    flock /tmp/bench.lock .venv/bin/python bench/fp8_transposes.py        # bench/results/fp8_transposes_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from hydra import compose, initialize_config_module

    from twinpipe.trainer import config
    from twinpipe.trainer.cli import plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides, as for twinpipe-plan")
    ap.add_argument("--config-name", default="pretrain_v3")
    ap.add_argument("--rank", type=int, default=None, help="default: dp rank 0 of the middle pipeline rank")
    ap.add_argument("--gpu", default="H800", choices=list(plan.GPUS), help="for the HBM roofline beside it")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    config.set_offline_defaults()
    config.register()
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose(args.config_name, overrides=["run.dir=plan", *args.overrides])
    config.validate(cfg)
    p = cfg.parallel
    rank = args.rank if args.rank is not None else (p.pp // 2) * p.dp
    grid = plan.fake_grid(p.pp * p.dp, rank, p.pp, p.dp, p.ep)
    try:
        model, local = plan.held_parameters(cfg, grid)
    finally:
        dist.destroy_process_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = moved = 0.0
    shapes = []
    for weights in plan.fp8_weights(model, local):
        for w in weights:
            *batch, n, k = w.shape
            nb, kb = -(-n // 128), -(-k // 128)
            q = torch.empty(*batch, nb * 128, kb * 128, dtype=torch.float8_e4m3fn, device=device)[..., :n, :k]
            s = torch.ones(*batch, nb, kb, device=device)                      # q: a view of whole blocks
            seconds += _timed(lambda: (q.transpose(-1, -2).contiguous(), s.transpose(-1, -2).contiguous()),
                              device, args.reps)
            moved += 2 * (w.numel() + 4 * nb * kb * (w.numel() // (n * k)))    # read and written
            shapes.append(list(w.shape))
    stages, micro_batches = plan.stages_held(cfg), plan.chunks(cfg)
    gpu = plan.GPUS[args.gpu]
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, recipe=args.config_name, overrides=args.overrides, rank=rank,
                  fp8_weights=len(shapes), stages_held=stages, micro_batches_per_step=micro_batches,
                  transposes_gib_per_backward=moved / 2 / stages / 2 ** 30,
                  measured_s_per_backward=seconds / stages, measured_s_per_step=seconds / stages * micro_batches,
                  measured_gb_s=moved / seconds / 1e9,
                  roofline_gpu=gpu.name, roofline_s_per_step=moved / stages * micro_batches / (gpu.hbm_tb_s * 1e12),
                  load_avg_1min=os.getloadavg()[0])
    out = args.out or RESULTS / f"fp8_transposes_{device.type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
