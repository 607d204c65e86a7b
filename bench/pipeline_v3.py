"""One pipeline rank running real DeepSeek-V3 stages, with every F, B and W chunk timed (`bench/pipeline.py
--stages v3`).

The model is V3-shaped (MLA, one dense block then MoE blocks with 16 routed experts, top-4 in 4
groups, one shared expert, MTP), sized so a block takes about ten milliseconds on one CPU thread, and
the same under every schedule (`stage_split`): the V shapes' 2PP stages hold `blocks_per_stage` blocks
but the last, which holds one block with the MTP block and the heads (the stages then cost about the
same); DualPipe's and 1F1B's PP stages take two of those each. Under DualPipe and DualPipeV the weight
gradients are split off every layer (`parallel.pipeline.zero_bubble`, as `parallelize` does), so the
W chunks hold the real weight-gradient GEMMs. Ours (`run_rank`) is the trainer's step
(`PipelineRunner.run`: its placement, criterion, P2P) without the gradient sum over DualPipe's mirror
pair, which is not part of the schedule; torch's schedules (`run_torch_rank`) run the same stage
modules through torch.distributed.pipelining.

Spans recorded per rank (time.perf_counter, one clock for all processes): `F` a stage forward, `B` a
full backward, `b` a zero-bubble backward (input gradients only), `W` one deferred weight-gradient
chunk. F&B chunks run as the trainer runs them without expert parallelism (a communicator per
direction, no overlap hook: an F chunk then a B chunk) and their F op is marked as a pair's first half;
`replay` adds the overlap's effect on expert all-to-all as a model, pairing them.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model.config import ModelConfig
from twinpipe.model.moe import set_aux_loss_scale
from twinpipe.model.transformer import Transformer, TransformerOutput
from twinpipe.parallel.pipeline.runner import PipelineRunner
from twinpipe.parallel.pipeline.placement import StagePlacement
from twinpipe.parallel.pipeline.stages import build_stages, keep_local_stages
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore
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


def replay(ops_per_rank: list[list[dict]], num_stages: int, costs: dict | None = None,
           comm: dict[int, float] | None = None, hidden: float | None = None, pairs_apart: bool = False) -> dict:
    """The step's timeline if every rank had a core to itself: each rank runs its ops in the order it
    ran them, each taking its measured CPU time (or `costs[(kind, stage)]`); a forward of (micro-batch m,
    stage s) starts once (m, s-1)'s forward ended, a backward once (m, s+1)'s backward ended (the P2P
    transfers cost nothing), and the two halves of an F&B pair start together once both inputs are there
    and are sent together at its end (the engine receives both before it computes, and sends both after).

    `comm[stage]`: seconds of expert all-to-all in each forward and each backward (b or B) of that stage
    (dispatch and combine; a backward moves the same bytes); W has none. Outside an F&B pair, and inside
    one without `hidden`, the op waits for all of it. With `hidden` (the overlap: one micro-batch's
    all-to-alls behind the other's compute), a pair takes max(its compute + (1 - hidden) x its
    all-to-all, its all-to-all) and both halves end together.

    `pairs_apart`: an F&B pair runs as an F chunk then a B chunk (each starts once its own input is
    there, the forward's output leaves before the backward), as the engine runs one without an overlap
    hook when it has a communicator per direction (`engine.py`); ignored with `hidden` (the overlap
    pairs them).

    Returns the replayed step span, per-rank busy (compute and exposed all-to-all) and bubble times
    (span - busy) in seconds, and the timeline."""
    ends: dict[tuple, float] = {}
    clock = [0.0] * len(ops_per_rank)
    nxt = [0] * len(ops_per_rank)
    timeline: list[list] = [[] for _ in ops_per_rank]
    busy = [0.0] * len(ops_per_rank)

    def dep(op: dict) -> tuple | None:
        m, s = op.get("micro_batch"), op.get("stage")
        if op["kind"] == "F":
            return ("F", m, s - 1) if s > 0 else None
        if op["kind"] in ("B", "b"):
            return ("B", m, s + 1) if s < num_stages - 1 else None
        return None

    def cost(op: dict) -> float:
        return op["cpu_s"] if costs is None else costs[(op["kind"], op["stage"])]

    def all_to_all(op: dict) -> float:
        return comm[op["stage"]] if comm is not None and op["kind"] != "W" else 0.0

    def durations(group: list[dict]) -> list[float]:
        own = [cost(op) + all_to_all(op) for op in group]
        if len(group) < 2 or hidden is None:
            return own
        compute, moved = sum(cost(op) for op in group), sum(all_to_all(op) for op in group)
        pair = max(compute + (1.0 - hidden) * moved, moved)
        return [pair * d / sum(own) for d in own] if sum(own) else own  # drawn in proportion, end together

    def ready_at(op: dict) -> float | None:
        d = dep(op)
        if d is None:
            return 0.0
        return ends.get(d)

    while any(n < len(o) for n, o in zip(nxt, ops_per_rank)):
        progressed = False
        for r, ops in enumerate(ops_per_rank):
            while nxt[r] < len(ops):
                paired = ops[nxt[r]]["pair"] and (hidden is not None or not pairs_apart)
                group = ops[nxt[r]:nxt[r] + 2] if paired else ops[nxt[r]:nxt[r] + 1]
                starts = [ready_at(op) for op in group]
                if any(t is None for t in starts):
                    break
                t = max([clock[r], *starts])
                spans = durations(group)
                for op, d in zip(group, spans):
                    timeline[r].append((op["kind"], op.get("stage", -1), t, t + d))
                    t += d
                for op in group:
                    if op["kind"] != "W":
                        ends[("F" if op["kind"] == "F" else "B", op["micro_batch"], op["stage"])] = t
                busy[r] += sum(spans)
                clock[r] = t
                nxt[r] += len(group)
                progressed = True
        if not progressed:
            raise RuntimeError("replay: no rank can go on (ops mislabelled: a dependency never ends)")
    span = max(clock)
    return {"span_s": span, "busy_s": busy, "bubble_s": [span - b for b in busy], "timeline": timeline}


V_SHAPES = ("dualpipev", "torch_zbv", "torch_dualpipev")  # two stages per rank, 2PP in all


def stage_split(schedule: str, world: int, blocks_per_stage: int) -> list[int] | None:
    """Blocks per stage (parallel.layer_split), the same model under every schedule: the V shapes' 2PP
    stages hold `blocks_per_stage` blocks each but the last, which holds one block besides the MTP block
    and the two heads (they cost about as much as 2.4 blocks here), so the stages cost about the same,
    as the bubble formula assumes; schedules of PP stages (DualPipe, 1F1B) take two of those per stage.
    0: 2 blocks per rank, evenly (the last stage then costs 2.3x the others)."""
    if not blocks_per_stage:
        return None
    v = [blocks_per_stage] * (2 * world - 1) + [1]
    if schedule in V_SHAPES:
        return v
    return [a + b for a, b in zip(v[::2], v[1::2])]


def run_rank(rank: int, world: int, schedule: str, num_chunks: int, reps: int,
             blocks_per_stage: int = 0, keep_grads: bool = False) -> dict:
    """One rank of the V3 pipeline: the spans of its last step (the earlier ones warm up); with
    `keep_grads` also its parameters' gradients after the last step (`grads`)."""
    model, config, split = _rank_model(schedule, world, rank, blocks_per_stage,
                                       deferring=schedule in ("dualpipe", "dualpipev"))
    events: list = []
    ops: list = []
    chunks: list = []

    # as the trainer runs it (Grid.pp_flow_groups): a communicator per direction, so an F&B chunk without
    # an overlap hook runs as F then B (engine.py)
    flows = (dist.new_group(list(range(world))), dist.new_group(list(range(world))))
    runner = PipelineRunner(model, schedule, world, rank, dist.group.WORLD, torch.device("cpu"), layer_split=split,
                            p2p_groups=flows)
    runner.sum_copies = lambda: None  # not part of the schedule (module docstring)
    pipe = runner.pipe
    pipe._forward_compute = _timed(events, ops, lambda *a: "F", pipe._forward_compute)
    pipe._backward_compute = _timed(events, ops, lambda phase, enable_zb=False: "b" if enable_zb else "B",
                                    pipe._backward_compute)
    pipe._weight_chunk = _timed(events, ops, lambda: "W", pipe._weight_chunk)
    forward_backward = pipe._forward_backward_chunk

    def paired(*args, **kwargs):
        """An F&B chunk: its forward op is marked as a pair's first half (the overlap would pair them)."""
        first = len(ops)
        forward_backward(*args, **kwargs)
        ops[first][2] = True
    pipe._forward_backward_chunk = paired
    mark, own = pipe.on_chunk, runner.placement.stages(rank)

    def on_chunk(phase: int, chunk: int, forward: bool) -> None:
        module = pipe.placement.module_index[phase]
        chunks.append((own[module], runner.placement.micro_batch(module, chunk, runner.num_chunks), forward))
        mark(phase, chunk, forward)
    pipe.on_chunk = on_chunk
    _, micro_batches = _micro_batches(config, num_chunks)
    objective = Objective(config.num_nextn_predict_layers)

    def step() -> None:
        chunks.clear()
        runner.run(micro_batches, objective)
    result = _timed_steps(model, reps, events, ops, step, lambda: label_ops(ops, chunks))
    return {**result, "grads": _grads(model) if keep_grads else None, "pairs_apart": True}


def _rank_model(layout: str, world: int, rank: int, blocks_per_stage: int,
                deferring: bool) -> tuple[Transformer, ModelConfig, list[int] | None]:
    """The V3 model with only this rank's stages of `layout` (the others on meta), its weight gradients
    split off every layer when `deferring`; with its config and `stage_split`."""
    torch.manual_seed(0)
    split = stage_split(layout, world, blocks_per_stage)
    config = v3_config(sum(split) if split else 2 * world)
    model = Transformer(config)
    keep_local_stages(model, layout, world, rank, split)  # other stages to meta: a rank holds its own
    if deferring:
        split_weight_gradients(model)
    return model, config, split


def _micro_batches(config: ModelConfig, num_chunks: int) -> tuple[torch.Tensor, list[dict]]:
    """The step's token ids [num_chunks, SEQ + 1] (the same on every rank) and its micro-batches."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (num_chunks, SEQ + 1), generator=g)
    return ids, [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(num_chunks)]


def _timed_steps(model: nn.Module, reps: int, events: list, ops: list, step, label) -> dict:
    """`reps` steps (`step()`), lined up by a barrier; the spans and CPU time of the last, its ops
    (`label()` after each) and the ops of every step but the first, which warms up."""
    timed_ops: list[dict] = []
    for rep in range(reps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        events.clear()
        ops.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        t1, cpu = time.perf_counter(), time.process_time() - c0
        labelled = label()
        if rep or reps == 1:
            timed_ops += labelled
    return {"t0": t0, "t1": t1, "events": list(events), "peak_activations": None, "cpu_s": cpu,
            "ops": labelled, "timed_ops": timed_ops}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class _TorchStage(nn.Module):
    """A `TransformerStage` as torch.distributed.pipelining takes one: a single tensor in and out
    (input ids into the first stage, h between stages; the last returns its heads' inputs). The
    positions are 0..T-1 and the input ids the MTP block embeds come from the micro-batch list, picked
    by `current` (the forward chunk torch's schedule is running: `run_torch_rank` sets it)."""

    def __init__(self, stage: nn.Module, micro_batches: list[dict]) -> None:
        super().__init__()
        self.stage, self.micro_batches, self.current = stage, micro_batches, 0

    def forward(self, x: torch.Tensor):
        ids = self.micro_batches[self.current]["input_ids"]                        # [1, T]
        pos = torch.arange(ids.shape[1]).expand_as(ids)                           # [1, T]
        out = self.stage(x, pos) if self.stage.is_first else self.stage(x, ids, pos)
        return out if self.stage.is_last else out[0]                               # h [1, T, H]


def run_torch_rank(rank: int, world: int, schedule: str, num_chunks: int, reps: int,
                   blocks_per_stage: int = 0, graph_split: bool = False, keep_grads: bool = False) -> dict:
    """One rank of torch.distributed.pipelining's `schedule` (torch_zbv, torch_dualpipev, torch_1f1b) on
    the same V3 stages, model, data and loss as `run_rank`. Where the schedule defers weight gradients
    (ZBV, DualPipeV) they are the same W as ours: `split_weight_gradients` with torch's `dw_builder` hook
    handing each backward's deferred closures to the schedule (`_dw_builder`), so the comparison is of
    schedules; `graph_split` gives torch's own split instead (`stage_backward_input` /
    `stage_backward_weight` over the autograd graph, which reruns whole custom-Function backwards in W).
    Every `forward_one_chunk` (plus the loss on the last stage), `backward_one_chunk` (b where it leaves
    the weights for later) and `backward_weight_one_chunk` is an op with its CPU time, stage and
    micro-batch, as `run_rank` records ours."""
    from torch.distributed.pipelining import PipelineStage, schedules

    ours = "1f1b" if schedule == "torch_1f1b" else "dualpipev"  # the same stage layout
    deferring = schedule != "torch_1f1b" and not graph_split
    model, config, split = _rank_model(ours, world, rank, blocks_per_stage, deferring)
    placement = StagePlacement(ours, world)
    num_stages = placement.num_stages
    ids, micro_batches = _micro_batches(config, num_chunks)
    modules = build_stages(model, ours, world, rank, split)
    set_aux_loss_scale(modules, 1.0 / num_chunks)
    events: list = []
    ops: list = []
    h = torch.empty(1, SEQ, config.hidden_size, requires_grad=True)  # torch reads requires_grad off these
    pstages = []
    for module, index in zip(modules, placement.stages(rank)):
        wrapped = _TorchStage(module, micro_batches)
        outputs = (h, *(torch.empty(1, SEQ - k, config.hidden_size, requires_grad=True)
                        for k in range(1, len(model.mtp) + 1))) \
            if module.is_last else h
        stage = PipelineStage(wrapped, index, num_stages, torch.device("cpu"),
                              input_args=ids[:1, :-1] if module.is_first else h, output_args=outputs,
                              dw_builder=_dw_builder if deferring else None)
        stage.forward_one_chunk = _torch_op(events, ops, "F", index, stage.forward_one_chunk, wrapped)
        stage.backward_one_chunk = _torch_op(events, ops, "B", index, stage.backward_one_chunk)
        stage.backward_weight_one_chunk = _torch_op(events, ops, "W", index, stage.backward_weight_one_chunk)
        pstages.append(stage)
    objective = Objective(config.num_nextn_predict_layers)
    head = model.lm_head.weight

    def loss_fn(output, index):
        """The objective on micro-batch `index`; its CPU time joins the last stage's forward op."""
        c0 = time.thread_time()
        hidden, *mtp_hidden = output
        loss, _ = objective(TransformerOutput(hidden, head, list(mtp_hidden)), micro_batches[int(index)])
        ops[-1][1] += time.thread_time() - c0  # the last stage's forward of this micro-batch, just run
        return loss

    cls = {"torch_zbv": schedules.ScheduleZBVZeroBubble, "torch_dualpipev": schedules.ScheduleDualPipeV,
           "torch_1f1b": schedules.Schedule1F1B}[schedule]
    sched = cls(pstages[0] if schedule == "torch_1f1b" else pstages, num_chunks, loss_fn=loss_fn,
                scale_grads=False)
    first = any(m.is_first for m in modules)
    last = any(m.is_last for m in modules)

    def step() -> None:
        WeightGradStore.enabled = deferring
        try:
            sched.step(*([ids[:, :-1]] if first else []),
                       **({"target": torch.arange(num_chunks), "losses": []} if last else {}))
        finally:
            WeightGradStore.clear()

    def label() -> list[dict]:
        return [{"kind": k, "cpu_s": c, "pair": False, "stage": s, "micro_batch": m} for k, c, s, m in ops]
    result = _timed_steps(model, reps, events, ops, step, label)
    return {**result, "grads": _grads(model) if keep_grads else None}


def _dw_builder():
    """torch's `dw_builder` hook, called right after a backward: the weight-gradient closures our split
    layers deferred in that backward, as one callable (run at once for a full backward, else as the
    schedule's W of that chunk)."""
    funcs, WeightGradStore.cache = WeightGradStore.cache, []

    def run():
        with torch.no_grad():
            for func in funcs:
                func()
    return run


def _torch_op(events: list, ops: list, kind: str, stage: int, fn, wrapped: _TorchStage | None = None):
    """A PipelineStage method (`forward_one_chunk(chunk, ...)`, `backward_one_chunk(chunk, loss,
    full_backward, ...)`, `backward_weight_one_chunk(chunk, ...)`) timed into `events` (kind, stage, start,
    end) and `ops` [kind, CPU seconds, stage, micro-batch]; a backward that leaves the weight gradients
    for later is `b`. A forward first points `wrapped` at its micro-batch."""
    def run(chunk, *args, **kwargs):
        k = kind
        if kind == "B" and not kwargs.get("full_backward", args[1] if len(args) > 1 else True):
            k = "b"
        if wrapped is not None:
            wrapped.current = chunk
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(chunk, *args, **kwargs)
        c1, t1 = time.thread_time(), time.perf_counter()
        events.append((k, stage, t0, t1))
        ops.append([k, c1 - c0, stage, chunk])
        return out
    return run


OVERLAPPING = ("dualpipe", "dualpipev")  # ours: F&B pairs whose all-to-alls the overlap hides


def common_costs(runs: list[list[dict]]) -> dict[tuple[str, int], float]:
    """One cost table for every schedule of a PP, from runs of the V shapes (their 2PP stages): F, b and W
    of each stage the median over all those runs' timed ops, and a full backward B = b + W. A schedule
    replayed at these costs differs from another only in its order of ops and what they wait for: on a
    shared machine the same op measures 5-15% apart from run to run (load, caches), enough to hide a
    schedule's own difference. `stage_costs_of` gives a PP-stage schedule its stages' costs."""
    by: dict[tuple[str, int], list[float]] = {}
    for results in runs:
        for r in results:
            for op in r["timed_ops"]:
                if op["kind"] != "B":
                    by.setdefault((op["kind"], op["stage"]), []).append(op["cpu_s"])
    costs = {k: statistics.median(v) for k, v in by.items()}
    for (kind, stage), c in list(costs.items()):
        if kind == "b":
            costs[("B", stage)] = c + costs.get(("W", stage), 0.0)
    return costs


def stage_costs_of(costs: dict[tuple[str, int], float], schedule: str) -> dict[tuple[str, int], float]:
    """`common_costs` (2PP stages) for `schedule`: as they are for the V shapes; a schedule of PP stages
    takes two at a time (`stage_split`: its stage s holds V stages 2s and 2s+1)."""
    if schedule in V_SHAPES:
        return costs
    merged: dict[tuple[str, int], float] = {}
    for (kind, stage), c in costs.items():
        merged[(kind, stage // 2)] = merged.get((kind, stage // 2), 0.0) + c
    return merged


def replayed(schedule: str, results: list[dict], num_stages: int, formula, comm_ratios: tuple = (),
             hidden: float | None = None, costs: dict | None = None) -> dict:
    """`replay` of the last step's ops, each costing the median CPU time of its kind and stage over the
    timed steps (`median_costs`), or `costs[(kind, stage)]` (`common_costs`); the formula
    (`formula(schedule, stages, f, b, w)`: bench/pipeline.py's `bubble_formula`) takes the medians of F,
    of B (b + W where the backward is split) and of W over the same ops (over the stages of `costs`).

    Our F&B pairs are replayed as the engine ran them (`pairs_apart`); `pairs_together` is the step
    with each pair's halves started and sent together, as an overlap hook runs them, without
    communication.

    `comm_sweep`: the same replay with expert all-to-all in every forward and backward, `ratio` x the
    stage's forward compute each (`replay`'s `comm`), exposed in full; for our DualPipe and DualPipeV
    also with the overlap hiding `hidden` of each F&B pair's all-to-all (`step_ms_overlap`)."""
    if costs is None:
        fbw = stage_costs({k: [op["cpu_s"] for r in results for op in r["timed_ops"] if op["kind"] == k]
                           for k in ("F", "B", "b", "W")})
        f, b, w = fbw["f"], fbw["b"], fbw["w"]
        costs = median_costs(results)
    else:
        deferred = any(op["kind"] == "W" for r in results for op in r["ops"])
        f, b, w = (statistics.median(c for (k, _), c in costs.items() if k == kind) for kind in ("F", "B", "W"))
        w = w if deferred else 0.0
    ops = [r["ops"] for r in results]
    apart = any(r.get("pairs_apart") for r in results)  # how the engine ran its F&B chunks
    out = replay(ops, num_stages, costs, pairs_apart=apart)
    bubbles = out["bubble_s"]
    want = formula(schedule, num_stages, f, b, w)
    together = None
    if apart and any(op["pair"] for line in ops for op in line):
        t = replay(ops, num_stages, costs)
        together = {"step_ms": t["span_s"] * 1e3, "bubble_ms_mean": statistics.mean(t["bubble_s"]) * 1e3}
    sweep = []
    for ratio in comm_ratios:
        comm = {s: ratio * c for (k, s), c in costs.items() if k == "F"}
        entry = {"ratio": ratio, "step_ms": replay(ops, num_stages, costs, comm, pairs_apart=apart)["span_s"] * 1e3,
                 "step_ms_overlap": None}
        if schedule in OVERLAPPING and hidden is not None:
            entry["step_ms_overlap"] = replay(ops, num_stages, costs, comm, hidden)["span_s"] * 1e3
        sweep.append(entry)
    return {"stage_cpu_ms": {"F": f * 1e3, "B": b * 1e3, "W": w * 1e3},
            "op_cpu_ms": {f"{k}{s}": v * 1e3 for (k, s), v in sorted(costs.items())},
            "step_ms": out["span_s"] * 1e3, "busy_ms_per_rank": [x * 1e3 for x in out["busy_s"]],
            "bubble_ms_per_rank": [x * 1e3 for x in bubbles],
            "bubble_ms_mean": statistics.mean(bubbles) * 1e3, "bubble_ms_max": max(bubbles) * 1e3,
            "bubble_formula_ms": want * 1e3 if want is not None else None,
            "bubble_max_over_formula": max(bubbles) / want if want else None,
            "pairs_apart": apart, "pairs_together": together, "comm_hidden_fraction": hidden, "comm_sweep": sweep,
            "timeline": [[(k, s, t0 * 1e3, t1 * 1e3) for k, s, t0, t1 in line] for line in out["timeline"]]}


def comm_table(entries: list[dict], key: str = "replayed") -> str:
    """Replayed step (ms) of each schedule at each all-to-all ratio of one PP (`entries[i][key]`: each
    run's own costs, or `replayed_common`); `+overlap` rows for ours."""
    ratios = [c["ratio"] for c in entries[0][key]["comm_sweep"]]
    lines = [f"PP={entries[0]['pp']} {key}: step ms with all-to-all = ratio x forward compute "
             f"(overlap hides {entries[0][key]['comm_hidden_fraction']:.2f} of a pair's)",
             f"{'schedule':22s}" + "".join(f"{r:>10.2f}" for r in ratios)]
    for e in entries:
        sweep = e[key]["comm_sweep"]
        lines.append(f"{e['schedule']:22s}" + "".join(f"{c['step_ms']:10.1f}" for c in sweep))
        if sweep and sweep[0]["step_ms_overlap"] is not None:
            lines.append(f"{e['schedule'] + ' +overlap':22s}" + "".join(f"{c['step_ms_overlap']:10.1f}" for c in sweep))
    return "\n".join(lines)


def plot_comm(entries: list[dict], path, key: str = "replayed_common") -> None:
    """Replayed step time against the all-to-all ratio, one line per schedule (dashed: with the overlap),
    at the common costs (`common_costs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for e in entries:
        sweep = e[key]["comm_sweep"]
        ratios = [c["ratio"] for c in sweep]
        line, = ax.plot(ratios, [c["step_ms"] for c in sweep], marker="o", label=e["schedule"])
        if sweep and sweep[0]["step_ms_overlap"] is not None:
            ax.plot(ratios, [c["step_ms_overlap"] for c in sweep], marker="o", linestyle="--",
                    color=line.get_color(), label=f"{e['schedule']} + overlap")
    hidden = entries[0][key]["comm_hidden_fraction"]
    ax.set_xlabel("expert all-to-all per forward or backward / forward compute")
    ax.set_ylabel("replayed step (ms)")
    ax.set_title(f"V3 stages, PP={entries[0]['pp']}, {entries[0]['num_chunks']} micro-batches, one cost "
                 f"table for all (overlap hides {hidden:.2f} of a pair's all-to-all)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
