"""Overlapped forward-backward of two micro-batches: one's all-to-alls progress while the other computes.

The forward of micro-batch 0 (on the calling thread) and the backward of micro-batch 1 (on one
long-lived helper thread) run as two coroutines with a strict hand-off: exactly one of them runs
Python/torch work at a time. Whenever one side issues an asynchronous collective (the MoE dispatch or
combine, forward or backward, see `all_to_all.py`), it calls `wait(work)`, which hands the CPU to the
other side *before* waiting; the collective then progresses in the communication backend's threads
while the other side computes its next chunk (attention, experts, ...). When the other side reaches
its own collective it hands back, and the first side waits for what is usually an already finished
transfer.

The backward starts, so the chunks pair up as in DeepSeek-V3's overlap (report §3.2.1,
docs/reference.md §4): the backward's combine is in flight while the forward computes attention and
the gate; the forward's dispatch while the backward computes the experts; the backward's dispatch
while the forward computes the experts; the forward's combine while the backward computes attention.
The small count exchange before each dispatch is waited for without a hand-off (`wait(work,
switch=False)`).

The hand-off order is a pure function of the program, so every rank of an expert-parallel group issues
its collectives in the same order (a requirement of all collectives on one process group), and the
arithmetic is exactly that of running the forward and then the backward: results are bit-identical.

`overlapped_forward_backward` has DualPipe's hook signature (docs/reference.md §4), so the pipeline
engine can plug it in; outside such a region `wait` just waits.

Scope: this is the CPU/gloo form, where autograd runs a backward on the thread that calls it. On CUDA
the engine runs backward nodes on its own device thread, where `wait` does not hand off: the result is
still correct but the backward's collectives are not overlapped; a GPU overlap wants the all-to-alls
on a side CUDA stream (DeepEP-style) instead, which is not built here.
"""

from __future__ import annotations

import os
import queue
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
    """Time spent blocked on collectives issued through `wait` (exposed communication), in total and
    per wait in issue order (the order is the same on every rank of a group, so benches can line the
    ranks' waits up)."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.num_waits = 0
        self.waits: list[float] = []

    def reset(self) -> None:
        self.wait_s = 0.0
        self.num_waits = 0
        self.waits = []

    def record(self, seconds: float) -> None:
        self.wait_s += seconds
        self.num_waits += 1
        self.waits.append(seconds)


COMM_STATS = CommStats()
LAST_REGION = {"switches": 0}
"""Hand-offs made in the last overlapped region (each one a chunk boundary at a collective)."""


def wait(work: Any, switch: bool = True) -> None:
    """Wait for an async collective; inside an overlapped region (and with `switch`), let the other
    micro-batch run its next chunk first. Small exchanges needed at once (counts) pass switch=False."""
    pair = _ACTIVE
    me = threading.get_ident()
    if switch and pair is not None and pair.owns(me):
        pair.switch(me)
    t0 = time.perf_counter()
    work.wait()
    COMM_STATS.record(time.perf_counter() - t0)


class _Helper:
    """One long-lived helper thread per process (re-created after a fork), running submitted calls."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="twinpipe-overlap", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.tasks.get()()


_HELPER: _Helper | None = None


def _helper() -> _Helper:
    global _HELPER
    if _HELPER is None or _HELPER.pid != os.getpid() or not _HELPER.thread.is_alive():
        _HELPER = _Helper()
    return _HELPER


def _run_pair(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run two callables as turn-taking coroutines: `first` on the calling thread, `second` (which
    starts) on the helper thread."""
    global _ACTIVE
    helper = _helper()
    pair = _Pair()
    me = threading.get_ident()
    pair.sides = [me, helper.thread.ident]
    pair.turn = helper.thread.ident
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]
    second_done = threading.Event()
    num_threads = torch.get_num_threads()
    grad_enabled = torch.is_grad_enabled()

    def run_second() -> None:
        ident = threading.get_ident()
        torch.set_num_threads(num_threads)  # OpenMP's thread count is per thread: keep the caller's
        try:
            pair.take_turn(ident)
            with torch.set_grad_enabled(grad_enabled):
                results[1] = second()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors[1] = exc
        finally:
            pair.finish(ident)
            second_done.set()

    with _ACTIVE_LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("overlapped_forward_backward: regions cannot nest")
        _ACTIVE = pair
    try:
        helper.tasks.put(run_second)
        try:
            pair.take_turn(me)
            results[0] = first()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the helper is done
            errors[0] = exc
        finally:
            pair.finish(me)
        second_done.wait()
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
    def forward() -> tuple[Any, torch.Tensor | None]:
        return forward_chunk(module0, inputs0, criterion0, labels0)

    def backward() -> None:
        backward_chunk(loss1, outputs1, output_grads1)

    (outputs0, loss0), _ = _run_pair(forward, backward)
    return outputs0, loss0

