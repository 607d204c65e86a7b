"""How much all-to-all time the overlapped forward-backward hides (CPU, gloo, expert parallelism).

Each of `--ep` ranks holds a pipeline stage of MoE blocks (MLA attention + expert-parallel MoE). One
measurement is "forward of micro-batch 0 + backward of micro-batch 1", run
  sequential: forward then backward; every collective is waited for right after it is issued, so the
              time blocked in `wait` is the whole communication time as the rank sees it;
  overlapped: `overlapped_forward_backward`; the time blocked in `wait` is the *exposed* communication.
hidden fraction = 1 - exposed / sequential wait time (median over iterations, mean over ranks).

    .venv/bin/python bench/ep_overlap.py            # prints a table, writes bench/results/ep_overlap.json

On a shared CPU the compute and gloo's copy threads compete for the same cores, so the figure is a
lower bound on what separate communication hardware gives; say so when quoting it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel import overlap
from twinpipe.parallel.expert_parallel import apply_expert_parallel
from twinpipe.parallel.local import run_local

RESULTS = Path(__file__).resolve().parent / "results" / "ep_overlap.json"


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return h


def _config(args) -> ModelConfig:
    return ModelConfig.preset(
        "tiny", hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers + 1, num_nextn_predict_layers=0, vocab_size=1024,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1, topk_group=1)


def _measure(stage: Stage, config: ModelConfig, args, rank: int, overlapped: bool, seed: int):
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
    return wall, overlap.COMM_STATS.wait_s, overlap.COMM_STATS.num_waits


def _rank(rank: int, world: int, args) -> dict:
    config = _config(args)
    torch.manual_seed(0)
    model = Transformer(config)
    apply_expert_parallel(model, dist.group.WORLD)
    stage = Stage(list(model.layers)[1:])
    out = {"sequential": [], "overlapped": []}
    for it in range(args.warmup + args.iters):
        for mode in ("sequential", "overlapped"):
            wall, wait, waits = _measure(stage, config, args, rank, mode == "overlapped", it)
            if it >= args.warmup:
                out[mode].append((wall, wait, waits))
    return {mode: {"wall_s": statistics.median(r[0] for r in rows),
                   "wait_s": statistics.median(r[1] for r in rows),
                   "collectives": rows[0][2]} for mode, rows in out.items()}


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
    seq_wait = statistics.mean(r["sequential"]["wait_s"] for r in per_rank)
    ovl_wait = statistics.mean(r["overlapped"]["wait_s"] for r in per_rank)
    result = {
        "bench": "ep_overlap",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "per_rank": per_rank,
        "sequential_wall_s": statistics.mean(r["sequential"]["wall_s"] for r in per_rank),
        "overlapped_wall_s": statistics.mean(r["overlapped"]["wall_s"] for r in per_rank),
        "sequential_comm_wait_s": seq_wait,
        "overlapped_exposed_wait_s": ovl_wait,
        "hidden_fraction": 1.0 - ovl_wait / seq_wait if seq_wait > 0 else 0.0,
    }
    print(f"ep={args.ep} tokens/rank={args.batch * args.seq} hidden={args.hidden} "
          f"collectives per F+B={per_rank[0]['sequential']['collectives']}")
    print(f"{'':12s}{'wall ms':>10s}{'comm wait ms':>14s}")
    print(f"{'sequential':12s}{1e3 * result['sequential_wall_s']:10.2f}{1e3 * seq_wait:14.2f}")
    print(f"{'overlapped':12s}{1e3 * result['overlapped_wall_s']:10.2f}{1e3 * ovl_wait:14.2f}")
    print(f"all-to-all time hidden: {100 * result['hidden_fraction']:.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
