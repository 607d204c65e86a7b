"""Which micro-batch of the step is being computed: the step runners (the plain runner, and the
pipeline engine through `PipelineRunner`) mark the index, in the step's list of micro-batches, of the
one whose forward runs and of the one whose backward runs, for code outside the model that needs
per-micro-batch data inside a layer (routing replay: trainer/grpo/routing_replay.py).

The two are kept apart because a pipeline schedule runs one micro-batch's forward beside another's
backward (DualPipe's overlapped chunks, the EP overlap interleaving them block by block); a forward
rerun inside a backward (`parallel.recompute.recomputing()`) belongs to the backward's micro-batch.
Both are None outside a step.
"""

from __future__ import annotations

_now: dict[str, int | None] = {"forward": None, "backward": None}


def mark(forward: int | None = None, backward: int | None = None) -> None:
    """Set the micro-batch now in the forward and/or the backward (None leaves that one as it is)."""
    if forward is not None:
        _now["forward"] = forward
    if backward is not None:
        _now["backward"] = backward


def clear() -> None:
    _now["forward"] = _now["backward"] = None


def micro_batch(backward: bool = False) -> int | None:
    """The index of the micro-batch whose forward (or backward) runs now; None outside a step."""
    return _now["backward" if backward else "forward"]
