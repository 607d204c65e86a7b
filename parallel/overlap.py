"""Overlapped forward-backward of two micro-batches: one's all-to-alls progress while the other computes.

The forward of micro-batch 0 and the backward of micro-batch 1 run as two coroutines, each on its own
thread, with a strict hand-off: exactly one of them runs Python/torch work at a time. Whenever one side
issues an asynchronous collective (the MoE dispatch or combine, forward or backward, see
`twinpipe.parallel.ep_comm`), it calls `wait(work)`, which hands the CPU to the other side *before*
waiting; the collective then progresses in the communication backend's threads while the other side
computes its next chunk (attention, experts, ...). When the other side reaches its own collective it
hands back, and the first side waits for what is usually an already finished transfer.

So the chunks interleave as in DeepSeek-V3's overlap (report §3.2.1) without splitting the model's
modules by hand: forward attention of micro-batch 0 | backward experts of micro-batch 1 while the
forward dispatch is in flight | forward experts of 0 while the backward dispatch of 1 is in flight, ...

The hand-off order is a pure function of the program, so every rank of an expert-parallel group issues
its collectives in the same order (a requirement of all collectives on one process group), and the
arithmetic is exactly that of running the forward and then the backward: results are bit-identical.

`overlapped_forward_backward` has DualPipe's hook signature (see REFERENCE.md §4), so the pipeline engine
can plug it in; outside such a region `wait` just waits.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import torch

_ACTIVE: "_Pair | None" = None
_ACTIVE_LOCK = threading.Lock()


class _Pair:
    """Two threads taking turns: `switch()` gives the turn to the other one until it gives it back."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.sides: list[int] = []          # thread idents, in start order
        self.turn: int | None = None
        self.finished: set[int] = set()
        self.num_switches = 0

    def _other(self, me: int) -> int | None:
        for ident in self.sides:
            if ident != me:
                return ident
        return None

    def owns(self, me: int) -> bool:
        return me in self.sides

    def take_turn(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me)

    def switch(self, me: int) -> None:
        with self.cond:
            other = self._other(me)
            if other is None or other in self.finished:
                return
            self.turn = other
            self.num_switches += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == me)

    def finish(self, me: int) -> None:
        with self.cond:
            self.finished.add(me)
            other = self._other(me)
            if other is not None and other not in self.finished:
                self.turn = other
            self.cond.notify_all()


class CommStats:
    """Time spent blocked on collectives issued through `wait` (exposed communication)."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.num_waits = 0

    def reset(self) -> None:
        self.wait_s = 0.0
        self.num_waits = 0


COMM_STATS = CommStats()
LAST_REGION = {"switches": 0}
"""Hand-offs made in the last overlapped region (each one a chunk boundary at a collective)."""


def wait(work: Any) -> None:
    """Wait for an async collective; inside an overlapped region, let the other micro-batch run first."""
    pair = _ACTIVE
    me = threading.get_ident()
    if pair is not None and pair.owns(me):
        pair.switch(me)
    t0 = time.perf_counter()
    work.wait()
    COMM_STATS.wait_s += time.perf_counter() - t0
    COMM_STATS.num_waits += 1


def _run_pair(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run two callables as turn-taking coroutines on two threads; `first` starts."""
    global _ACTIVE
    pair = _Pair()
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]
    started = threading.Barrier(3)

    def body(idx: int, fn: Callable[[], Any]) -> None:
        me = threading.get_ident()
        started.wait()
        pair.take_turn(me)
        try:
            results[idx] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors[idx] = exc
        finally:
            pair.finish(me)

    threads = [threading.Thread(target=body, args=(i, fn), daemon=True)
               for i, fn in enumerate((first, second))]
    with _ACTIVE_LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("overlapped_forward_backward: regions cannot nest")
        _ACTIVE = pair
    try:
        for t in threads:
            t.start()
        pair.sides = [t.ident for t in threads]
        with pair.cond:
            pair.turn = pair.sides[0]
        started.wait()
        with pair.cond:
            pair.cond.notify_all()
        for t in threads:
            t.join()
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE = None
        LAST_REGION["switches"] = pair.num_switches
    for err in errors:
        if err is not None:
            raise err
    return results[0], results[1]


def forward_chunk(module: torch.nn.Module, inputs: Sequence[Any], criterion: Callable | None,
                  labels: Sequence[Any]) -> tuple[Any, torch.Tensor | None]:
    """DualPipe's forward compute chunk: outputs = module(*inputs); loss = criterion(*outputs, *labels)."""
    outputs = module(*inputs)
    loss = None
    if criterion is not None:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        loss = criterion(*outs, *labels)
    return outputs, loss


def backward_chunk(loss: torch.Tensor | None, outputs: Sequence[torch.Tensor],
                   output_grads: Sequence[torch.Tensor]) -> None:
    """DualPipe's backward compute chunk: from the loss on the last stage, else from the output grads."""
    if loss is not None:
        loss.backward()
    elif len(outputs):
        torch.autograd.backward(list(outputs), grad_tensors=list(output_grads))


def overlapped_forward_backward(module0: torch.nn.Module, inputs0: Sequence[Any],
                                criterion0: Callable | None, labels0: Sequence[Any],
                                module1: torch.nn.Module, loss1: torch.Tensor | None,
                                outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor],
                                ) -> tuple[Any, torch.Tensor | None]:
    """Forward of micro-batch 0 on `module0` overlapped with the backward of micro-batch 1 on `module1`.

    Same contract as DualPipe's hook: returns `(outputs0, loss0)` (`loss0` is None without a criterion);
    the backward of micro-batch 1 starts from `loss1` when given, else from `outputs1`/`output_grads1`,
    and leaves its gradients in `.grad` exactly as a plain backward would.
    """
    grad_enabled = torch.is_grad_enabled()

    def forward() -> tuple[Any, torch.Tensor | None]:
        with torch.set_grad_enabled(grad_enabled):
            return forward_chunk(module0, inputs0, criterion0, labels0)

    def backward() -> None:
        backward_chunk(loss1, outputs1, output_grads1)

    (outputs0, loss0), _ = _run_pair(forward, backward)
    return outputs0, loss0

