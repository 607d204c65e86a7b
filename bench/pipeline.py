"""Pipeline schedules on CPU ranks (gloo) with stages of controlled cost: timelines, bubbles, memory.

    .venv/bin/python bench/pipeline.py                      # PP=4 and PP=8, all schedules
    .venv/bin/python bench/pipeline.py --pp 4 --f-ms 50 --b-ms 100 --w-ms 40 --schedules dualpipe 1f1b
    .venv/bin/python bench/pipeline.py --stages v3         # real V3 blocks, measured F/B/W (pipeline_v3.py)

Ours (DualPipe, DualPipeV, 1F1B from twinpipe.parallel) and torch.distributed.pipelining's
(Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV) run the same model:
each rank's share of it costs F to run forward, B for the full backward, of which W is the weight-gradient
part, per micro-batch. Costs are *sleeps* (the machine is shared; a sleeping rank leaves the cores to
the others, so the timeline is the schedule's, not the load's). Schedules with one stage per rank
(1F1B, DualPipe -- whose two stages are each a full 1/PP of the layers) give each stage F, B, W;
schedules with two stages per rank (V shapes, interleaved) give each stage F/2, B/2, W/2. Weight
gradients are split off B where a schedule defers them (our WeightGradStore; torch's `dw_builder`).

`dualpipe_overlap` / `dualpipev_overlap` run ours with an overlap hook that runs the paired backward on
a second thread during the forward (F&B = max(F, B)): the case DualPipe is designed for, where one
chunk's communication hides behind the other's compute. Per rank: busy = time inside F/B/W spans; bubble = step span (first start to last end over all ranks)
- busy. Formula (docs/reference.md §4, with the chunk costs of the schedule's stage, PP = its
number of stages, and F&B = F + B since the default overlap hook runs them one after the other):
1F1B (PP-1)(F+B); DualPipe and DualPipeV (PP/2-1)(F&B+B-3W). Peak activation memory: the most micro-batch activations alive at
once on a rank, in units of one rank-share activation (a half-size stage counts 1/2).
Writes bench/results/pipeline.json and one PNG timeline per schedule and PP (pipeline_v3* for
`--stages v3`, whose formula takes the F, B, W medians measured in the same run and whose JSON adds W's
share of the backward).

With `--stages v3` every op's own CPU time is recorded too (its thread's, so waiting for a core is not
in it) and the step is *replayed* as if each rank had a core to itself (`pipeline_v3.replay`): each rank
runs its ops in the order it ran them for their CPU time, a forward starts once the previous stage's
forward of that micro-batch ended, a backward once the next stage's backward did (transfers cost
nothing). Its bubble is the schedule's with the measured op costs, whatever the machine's core count;
the wall-clock figures beside it show what 2 shared cores did to the same run (JSON `replayed`, and
`pipeline_v3_<schedule>_pp<N>_replayed.png`).

`--stages v3` also runs torch's Schedule1F1B, ScheduleZBVZeroBubble and ScheduleDualPipeV on the same
stages and model (every schedule runs the same blocks: `pipeline_v3.stage_split`), deferring the same
weight gradients as ours (our split through torch's `dw_builder`); their gradients equal ours bit for
bit (tests/parallel/test_pipeline_replay.py). Since one op measures 5-15% apart from run to run on a
shared machine, every schedule of a PP is replayed once more at one cost table, the medians of the V
shapes' ops (`pipeline_v3.common_costs`, JSON `replayed_common`): those figures differ only by
schedule. Both replays are repeated with expert all-to-all added (`--comm-ratios`: r x a stage's
forward compute in each forward and each backward; W moves nothing): waited for in full, and for our
DualPipe/DualPipeV also with the overlap (`parallel/experts/overlap.py`) hiding `--hidden-fraction` of
each F&B pair's, the share `bench/ep_overlap.py` measures (`comm_sweep`, `pipeline_v3_comm_pp<N>.png`).
The all-to-all is a model there: on CPU ranks without expert parallelism nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F_
from torch import nn

from twinpipe.parallel.dualpipe import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from twinpipe.parallel.local import run_local
from twinpipe.parallel.pipeline.one_f_one_b import OneFOneB
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore

log = logging.getLogger("bench.pipeline")
RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, MICRO = 16, 2
OURS = ("dualpipe", "dualpipev", "1f1b")
OVERLAPPED = ("dualpipe_overlap", "dualpipev_overlap")
TORCH = ("torch_1f1b", "torch_interleaved_1f1b", "torch_zbv", "torch_dualpipev")
TORCH_V3 = ("torch_1f1b", "torch_zbv", "torch_dualpipev")  # --stages v3 (pipeline_v3.run_torch_rank)


class Recorder:
    """Spans of compute (kind, stage, start, end) and live activations of this process."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float, float]] = []
        self.live = 0.0
        self.peak = 0.0

    def span(self, kind: str, stage: int, seconds: float) -> None:
        t0 = time.perf_counter()
        time.sleep(seconds)
        self.events.append((kind, stage, t0, time.perf_counter()))

    def activation(self, delta: float) -> None:
        with LOCK:  # the overlap variants run a backward on a second thread
            self.live += delta
            self.peak = max(self.peak, self.live)


LOCK = threading.Lock()
REC = Recorder()


def threaded_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                              output_grads1):
    """An `overlapped_forward_backward` hook that runs the backward on a second thread *during* the
    forward. With sleep costs this models perfect overlap (F&B = max(F, B)), the situation DualPipe is
    built for: one chunk's all-to-all hidden behind the other's compute on a GPU."""
    def backward():
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            torch.autograd.backward(outputs1, grad_tensors=output_grads1)

    worker = threading.Thread(target=backward)
    worker.start()
    outputs0 = module0(*inputs0)
    outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    worker.join()
    return outputs0, loss0


class _StoreOp(torch.autograd.Function):
    """y = x * w; backward splits into B (input grad) and W, deferred to WeightGradStore if enabled."""

    @staticmethod
    def forward(ctx, x, w, stage):
        REC.span("F", stage.index, stage.f)
        REC.activation(stage.size)
        ctx.save_for_backward(x, w)
        ctx.stage = stage
        return x * w  # [micro, hidden]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stage = ctx.stage
        REC.span("B", stage.index, stage.b - stage.w)
        REC.activation(-stage.size)

        def weight_grad():
            REC.span("W", stage.index, stage.w)
            gw = (g * x).sum(0)
            stage.weight.grad = gw if stage.weight.grad is None else stage.weight.grad + gw

        if stage.torch_split:  # torch's schedules run it through the stage's dw_builder
            stage.deferred.append(weight_grad)
        elif WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return g * w, None, None


class TimedStage(nn.Module):
    def __init__(self, index: int, f: float, b: float, w: float, size: float, torch_split: bool):
        super().__init__()
        self.index, self.f, self.b, self.w, self.size = index, f, b, w, size
        self.torch_split = torch_split
        self.deferred: list = []  # weight-gradient closures of backwards run so far (torch_split)
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):  # x: [micro, hidden]
        return _StoreOp.apply(x, self.weight, self)

    def dw_builder(self):
        """torch's PipelineStage hook, called right after a backward: the W of that backward."""
        return self.deferred.pop()


def placement(schedule: str, pp: int, rank: int) -> tuple[int, list[int]]:
    """(number of stages, this rank's stage indices in the order the schedule takes them)."""
    if schedule in ("1f1b", "torch_1f1b"):
        return pp, [rank]
    if schedule in ("dualpipe", "dualpipe_overlap"):
        return pp, [rank, pp - 1 - rank]
    if schedule == "torch_interleaved_1f1b":
        return 2 * pp, [rank, rank + pp]
    return 2 * pp, [rank, 2 * pp - 1 - rank]  # V shapes


def mse(out, target):
    return F_.mse_loss(out, target)


def _run(rank: int, world: int, schedule: str, costs: dict, num_chunks: int, reps: int) -> dict:
    n_stages, ids = placement(schedule, world, rank)
    scale = world / n_stages  # a stage is 1/PP or 1/(2PP) of the model
    stages = [TimedStage(i, costs["f"] * scale, costs["b"] * scale, costs["w"] * scale, scale,
                         schedule.startswith("torch")) for i in ids]
    x = torch.randn(num_chunks * MICRO, HIDDEN)
    target = torch.randn(num_chunks * MICRO, HIDDEN)
    step = _builder(schedule, stages, ids, n_stages, world, rank, num_chunks, x, target)
    timings = []
    for _ in range(reps):
        dist.barrier()
        REC.__init__()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        for s in stages:
            s.weight.grad = None
        timings.append((t0, t1, list(REC.events), REC.peak))
    t0, t1, events, peak = timings[-1]  # the last repetition (the first warms up shapes and groups)
    return {"t0": t0, "t1": t1, "events": events, "peak_activations": peak}


def _builder(schedule, stages, ids, n_stages, world, rank, num_chunks, x, target):
    if schedule in OURS + OVERLAPPED:
        hook = threaded_forward_backward if schedule in OVERLAPPED else None
        set_p2p_tensor_shapes([(MICRO, HIDDEN)])
        set_p2p_tensor_dtype(torch.float32)
        if schedule == "1f1b":
            pipe = OneFOneB(stages[0])
            feed = ([x] if rank == 0 else [], [target] if rank == world - 1 else [])
        elif schedule in ("dualpipe", "dualpipe_overlap"):
            pipe = DualPipe(tuple(stages), overlapped_forward_backward=hook)
            hx, ht = x.chunk(2), target.chunk(2)
            feed = ([hx[0]], [ht[1]]) if rank == 0 else ([hx[1]], [ht[0]]) if rank == world - 1 \
                else ([], [])
        else:
            pipe = DualPipeV(tuple(stages), overlapped_forward_backward=hook)
            feed = ([x], [target]) if rank == 0 else ([], [])
        return lambda: pipe.step(*feed[0], num_chunks=num_chunks, criterion=mse, labels=feed[1])

    from torch.distributed.pipelining import PipelineStage, schedules

    pstages = [PipelineStage(s, i, n_stages, torch.device("cpu"), dw_builder=s.dw_builder)
               for s, i in zip(stages, ids)]
    cls = {"torch_1f1b": schedules.Schedule1F1B, "torch_interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
           "torch_zbv": schedules.ScheduleZBVZeroBubble, "torch_dualpipev": schedules.ScheduleDualPipeV}[schedule]
    sched = cls(pstages[0] if schedule == "torch_1f1b" else pstages, num_chunks, loss_fn=mse, scale_grads=False)
    first, last = 0 in ids, (n_stages - 1) in ids

    def step():
        kwargs = {"target": target, "losses": []} if last else {}
        sched.step(*([x] if first else []), **kwargs)
    return step


def bubble_formula(schedule: str, stages: int, f: float, b: float, w: float) -> float | None:
    """docs/reference.md §4 with the schedule's own chunk costs and PP = its number of stages
    (the table compares schedules at the same stage count): DualPipeV's 2N stages on N ranks use
    PP = 2N."""
    if schedule in ("1f1b", "torch_1f1b"):
        return (stages - 1) * (f + b)
    if schedule in ("dualpipe", "dualpipev", "torch_dualpipev"):
        return (stages / 2 - 1) * ((f + b) + b - 3 * w)
    if schedule in OVERLAPPED:  # F&B = max(F, B) under perfect overlap
        return (stages / 2 - 1) * (max(f, b) + b - 3 * w)
    return None


def union_length(spans: list[tuple[float, float]]) -> float:
    """Time covered by the spans (overlapping F and B of the overlap variants count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def analyse(schedule: str, pp: int, costs: dict, num_chunks: int, results: list[dict],
            measured: bool = False) -> dict:
    """Step span, busy time and bubble per rank, against the formula. `costs` (seconds): a rank's
    share of F, B, W (sleep stages), or with `measured` one stage's measured F, B, W (V3 stages)."""
    start = min(r["t0"] for r in results)
    end = max(max((e[3] for e in r["events"]), default=r["t1"]) for r in results)
    span = end - start
    busy = [union_length([(e[2], e[3]) for e in r["events"]]) for r in results]
    bubbles = [span - b for b in busy]
    n_stages, _ = placement(schedule, pp, 0)
    scale = 1.0 if measured else pp / n_stages
    f, b, w = costs["f"] * scale, costs["b"] * scale, costs["w"] * scale
    formula = bubble_formula(schedule, n_stages, f, b, w)
    return {"schedule": schedule, "pp": pp, "num_chunks": num_chunks, "stages": n_stages,
            "stage_costs_ms": {"F": f * 1e3, "B": b * 1e3, "W": w * 1e3},
            "w_share_of_backward": w / b if b else None,
            "step_ms": span * 1e3, "ideal_busy_ms": num_chunks * (f + b) * n_stages / pp * 1e3,
            "busy_ms_per_rank": [x * 1e3 for x in busy],
            "bubble_ms_per_rank": [x * 1e3 for x in bubbles],
            "bubble_ms_mean": sum(bubbles) / len(bubbles) * 1e3, "bubble_ms_max": max(bubbles) * 1e3,
            "bubble_formula_ms": formula * 1e3 if formula is not None else None,
            "peak_activations_per_rank": [r["peak_activations"] for r in results],
            "timeline": [[(k, s, (t0 - start) * 1e3, (t1 - start) * 1e3) for k, s, t0, t1 in r["events"]]
                         for r in results]}


def plot(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"F": "#4c72b0", "B": "#dd8452", "b": "#f0b27a", "W": "#55a868"}  # b: input-grad-only B
    pp = entry["pp"]
    fig, ax = plt.subplots(figsize=(12, 0.45 * pp + 1.2))
    for rank, events in enumerate(entry["timeline"]):
        for kind, stage, t0, t1 in events:
            ax.broken_barh([(t0, t1 - t0)], (pp - 1 - rank - 0.4, 0.8), facecolors=colors[kind],
                           edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(pp), [f"rank {pp - 1 - r}" for r in range(pp)])
    ax.set_xlabel("ms")
    formula = entry["bubble_formula_ms"]
    ax.set_title(f"{entry['schedule']} PP={pp}, {entry['num_chunks']} micro-batches: step "
                 f"{entry['step_ms']:.0f} ms, bubble mean {entry['bubble_ms_mean']:.0f} ms"
                 + (f" (formula {formula:.0f})" if formula is not None else ""))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", ncols=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def common_replays(runs: dict[str, list[dict]], entries: list[dict], args, prefix: str) -> None:
    """--stages v3: every schedule of one PP replayed again at one cost table (`pipeline_v3.common_costs`
    from the V shapes' runs), entry["replayed_common"]; prints the bubbles and the all-to-all sweep and
    plots it."""
    from twinpipe.bench.pipeline_v3 import V_SHAPES, comm_table, common_costs, plot_comm, replayed, stage_costs_of

    v_runs = [results for schedule, results in runs.items() if schedule in V_SHAPES]
    if not v_runs:
        print("no V-shaped schedule ran: no common cost table (run dualpipev or torch_zbv too)")
        return
    costs = common_costs(v_runs)
    for entry in entries:
        schedule = entry["schedule"]
        rep = replayed(schedule, runs[schedule], entry["stages"], bubble_formula, tuple(args.comm_ratios),
                       args.hidden_fraction, stage_costs_of(costs, schedule))
        entry["replayed_common"] = rep
        formula = rep["bubble_formula_ms"]
        together = rep["pairs_together"]
        print(f"PP={entry['pp']} {schedule:24s} replayed at common costs: step {rep['step_ms']:7.1f} ms  bubble "
              f"mean {rep['bubble_ms_mean']:6.1f} max {rep['bubble_ms_max']:6.1f} ms  formula "
              f"{formula if formula is None else round(formula, 1)}"
              + (f"  (F&B pairs together: step {together['step_ms']:.1f}, bubble {together['bubble_ms_mean']:.1f})"
                 if together else ""), flush=True)
    if args.comm_ratios:
        print(comm_table(entries, "replayed_common"), flush=True)
        plot_comm(entries, args.out.parent / f"{prefix}_comm_pp{entries[0]['pp']}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--schedules", nargs="+", default=[*OURS, *OVERLAPPED, *TORCH])
    parser.add_argument("--f-ms", type=float, default=200.0)
    parser.add_argument("--b-ms", type=float, default=400.0)
    parser.add_argument("--w-ms", type=float, default=160.0)
    parser.add_argument("--chunks-per-rank", type=int, default=2, help="num_chunks = this x PP")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--stages", choices=["sleep", "v3"], default="sleep",
                        help="sleep: stages of the given costs; v3: real DeepSeek-V3 blocks, costs measured "
                             "(ours and torch's 1F1B, ZBV and DualPipeV; bench/pipeline_v3.py)")
    parser.add_argument("--blocks-per-stage", type=int, default=4,
                        help="--stages v3: blocks on every stage but the last (1 block + MTP + heads), so the "
                             "stages cost about the same; 0: 2 blocks per rank, evenly")
    parser.add_argument("--comm-ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0],
                        help="--stages v3: replay again with expert all-to-all of this many times each "
                             "stage's forward compute in every forward and backward")
    parser.add_argument("--hidden-fraction", type=float, default=0.84,
                        help="--stages v3: share of an F&B pair's all-to-all the overlap hides (default: "
                             "the lower of bench/ep_overlap.py's gloo figures, 0.84 at ep=4; 1.00 at ep=2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/pipeline.json (pipeline_v3.json for --stages v3)")
    args = parser.parse_args()
    v3 = args.stages == "v3"
    prefix = "pipeline_v3" if v3 else "pipeline"
    args.out = args.out or RESULTS / f"{prefix}.json"
    if v3:
        args.schedules = [s for s in args.schedules if s in OURS + TORCH_V3]
        if not 0.0 <= args.hidden_fraction <= 1.0:
            parser.error(f"--hidden-fraction {args.hidden_fraction}: must be in [0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    costs = {"f": args.f_ms / 1e3, "b": args.b_ms / 1e3, "w": args.w_ms / 1e3}
    entries = []
    for pp in args.pp:
        num_chunks = args.chunks_per_rank * pp
        runs: dict[str, list[dict]] = {}  # --stages v3: each schedule's per-rank results
        for schedule in args.schedules:
            if v3:
                from twinpipe.bench.pipeline_v3 import cpu_share, measured_costs, replayed, run_rank, run_torch_rank

                run = run_torch_rank if schedule in TORCH_V3 else run_rank
                results = run_local(run, pp, schedule, num_chunks, args.reps, args.blocks_per_stage, timeout_s=900)
                entry = analyse(schedule, pp, measured_costs(results), num_chunks, results, measured=True)
                entry.update(cpu_share(results, entry), load_avg_1min=os.getloadavg()[0])
                entry["replayed"] = replayed(schedule, results, entry["stages"], bubble_formula,
                                             tuple(args.comm_ratios), args.hidden_fraction)
                runs[schedule] = results
                rep = entry["replayed"]
                plot({**entry, **rep}, args.out.parent / f"{prefix}_{schedule}_pp{pp}_replayed.png")
                print(f"PP={pp} {schedule:24s} replayed on dedicated cores: step {rep['step_ms']:7.1f} ms  "
                      f"bubble mean {rep['bubble_ms_mean']:6.1f} max {rep['bubble_ms_max']:6.1f} ms  formula "
                      f"{rep['bubble_formula_ms'] if rep['bubble_formula_ms'] is None else round(rep['bubble_formula_ms'], 1)}"
                      f"  (stage CPU ms F {rep['stage_cpu_ms']['F']:.1f} B {rep['stage_cpu_ms']['B']:.1f} "
                      f"W {rep['stage_cpu_ms']['W']:.1f})", flush=True)
            else:
                results = run_local(_run, pp, schedule, costs, num_chunks, args.reps, timeout_s=300)
                entry = analyse(schedule, pp, costs, num_chunks, results)
            plot(entry, args.out.parent / f"{prefix}_{schedule}_pp{pp}.png")
            formula = entry["bubble_formula_ms"]
            print(f"PP={pp} {schedule:24s} step {entry['step_ms']:7.1f} ms  bubble mean "
                  f"{entry['bubble_ms_mean']:6.1f} max {entry['bubble_ms_max']:6.1f} ms  formula "
                  f"{formula if formula is None else round(formula, 1)}  W share "
                  f"{entry['w_share_of_backward']:.2f}  peak act {entry['peak_activations_per_rank']}"
                  + (f"  CPU share of busy time {entry['cpu_share_of_busy_mean']:.2f} ({entry['cores']} "
                     f"cores), load {entry['load_avg_1min']:.1f}" if v3 else ""), flush=True)
            entries.append(entry)
        if v3:
            common_replays(runs, [e for e in entries if e["pp"] == pp], args, prefix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if v3:
        from twinpipe.bench.pipeline_v3 import SEQ, v3_config

        meta = {"model": {k: v for k, v in vars(v3_config(1)).items() if isinstance(v, (int, float, str))},
                "seq_len": SEQ, "micro_batch": 1, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "blocks_per_stage": args.blocks_per_stage, "comm_ratios": args.comm_ratios,
                "hidden_fraction": args.hidden_fraction,
                "note": "real V3 blocks on gloo CPU ranks, one thread each, the same model under every schedule "
                        "(pipeline_v3.stage_split); stage costs are the medians measured in the same run; with "
                        "more ranks than cores the ranks share cores, so compare the replayed figures"}
    else:
        meta = {"costs_ms": {"F": args.f_ms, "B": args.b_ms, "W": args.w_ms}, "torch": torch.__version__,
                "cpu_count": os.cpu_count(), "note": "sleep-based stage costs on gloo CPU ranks"}
    args.out.write_text(json.dumps({"meta": meta, "runs": entries}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
