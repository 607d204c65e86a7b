"""One pipeline rank running real DeepSeek-V3 stages, with every F, B and W chunk timed (`bench/pipeline.py
--stages v3`).

The model is V3-shaped (MLA, one dense block then MoE blocks with 16 routed experts, top-4 in 4
groups, one shared expert, MTP) with 2 blocks per rank (DualPipeV: two 1-block stages per rank), sized
so a block takes tens of milliseconds on one CPU thread. Under DualPipe and DualPipeV the weight
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


def _timed(events: list, kind, fn):
    """fn wrapped to append (kind(*args), phase, start, end) to `events` around each call."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        events.append((kind(*args, **kwargs), args[0] if args else -1, t0, time.perf_counter()))
        return out
    return wrapped


def run_rank(rank: int, world: int, schedule: str, num_chunks: int, reps: int) -> dict:
    """One rank of the V3 pipeline: the spans of its last step (the earlier ones warm up)."""
    torch.manual_seed(0)
    config = v3_config(2 * world)
    model = Transformer(config)
    if schedule in ("dualpipe", "dualpipev"):
        split_weight_gradients(model)
    events: list = []

    def overlapped(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
        """`engine.sequential_forward_backward`, timing its forward and its backward apart."""
        t0 = time.perf_counter()
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        t1 = time.perf_counter()
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            torch.autograd.backward(outputs1, grad_tensors=grads1)
        events.extend([("F", -1, t0, t1), ("B", -1, t1, time.perf_counter())])
        return outputs0, loss0

    runner = PipelineRunner(model, schedule, world, rank, dist.group.WORLD, torch.device("cpu"),
                            overlapped_forward_backward=overlapped)
    runner.sum_copies = lambda: None  # not part of the schedule (module docstring)
    pipe = runner.pipe
    pipe._forward_compute = _timed(events, lambda *a: "F", pipe._forward_compute)
    pipe._backward_compute = _timed(events, lambda phase, enable_zb=False: "b" if enable_zb else "B",
                                    pipe._backward_compute)
    pipe._weight_chunk = _timed(events, lambda: "W", pipe._weight_chunk)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (num_chunks, SEQ + 1), generator=g)
    micro_batches = [{"input_ids": ids[i:i + 1, :-1], "labels": ids[i:i + 1, 1:]} for i in range(num_chunks)]
    objective = Objective(config.num_nextn_predict_layers)
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        events.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        runner.run(micro_batches, objective)
        t1, cpu = time.perf_counter(), time.process_time() - c0
    return {"t0": t0, "t1": t1, "events": list(events), "peak_activations": None, "cpu_s": cpu}


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
    spans = {k: [e[3] - e[2] for r in results for e in r["events"] if e[0] == k] for k in ("F", "B", "b", "W")}
    med = {k: statistics.median(v) if v else 0.0 for k, v in spans.items()}
    b = med["b"] + med["W"] if spans["W"] else med["B"]
    return {"f": med["F"], "b": b, "w": med["W"]}
