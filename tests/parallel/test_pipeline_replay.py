"""`bench/pipeline_v3.py`'s replay: the bubble a pipeline step would have with a core per rank, from the
ops each rank ran in order and their costs. Checked on hand-made op lists whose timelines are worked
out by hand, so the bench's `replayed` figures mean what its docstring says."""

from __future__ import annotations

import pytest

from twinpipe.bench.pipeline_v3 import label_ops, replay


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
