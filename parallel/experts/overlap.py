"""Overlapped forward-backward of two micro-batches on one thread: one's all-to-alls fly while the other computes.

The forward of micro-batch 0 runs as a plain module call. Its all-to-alls (the MoE dispatch and
combine, `all_to_all.py`) are issued with `async_op=True` and finished through `wait(work)`; inside an
overlapped region, `wait` first runs the *next segment of micro-batch 1's backward*, then waits for
what is by then usually a finished transfer. Nothing else ever runs concurrently on the CPU: no Python
thread is started, the hand-off is an ordinary call.

The backward of micro-batch 1 is driven explicitly, segment by segment, over block boundaries. Every
block holding an expert-parallel MoE passes its input through `mark_block_input` (an identity autograd
node, registered by `apply_expert_parallel`), so micro-batch 1's graph carries its block boundaries,
whatever forward recorded it. `_segments` walks the graph from the backward's roots and cuts it at
those markers into levels: level 0 is everything from the roots down to the first markers (the loss,
the head, the last MoE block), level k+1 everything from the markers of level k down to the next
ones. Segment k is one `torch.autograd.grad` call from level k's roots (the loss / the stage outputs,
then the markers' incoming gradients) to the next markers and the leaves (parameters, stage inputs)
of level k, whose gradients are then accumulated into `.grad` as `AccumulateGrad` would.

Exactness: a cut is taken only where every path into the next level goes through its markers (each
node belongs to one level; otherwise the region falls back to one plain backward after the forward).
Then every node runs once, on the same incoming gradients summed within one engine call in the same
order, so outputs, losses and gradients are bit-identical to the forward followed by the backward.

Pairing: per forward all-to-all one backward segment (about one block: its combine and dispatch
backward, experts, gate, attention) computes while the forward's bytes move; the remaining segments
run after the forward. The backward's own all-to-alls are waited inside their segment (the forward is
suspended then), so they are not hidden: that needs sub-block segments (attention | dispatch | experts
| combine) with the backward all-to-alls issued by this driver, not built here. The count exchanges
are waited without a hand-off (`wait(work, switch=False)`). Every rank of an EP group runs the same
program, so collectives are issued in the same order on every rank.

On CUDA the same program overlaps on the device: NCCL runs the all-to-all on its own stream (issued
behind the compute that produced its input), `work.wait()` only makes the compute stream wait, and
the backward segment's kernels queue on the compute stream meanwhile (the autograd engine's device
thread is torch's own; no thread is started here either).

`overlapped_forward_backward` has DualPipe's hook signature (docs/reference.md §4); outside a region
`wait` just waits.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node


class _BlockInput(torch.autograd.Function):
    """Identity that marks a block boundary in the autograd graph (a view: no copy, no arithmetic)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad


def mark_block_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a block: pass its first argument (the residual stream h [B, T, H]) through
    the boundary marker when autograd records."""
    if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled() \
            or not args[0].requires_grad:
        return None
    return (_BlockInput.apply(args[0]),) + tuple(args[1:])


def _is_marker(node: Node) -> bool:
    return isinstance(node, _BlockInput._backward_cls)


def _levels(roots: list[Node]) -> list[tuple[list[Node], list[Node]]] | None:
    """roots -> per level (its markers ending it, its AccumulateGrad leaves); None if a node is
    reachable from two levels (a path around a marker: no exact cut)."""
    level_of: dict[Node, int] = {}
    levels = []
    frontier = roots
    while frontier:
        here = len(levels)
        for node in frontier:
            level_of[node] = here
        markers: list[Node] = []
        leaves: list[Node] = []
        stack = list(frontier)
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                if _is_marker(nxt):
                    if nxt in level_of:   # a marker of this level or an earlier one: reached around
                        return None
                    if nxt not in markers:
                        markers.append(nxt)
                elif nxt in level_of:
                    if level_of[nxt] != here:
                        return None
                else:
                    level_of[nxt] = here
                    if hasattr(nxt, "variable"):
                        leaves.append(nxt)
                    stack.append(nxt)
        levels.append((markers, leaves))
        frontier = markers
    return levels


def _accumulate(leaf: torch.Tensor, grad: torch.Tensor) -> None:
    """What `AccumulateGrad` does with a leaf's gradient outside grad mode."""
    if leaf.grad is None:
        leaf.grad = grad
    else:
        leaf.grad += grad


def _segments(loss: torch.Tensor | None, outputs: Sequence[torch.Tensor],
              output_grads: Sequence[torch.Tensor]) -> Iterator[None]:
    """Micro-batch 1's backward, one level per step (see the module docstring)."""
    if loss is not None:
        roots, grads = [loss], [None]
    else:
        roots, grads = list(outputs), list(output_grads)
    if not roots:
        return
    levels = _levels([t.grad_fn for t in roots]) if all(t.grad_fn is not None for t in roots) else None
    if levels is None:  # no exact cut: one plain backward
        backward_chunk(loss, outputs, output_grads)
        yield
        return
    for markers, leaves in levels:
        edges = [GradientEdge(m, 0) for m in markers]
        variables = [leaf.variable for leaf in leaves]
        got = torch.autograd.grad(roots, edges + variables, grads, allow_unused=True) \
            if edges or variables else ()
        for variable, grad in zip(variables, got[len(edges):]):
            if grad is not None:
                _accumulate(variable, grad)
        kept = [(e, g) for e, g in zip(edges, got[:len(edges)]) if g is not None]
        roots, grads = [e for e, _ in kept], [g for _, g in kept]
        yield
        if not roots:
            return


class _Region:
    """Micro-batch 1's backward segments, stepped from the forward's waits."""

    def __init__(self, segments: Iterator[None]) -> None:
        self.segments = segments
        self.running = False      # inside a segment: its own waits do not hand off
        self.switches = 0

    def step(self) -> bool:
        """Run the next backward segment; False when none is left."""
        self.running = True
        try:
            next(self.segments)
        except StopIteration:
            return False
        finally:
            self.running = False
        return True


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
"""Backward segments run inside the forward's waits in the last overlapped region."""

_ACTIVE: _Region | None = None


def wait(work: Any, switch: bool = True) -> None:
    """Wait for an async collective; inside an overlapped region's forward (and with `switch`), run
    the next backward segment first. Small exchanges needed at once (counts) pass switch=False."""
    region = _ACTIVE
    if switch and region is not None and not region.running and region.step():
        region.switches += 1
    t0 = time.perf_counter()
    work.wait()
    COMM_STATS.record(time.perf_counter() - t0)


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
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("overlapped_forward_backward: regions cannot nest")
    region = _Region(_segments(loss1, list(outputs1), list(output_grads1)))
    _ACTIVE = region
    try:
        outputs0, loss0 = forward_chunk(module0, inputs0, criterion0, labels0)
    finally:
        _ACTIVE = None
        LAST_REGION["switches"] = region.switches
    while region.step():
        pass
    return outputs0, loss0
