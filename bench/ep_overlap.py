"""How much all-to-all time the overlapped forward-backward hides (CPU, gloo, expert parallelism).

Each of `--ep` ranks holds a pipeline stage of MoE blocks (MLA attention + expert-parallel MoE). One
measurement is "forward of micro-batch 0 + backward of micro-batch 1", run
  sequential: forward then backward; every collective is waited for right after it is issued, so the
              time blocked in `wait` is the whole communication time as the rank sees it;
  overlapped: `overlapped_forward_backward`; the time blocked in `wait` is the *exposed* communication
              (the forward's all-to-alls behind backward segments, the backward's behind forward
              chunks: `parallel/experts/overlap.py`).
hidden fraction = 1 - exposed / sequential wait time, where a collective's time is the wait of the
last rank to arrive at it (min over ranks: the others also wait for that rank, which on a shared CPU
is scheduling skew, not communication); medians over iterations. The JSON also holds the plain
mean-over-ranks figure (skew included), and a calibration: one dispatch-sized all-to-all timed with
the ranks idle and lined up, the transfer alone.

    .venv/bin/python bench/ep_overlap.py            # prints a table, writes bench/results/ep_overlap.json

On a shared CPU the compute and gloo's copy threads compete for the same cores, so the figure is a
lower bound on what separate communication hardware gives; say so when quoting it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.experts import overlap
from twinpipe.parallel.experts.layer import apply_expert_parallel
from twinpipe.parallel.local import run_local

RESULTS = Path(__file__).resolve().parent / "results" / "ep_overlap.json"


def _config(args) -> ModelConfig:
    return ModelConfig.preset(
        "tiny", hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers + 1, num_nextn_predict_layers=0, vocab_size=1024,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1, topk_group=1)


def _measure(stage: nn.Sequential, config: ModelConfig, args, rank: int, overlapped: bool, seed: int):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    shape = (args.batch, args.seq, config.hidden_size)
    inputs1 = torch.randn(shape, generator=g).requires_grad_()
    outputs1 = stage(inputs1)
    grads1 = torch.randn(shape, generator=g)
    inputs0 = torch.randn(shape, generator=g).requires_grad_()
    dist.barrier()
    overlap.COMM_STATS.reset()
    t0 = time.perf_counter()
    if overlapped:
        overlap.overlapped_forward_backward(stage, [inputs0], None, [], stage, None, [outputs1], [grads1])
    else:
        overlap.forward_chunk(stage, [inputs0], None, [])
        overlap.backward_chunk(None, [outputs1], [grads1])
    wall = time.perf_counter() - t0
    stage.zero_grad(set_to_none=True)
    return wall, list(overlap.COMM_STATS.waits)


def _exchange_alone(args, world: int) -> float:
    """Calibration: one all-to-all of a dispatch's size (tokens x top-k rows of `hidden` fp32, split
    evenly) with nothing else running on the ranks, the ranks lined up by a barrier first; median
    seconds. About what one data exchange costs when it has the cores to itself."""
    rows = args.batch * args.seq * args.top_k
    x = torch.randn(rows - rows % world, args.hidden)
    out = torch.empty_like(x)
    times = []
    for _ in range(args.warmup + 2 * args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[args.warmup:])


def _rank(rank: int, world: int, args) -> dict:
    config = _config(args)
    torch.manual_seed(0)
    model = Transformer(config)
    apply_expert_parallel(model, dist.group.WORLD)
    stage = nn.Sequential(*model.layers[1:])  # blocks h [B, T, H] -> h, causal
    out = {"sequential": [], "overlapped": [], "exchange_alone_s": _exchange_alone(args, world)}
    for it in range(args.warmup + args.iters):
        for mode in ("sequential", "overlapped"):
            wall, waits = _measure(stage, config, args, rank, mode == "overlapped", it)
            if it >= args.warmup:
                out[mode].append({"wall_s": wall, "waits_s": waits})
    return out


def _summary(per_rank: list[dict], mode: str) -> dict:
    """Medians over iterations of: wall time and total wait (mean over ranks), and the *critical*
    wait: per collective the wait of the last rank to arrive (min over ranks), summed."""
    iters = len(per_rank[0][mode])
    walls, waits, critical = [], [], []
    for it in range(iters):
        rows = [r[mode][it] for r in per_rank]
        walls.append(statistics.mean(row["wall_s"] for row in rows))
        waits.append(statistics.mean(sum(row["waits_s"]) for row in rows))
        critical.append(sum(min(ws) for ws in zip(*(row["waits_s"] for row in rows))))
    return {"wall_s": statistics.median(walls), "wait_s": statistics.median(waits),
            "critical_wait_s": statistics.median(critical),
            "collectives": len(per_rank[0][mode][0]["waits_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="MoE blocks in the stage")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    per_rank = run_local(_rank, args.ep, args, threads_per_rank=args.threads)
    seq, ovl = _summary(per_rank, "sequential"), _summary(per_rank, "overlapped")
    result = {
        "bench": "ep_overlap",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "sequential": seq,
        "overlapped": ovl,
        # all waits, ranks averaged: includes waiting for a slower peer (skew on a shared CPU)
        "hidden_fraction_mean_wait": 1.0 - ovl["wait_s"] / seq["wait_s"] if seq["wait_s"] > 0 else 0.0,
        # per collective the last arriver's wait: transfer time, skew excluded
        "hidden_fraction": (1.0 - ovl["critical_wait_s"] / seq["critical_wait_s"]
                            if seq["critical_wait_s"] > 0 else 0.0),
        # one dispatch-sized all-to-all with the ranks idle and lined up (max over ranks), times the
        # data exchanges of one F+B (2 per MoE block each way): the transfer time alone
        "exchange_alone_s": max(r["exchange_alone_s"] for r in per_rank),
        "exchanges_per_fb": 4 * args.layers,
        "load_avg_1min": os.getloadavg()[0],
        "per_rank": per_rank,
    }
    print(f"ep={args.ep} tokens/rank={args.batch * args.seq} hidden={args.hidden} "
          f"waited collectives per F+B={seq['collectives']}")
    print(f"{'':12s}{'wall ms':>10s}{'wait ms (mean rank)':>22s}{'wait ms (last arriver)':>25s}")
    for name, r in (("sequential", seq), ("overlapped", ovl)):
        print(f"{name:12s}{1e3 * r['wall_s']:10.2f}{1e3 * r['wait_s']:22.2f}{1e3 * r['critical_wait_s']:25.2f}")
    print(f"one dispatch-sized all-to-all alone: {1e3 * result['exchange_alone_s']:.2f} ms x "
          f"{result['exchanges_per_fb']} data exchanges per F+B; load {result['load_avg_1min']:.1f}")
    print(f"all-to-all time hidden: {100 * result['hidden_fraction']:.1f}% (last arriver), "
          f"{100 * result['hidden_fraction_mean_wait']:.1f}% (all waits, skew included)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
