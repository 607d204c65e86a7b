"""One pipeline rank running real DeepSeek-V3 stages, with every F, B and W chunk timed (`bench/pipeline.py
--stages v3`).

The model is V3-shaped (MLA, one dense block then MoE blocks with 16 routed experts, top-4 in 4
groups, one shared expert, MTP) with `blocks_per_stage` blocks on every stage but the last, which holds
one block with the MTP block and the heads (`stage_split`: the stages then cost about the same), sized
so a block takes about ten milliseconds on one CPU thread. Under DualPipe and DualPipeV the weight
gradients are split off every layer (`parallel.pipeline.zero_bubble`, as `parallelize` does), so the
W chunks hold the real weight-gradient GEMMs. The step is the trainer's (`PipelineRunner.run`: its
placement, criterion, P2P) without the gradient sum over DualPipe's mirror pair, which is not part of
the schedule.

Spans recorded per rank (time.perf_counter, one clock for all processes): `F` a stage forward, `B` a
full backward, `b` a zero-bubble backward (input gradients only), `W` one deferred weight-gradient
chunk. F&B chunks run forward then backward (no overlap) and are recorded as their F and B.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from twinpipe.model.config import ModelConfig
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.pipeline.runner import PipelineRunner
from twinpipe.parallel.pipeline.stages import keep_local_stages
from twinpipe.parallel.pipeline.zero_bubble import split_weight_gradients
from twinpipe.trainer.loss import GLOBAL_COUNTS, PretrainLoss

SEQ = 128


def v3_config(num_layers: int) -> ModelConfig:
    return ModelConfig.preset("tiny", num_hidden_layers=num_layers, first_k_dense_replace=1, hidden_size=512,
                              intermediate_size=1536, moe_intermediate_size=256, n_routed_experts=16,
                              num_experts_per_tok=4, n_group=4, topk_group=2, num_attention_heads=8)


class Objective:
    """The pretraining loss of one micro-batch (its own token counts as the global ones)."""

    def __init__(self, mtp_depths: int) -> None:
        self.loss_fn = PretrainLoss(0.3, mtp_depths=mtp_depths)

    def __call__(self, output, batch):
        return self.loss_fn(output, {**batch, GLOBAL_COUNTS: self.loss_fn.normalizers(batch)})


def _timed(events: list, ops: list, kind, fn):
    """fn wrapped to append (kind(*args), phase, start, end) to `events` around each call, and
    [kind, its thread's CPU seconds] to `ops` (`label_ops` adds the stage and micro-batch)."""
    def wrapped(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        c1, t1 = time.thread_time(), time.perf_counter()
        k = kind(*args, **kwargs)
        events.append((k, args[0] if args else -1, t0, t1))
        ops.append([k, c1 - c0, False])
        return out
    return wrapped


def label_ops(ops: list, chunks: list) -> list[dict]:
    """Each compute op with what it computed: `chunks` holds, in call order, (stage, micro-batch,
    forward) of every chunk the engine began (`on_chunk`, called as a chunk's forward or backward
    begins, before its compute); F ops take the forward ones in order, B/b ops the backward ones; a W op
    runs the weight gradients of the oldest input-gradient-only backward (b) not yet run
    (WeightGradStore is first in, first out) and takes its stage, but no micro-batch: it waits for
    nothing on another rank."""
    queues = {True: [c[:2] for c in chunks if c[2]], False: [c[:2] for c in chunks if not c[2]]}
    taken = {True: 0, False: 0}
    deferred: list[int] = []
    out = []
    for kind, cpu_s, pair in ops:
        entry = {"kind": kind, "cpu_s": cpu_s, "pair": pair}
        if kind == "W":
            entry["stage"] = deferred.pop(0)
        else:
            forward = kind == "F"
            entry["stage"], entry["micro_batch"] = queues[forward][taken[forward]]
            taken[forward] += 1
            if kind == "b":
                deferred.append(entry["stage"])
        out.append(entry)
    return out


def median_costs(results: list[dict]) -> dict[tuple[str, int], float]:
    """(kind, stage) -> the median CPU seconds of that op over every rank and timed step: the cost the
    replay gives each op, so one op's noise on a shared machine (a cache-cold first backward, a
    neighbour's burst) does not become the step's."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in results:
        for op in r["timed_ops"]:
            by.setdefault((op["kind"], op["stage"]), []).append(op["cpu_s"])
    return {k: statistics.median(v) for k, v in by.items()}


def replay(ops_per_rank: list[list[dict]], num_stages: int, costs: dict | None = None) -> dict:
    """The step's timeline if every rank had a core to itself: each rank runs its ops in the order it
    ran them, each taking its measured CPU time (or `costs[(kind, stage)]`); a forward of (micro-batch m, stage s) starts once
    (m, s-1)'s forward ended, a backward once (m, s+1)'s backward ended (the P2P transfers cost
    nothing), and the two halves of an F&B pair start together once both inputs are there (the engine
    receives both before it computes). Returns the replayed step span, per-rank busy and bubble times
    (span - busy) in seconds, and the timeline."""
    ends: dict[tuple, float] = {}
    clock = [0.0] * len(ops_per_rank)
    nxt = [0] * len(ops_per_rank)
    timeline: list[list] = [[] for _ in ops_per_rank]

    def dep(op: dict) -> tuple | None:
        m, s = op.get("micro_batch"), op.get("stage")
        if op["kind"] == "F":
            return ("F", m, s - 1) if s > 0 else None
        if op["kind"] in ("B", "b"):
            return ("B", m, s + 1) if s < num_stages - 1 else None
        return None

    def cost(op: dict) -> float:
        return op["cpu_s"] if costs is None else costs[(op["kind"], op["stage"])]

    def ready_at(op: dict) -> float | None:
        d = dep(op)
        if d is None:
            return 0.0
        return ends.get(d)

    while any(n < len(o) for n, o in zip(nxt, ops_per_rank)):
        progressed = False
        for r, ops in enumerate(ops_per_rank):
            while nxt[r] < len(ops):
                group = ops[nxt[r]:nxt[r] + 2] if ops[nxt[r]]["pair"] else ops[nxt[r]:nxt[r] + 1]
                starts = [ready_at(op) for op in group]
                if any(t is None for t in starts):
                    break
                t = max([clock[r], *starts])
                for op in group:
                    end = t + cost(op)
                    timeline[r].append((op["kind"], op.get("stage", -1), t, end))
                    if op["kind"] != "W":
                        ends[("F" if op["kind"] == "F" else "B", op["micro_batch"], op["stage"])] = end
                    t = end
                clock[r] = t
                nxt[r] += len(group)
                progressed = True
        if not progressed:
            raise RuntimeError("replay: no rank can go on (ops mislabelled: a dependency never ends)")
    span = max(clock)
    busy = [sum(cost(op) for op in ops) for ops in ops_per_rank]
    return {"span_s": span, "busy_s": busy, "bubble_s": [span - b for b in busy], "timeline": timeline}


def stage_split(schedule: str, world: int, blocks_per_stage: int) -> list[int] | None:
    """Blocks per stage (parallel.layer_split): `blocks_per_stage` on every stage but the last, which
    holds one block besides the MTP block and the two heads (they cost about as much as 2.4 blocks
    here), so the stages cost about the same, as the bubble formula assumes. 0: 2 blocks per rank,
    evenly (the last stage then costs 2.3x the others)."""
    if not blocks_per_stage:
        return None
    stages = 2 * world if schedule == "dualpipev" else world
    return [blocks_per_stage] * (stages - 1) + [1]


def run_rank(rank: int, world: int, schedule: str, num_chunks: int, reps: int,
             blocks_per_stage: int = 0) -> dict:
    """One rank of the V3 pipeline: the spans of its last step (the earlier ones warm up)."""
    torch.manual_seed(0)
    split = stage_split(schedule, world, blocks_per_stage)
    config = v3_config(sum(split) if split else 2 * world)
    model = Transformer(config)
    keep_local_stages(model, schedule, world, rank, split)  # other stages to meta: a rank holds its own
    if schedule in ("dualpipe", "dualpipev"):
        split_weight_gradients(model)
    events: list = []
    ops: list = []
    chunks: list = []

    def overlapped(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
        """`engine.sequential_forward_backward`, timing its forward and its backward apart."""
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        t1, c1 = time.perf_counter(), time.thread_time()
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            torch.autograd.backward(outputs1, grad_tensors=grads1)
        c2 = time.thread_time()
        events.extend([("F", -1, t0, t1), ("B", -1, t1, time.perf_counter())])
        ops.extend([["F", c1 - c0, True], ["B", c2 - c1, False]])
        return outputs0, loss0

    runner = PipelineRunner(model, schedule, world, rank, dist.group.WORLD, torch.device("cpu"), layer_split=split,
                            overlapped_forward_backward=overlapped)
    runner.sum_copies = lambda: None  # not part of the schedule (module docstring)
    pipe = runner.pipe
    pipe._forward_compute = _timed(events, ops, lambda *a: "F", pipe._forward_compute)
    pipe._backward_compute = _timed(events, ops, lambda phase, enable_zb=False: "b" if enable_zb else "B",
                                    pipe._backward_compute)
    pipe._weight_chunk = _timed(events, ops, lambda: "W", pipe._weight_chunk)
    mark, own = pipe.on_chunk, runner.placement.stages(rank)

    def on_chunk(phase: int, chunk: int, forward: bool) -> None:
        module = pipe.placement.module_index[phase]
        chunks.append((own[module], runner.placement.micro_batch(module, chunk, runner.num_chunks), forward))
        mark(phase, chunk, forward)
    pipe.on_chunk = on_chunk
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (num_chunks, SEQ + 1), generator=g)
    micro_batches = [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(num_chunks)]
    objective = Objective(config.num_nextn_predict_layers)
    timed_ops: list[dict] = []
    for rep in range(reps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        events.clear()
        ops.clear()
        chunks.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        runner.run(micro_batches, objective)
        t1, cpu = time.perf_counter(), time.process_time() - c0
        labelled = label_ops(ops, chunks)
        if rep or reps == 1:  # the first step warms up
            timed_ops += labelled
    return {"t0": t0, "t1": t1, "events": list(events), "peak_activations": None, "cpu_s": cpu,
            "ops": labelled, "timed_ops": timed_ops}


def replayed(schedule: str, results: list[dict], num_stages: int, formula) -> dict:
    """`replay` of the last step's ops, each costing the median CPU time of its kind and stage over the
    timed steps (`median_costs`); the formula (`formula(schedule, stages, f, b, w)`: bench/pipeline.py's
    `bubble_formula`) takes the medians of F, of B (b + W where the backward is split) and of W over
    the same ops."""
    fbw = stage_costs({k: [op["cpu_s"] for r in results for op in r["timed_ops"] if op["kind"] == k]
                       for k in ("F", "B", "b", "W")})
    f, b, w = fbw["f"], fbw["b"], fbw["w"]
    costs = median_costs(results)
    out = replay([r["ops"] for r in results], num_stages, costs)
    bubbles = out["bubble_s"]
    want = formula(schedule, num_stages, f, b, w)
    return {"stage_cpu_ms": {"F": f * 1e3, "B": b * 1e3, "W": w * 1e3},
            "op_cpu_ms": {f"{k}{s}": v * 1e3 for (k, s), v in sorted(costs.items())},
            "step_ms": out["span_s"] * 1e3, "busy_ms_per_rank": [x * 1e3 for x in out["busy_s"]],
            "bubble_ms_per_rank": [x * 1e3 for x in bubbles],
            "bubble_ms_mean": statistics.mean(bubbles) * 1e3, "bubble_ms_max": max(bubbles) * 1e3,
            "bubble_formula_ms": want * 1e3 if want is not None else None,
            "bubble_max_over_formula": max(bubbles) / want if want else None,
            "timeline": [[(k, s, t0 * 1e3, t1 * 1e3) for k, s, t0, t1 in line] for line in out["timeline"]]}


def cpu_share(results: list[dict], entry: dict) -> dict:
    """CPU seconds each rank used in its timed step (all its threads) over its busy time (the union of
    its chunk spans, `entry` from `bench.pipeline.analyse`): about 1 when the rank had a core to itself
    while it computed; below that its spans, and the bubbles derived from them, are stretched by
    waiting for a core (more ranks than cores, or other load on the machine)."""
    cpu = [r["cpu_s"] for r in results]
    share = [c / (b / 1e3) for c, b in zip(cpu, entry["busy_ms_per_rank"])]
    return {"cpu_s_per_rank": cpu, "cpu_share_of_busy": share,
            "cpu_share_of_busy_mean": statistics.mean(share), "cores": os.cpu_count()}


def measured_costs(results: list[dict]) -> dict[str, float]:
    """Median seconds of one stage's F, full backward B and W over all ranks' spans. Where the schedule
    splits backwards, B = median input-gradient backward + median W (the two halves of one backward,
    so W <= B), else the median full backward (1F1B: W = 0, nothing is deferred)."""
    return stage_costs({k: [e[3] - e[2] for r in results for e in r["events"] if e[0] == k]
                        for k in ("F", "B", "b", "W")})


def stage_costs(durations: dict[str, list[float]]) -> dict[str, float]:
    """F, B, W of one stage from the durations of each op kind (F, B, b, W): their medians, with B =
    median b + median W where the backward was split (the two halves of one backward), else the
    median full backward (1F1B: W = 0)."""
    med = {k: statistics.median(v) if v else 0.0 for k, v in durations.items()}
    b = med["b"] + med["W"] if durations["W"] else med["B"]
    return {"f": med["F"], "b": b, "w": med["W"]}
