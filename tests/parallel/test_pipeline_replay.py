"""`bench/pipeline_v3.py`'s replay: the bubble a pipeline step would have with a core per rank, from the
ops each rank ran in order and their costs. Checked on hand-made op lists whose timelines are worked
out by hand, so the bench's `replayed` figures mean what its docstring says."""

from __future__ import annotations

import pytest
import torch

from twinpipe.bench.pipeline_v3 import label_ops, replay, run_rank, run_torch_rank, stage_split
from twinpipe.parallel.local import run_local


def _op(kind: str, micro_batch: int, stage: int, pair: bool = False) -> dict:
    return {"kind": kind, "micro_batch": micro_batch, "stage": stage, "cpu_s": 1.0 if kind == "F" else 2.0,
            "pair": pair}


def test_1f1b_two_stages_has_the_formula_bubble():
    """1F1B on 2 ranks, 2 micro-batches, F = 1, B = 2: rank 1 waits 1 for the first forward, rank 0
    for the backwards; each rank's bubble is (PP - 1)(F + B) = 3 of a 9 span."""
    rank0 = [_op("F", 0, 0), _op("F", 1, 0), _op("B", 0, 0), _op("B", 1, 0)]
    rank1 = [_op("F", 0, 1), _op("B", 0, 1), _op("F", 1, 1), _op("B", 1, 1)]
    out = replay([rank0, rank1], num_stages=2)
    assert out["span_s"] == 9.0
    assert out["busy_s"] == [6.0, 6.0] and out["bubble_s"] == [3.0, 3.0]
    assert [t[2:] for t in out["timeline"][0]] == [(0.0, 1.0), (1.0, 2.0), (4.0, 6.0), (7.0, 9.0)]


def test_pair_waits_for_both_inputs_and_costs_override():
    """An F&B pair starts once both its forward's and its backward's inputs are there; `costs` replaces
    each op's own time by its (kind, stage) figure."""
    rank0 = [_op("F", 0, 0), _op("F", 1, 0, pair=True), _op("B", 0, 0)]
    rank1 = [_op("F", 0, 1), _op("B", 0, 1), _op("F", 1, 1), _op("B", 1, 1)]
    out = replay([rank0, rank1], 2)
    # rank 0's pair (F of mb 1, B of mb 0) waits for B(0, 1), which ends at 1 + 1 + 2 = 4
    assert out["timeline"][0][1][2:] == (4.0, 5.0) and out["timeline"][0][2][2:] == (5.0, 7.0)
    costs = {("F", 0): 0.5, ("F", 1): 1.0, ("B", 0): 1.0, ("B", 1): 3.0}
    fast = replay([rank0, rank1], 2, costs)
    assert fast["busy_s"] == [2.0, 8.0]


def test_all_to_all_is_waited_for_unless_the_overlap_hides_it():
    """`comm` adds each stage's all-to-all to every F and b/B (not W); with `hidden` an F&B pair takes
    max(compute + (1 - hidden) x all-to-all, all-to-all) and both halves end together."""
    rank0 = [_op("F", 0, 0), _op("F", 1, 0, pair=True), _op("B", 0, 0), _op("B", 1, 0)]
    rank1 = [_op("F", 0, 1), _op("B", 0, 1), _op("F", 1, 1), _op("B", 1, 1)]
    comm = {0: 0.5, 1: 0.5}
    plain = replay([rank0, rank1], 2, comm=comm)
    # F = 1 + 0.5, B = 2 + 0.5. Rank 1's F(0) waits for rank 0's (to 1.5), its B(0) ends at 5.5; rank 0's
    # pair waits for that: F 5.5-7.0, B 7.0-9.5, both sent at 9.5 (the engine sends after the pair);
    # rank 1's F(1) 9.5-11.0, B(1) 11.0-13.5; rank 0's B(1) 13.5-16.0
    assert plain["busy_s"] == [8.0, 8.0] and plain["span_s"] == 16.0
    assert [t[2:] for t in plain["timeline"][0]][1:] == [(5.5, 7.0), (7.0, 9.5), (13.5, 16.0)]
    overlapped = replay([rank0, rank1], 2, comm=comm, hidden=0.5)
    # the pair: 3 of compute + half of its 1.0 of all-to-all = 3.5, from 5.5 to 9.0 (drawn 1.5 : 2.5);
    # then 9.0 + 1.5 + 2.5 + 2.5
    assert overlapped["timeline"][0][1][2:] == (5.5, 5.5 + 3.5 * 1.5 / 4.0)
    assert overlapped["timeline"][0][2][3] == 9.0 and overlapped["busy_s"][0] == 7.5
    assert overlapped["span_s"] == 15.5
    moved = replay([rank0, rank1], 2, comm={0: 5.0, 1: 0.5}, hidden=1.0)
    assert moved["timeline"][0][2][3] - moved["timeline"][0][1][2] == 10.0  # bound by the all-to-all
    with_w = replay([[{**_op("W", 0, 0), "cpu_s": 1.0}]], 1, comm={0: 9.0})
    assert with_w["span_s"] == 1.0  # W moves nothing
    apart = replay([rank0, rank1], 2, comm=comm, pairs_apart=True)
    # the pair's F runs at once (1.5-3.0) and is sent: rank 1's F(1) can follow its B(0) at 5.5
    assert apart["timeline"][0][1][2:] == (1.5, 3.0) and apart["timeline"][1][2][2:] == (5.5, 7.0)


def test_torch_schedules_on_v3_stages_compute_our_gradients():
    """bench/pipeline_v3 runs torch.distributed.pipelining's ZBV and DualPipeV on the same V3 stages as
    our DualPipeV (two ranks, four stages, four micro-batches): their gradients are ours bit for bit,
    with our weight-gradient split handed to torch's `dw_builder` and with torch's own graph split, so
    the bench compares schedules computing the same step. (Each parameter's gradient sums the same
    per-micro-batch terms in micro-batch order under all three.)"""
    def grads(rank, world, schedule, graph_split=False):
        if schedule.startswith("torch"):
            return run_torch_rank(rank, world, schedule, 4, 1, 1, graph_split=graph_split, keep_grads=True)["grads"]
        return run_rank(rank, world, schedule, 4, 1, 1, keep_grads=True)["grads"]

    ours = run_local(grads, 2, "dualpipev", timeout_s=300)
    for schedule, graph_split in (("torch_zbv", False), ("torch_zbv", True), ("torch_dualpipev", False)):
        theirs = run_local(grads, 2, schedule, graph_split, timeout_s=300)
        for rank in range(2):
            assert ours[rank].keys() == theirs[rank].keys() and len(ours[rank]) > 20
            different = [n for n, g in ours[rank].items() if not torch.equal(g, theirs[rank][n])]
            assert not different, (schedule, graph_split, rank, different[:5])


def test_every_schedule_runs_the_same_model():
    """DualPipe's and 1F1B's PP stages are the V shapes' 2PP stages taken two at a time."""
    assert stage_split("dualpipev", 4, 4) == stage_split("torch_zbv", 4, 4) == [4] * 7 + [1]
    assert stage_split("dualpipe", 4, 4) == stage_split("1f1b", 4, 4) == [8, 8, 8, 5]


def test_mislabelled_ops_are_refused():
    """A backward waiting for a stage that never runs it ends the replay with an error, not a hang."""
    with pytest.raises(RuntimeError, match="no rank can go on"):
        replay([[_op("F", 0, 0), _op("B", 0, 0)]], num_stages=2)


def test_labels_follow_the_engine_calls():
    """`label_ops`: F ops take the begun forwards in order, B/b the backwards, a W the stage of the
    oldest b whose weight gradients are still queued."""
    ops = [["F", 1.0, False], ["b", 1.0, False], ["F", 1.0, False], ["b", 1.0, False], ["W", 1.0, False],
           ["W", 1.0, False]]
    chunks = [(0, 5, True), (0, 5, False), (3, 6, True), (3, 6, False)]
    labelled = label_ops(ops, chunks)
    assert [(o["kind"], o["stage"], o.get("micro_batch")) for o in labelled] == [
        ("F", 0, 5), ("b", 0, 5), ("F", 3, 6), ("b", 3, 6), ("W", 0, None), ("W", 3, None)]
