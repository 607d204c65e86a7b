"""Overlapped forward-backward of two micro-batches on one thread, DualPipe-style: while one
micro-batch's all-to-all is in flight, the other micro-batch computes, in both directions.

The forward of micro-batch 0 runs as a plain module call. Its all-to-alls (the MoE dispatch and
combine, `all_to_all.py`) are issued with `async_op=True` and finished through `wait(work)`; inside an
overlapped region, `wait` first runs the *next segment of micro-batch 1's backward*, then waits for
what is by then usually a finished transfer. The backward of micro-batch 1 is driven explicitly, in
sub-layer chunks, and *its* all-to-alls are issued by this driver and waited only in the next segment,
i.e. after micro-batch 0's next forward chunk ran. Per MoE block the two interleave as in DeepSeek's
DualPipe figure:

    forward (mb 0):   attention+gate F | dispatch a2a | experts F | combine a2a | ...
    backward (mb 1):  combine B -> a2a | experts B -> a2a | dispatch B + attention B (+ combine B of
                      the block below) -> a2a | ...

The first segment runs before the forward starts, segment k + 1 inside forward wait k, so each
backward all-to-all flies during a forward compute chunk and each forward all-to-all during a backward
segment; what is left after the forward's last wait runs after it.
Nothing runs concurrently on the CPU: no Python thread is started, the hand-off is an ordinary call.

How the backward is cut. Three kinds of autograd nodes are *cuts*:
  - the backward of a row exchange (`all_to_all.is_exchange_node`): the driver issues its all-to-all
    (`all_to_all.start_backward`) instead of the engine, and hands the rows on when they arrived;
  - identity markers (`mark`), hooked in by `apply_expert_parallel` on the router's scores
    (`mark_router_scores`) and the shared experts' output;
  - a block's residual add (h + mlp(norm(h)), tagged by `tag_residual_fork`): its backward passes the
    same gradient to both operands (alpha 1, same shape and dtype: checked), so the driver hands it to
    the residual (attention side) and to the MoE branch separately.
The other nodes are split into *groups*: nodes joined by an edge that is not a cut are in one group
(edges taken both ways, and all feeders of one cut in one group). A group runs as one
`torch.autograd.grad` call, from the gradients delivered into it (the loss or stage outputs, or
what cuts handed on) to the cuts it feeds and its leaves (parameters, stage inputs), whose gradients
are accumulated into `.grad` as `AccumulateGrad` would. Groups and cuts form a graph that must have no
cycle (a path around a cut joins the two sides into one group and makes one); otherwise the region
falls back to one plain backward, run in the forward's first wait.

Exactness: every node runs once, on the same incoming gradients, so outputs, losses and gradients
are bit-identical to the forward followed by the backward. A node sums its incoming gradients in the
order they arrive: inside a group in the engine's own order (the same priorities as in one plain
backward); a gradient a cut delivers into a group is a root of the group's call and arrives first, as
in the plain backward, where the cut's node ran before anything on the other side of it (the
residual from the block's add reaches the attention output before the post-attention norm's
gradients do). The tests compare with `torch.equal`. Every rank of an EP group runs the same program
over the same graph, so its collectives are issued in the same order on every rank. The count
exchanges are waited without a hand-off (`wait(work, switch=False)`).

On CUDA the same program overlaps on the device: NCCL runs the all-to-all on its own stream (issued
behind the compute that produced its input), `work.wait()` only makes the compute stream wait, and
the backward segment's kernels queue on the compute stream meanwhile (the autograd engine's device
thread is torch's own; no thread is started here either).

`overlapped_forward_backward` has DualPipe's hook signature (docs/reference.md §4); outside a region
`wait` just waits.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node

FORK = "twinpipe.overlap.fork"
"""Node metadata key that `tag_residual_fork` sets on a block's residual add."""


class _Mark(torch.autograd.Function):
    """Identity that marks a cut in the autograd graph (a view: no copy, no arithmetic)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad


def mark(t: Any) -> Any:
    """`t` through a cut marker when autograd records it (anything else is returned as is)."""
    if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
        return _Mark.apply(t)
    return t


def mark_outputs(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: the module's output tensor(s) through cut markers (a tensor or a tuple)."""
    if isinstance(output, tuple):
        return tuple(mark(o) for o in output)
    return mark(output)


def mark_router_scores(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook on the router (`(topk_weight, topk_idx, scores)`): its scores through a cut marker
    (the balance loss reads them from outside the block). Not the gate weights: they leave with the
    dispatch's rows and their gradient comes back with its backward, into the router's own group (a
    marker there would be fed and followed by that one group: a cycle)."""
    topk_weight, topk_idx, scores = output
    return topk_weight, topk_idx, mark(scores)


def tag_residual_fork(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on a block: tag its output's residual add (`h + mlp(...)`) as a cut. The driver
    re-checks that the add only passes its gradient through (alpha 1, same shapes and dtypes)."""
    node = output.grad_fn if isinstance(output, torch.Tensor) else None
    if node is not None and node.name() == "AddBackward0":
        node.metadata[FORK] = True


def _is_fork(node: Node) -> bool:
    if node.name() != "AddBackward0" or not node.metadata.get(FORK) or node._saved_alpha != 1:
        return False
    (out,) = node._input_metadata
    for nxt, nr in node.next_functions:
        if nxt is not None:
            meta = nxt._input_metadata[nr]
            if (list(meta.shape), meta.dtype, meta.device) != (list(out.shape), out.dtype, out.device):
                return False
    return True


def _cut_kind(node: Node, is_exchange: Callable[[Node], bool]) -> str | None:
    """'a2a', 'mark', 'fork' for a cut, None for a node that runs inside a group."""
    if is_exchange(node):
        return "a2a"
    if isinstance(node, _Mark._backward_cls):
        return "mark"
    if _is_fork(node):
        return "fork"
    return None


def _zeros(node: Node) -> torch.Tensor:
    """What a custom Function's backward gets for an output no gradient reached (materialized zeros)."""
    (meta,) = node._input_metadata
    return torch.zeros(list(meta.shape), dtype=meta.dtype, device=meta.device)


def _accumulate(leaf: torch.Tensor, grad: torch.Tensor) -> None:
    """What `AccumulateGrad` does with a leaf's gradient outside grad mode."""
    if leaf.grad is None:
        leaf.grad = grad
    else:
        leaf.grad += grad


@dataclass
class _Plan:
    """Micro-batch 1's backward graph as groups and cuts (see the module docstring). Vertices are
    group ids (int) and cut nodes."""

    kinds: dict[Node, str | None]      # every node: its cut kind, None inside a group
    group_of: dict[Node, int]          # non-cut node -> group id
    feeds: dict[int, list[Node]]       # group -> the cuts it feeds (captured by its grad call)
    leaves: dict[int, list[Node]]      # group -> its AccumulateGrad nodes
    succ: dict[Any, list[Any]]         # vertex -> the vertices it hands gradients to
    indegree: dict[Any, int]           # vertex -> how many vertices hand it gradients


def _plan(root_edges: list[tuple[Node, int]]) -> _Plan | None:
    """Discover the graph from the roots, split it into groups at the cuts; None if the groups and
    cuts do not form an acyclic graph (no exact cut), or a cut is fed from two sides."""
    nodes: list[Node] = []
    seen: set[Node] = set()
    stack = [node for node, _ in reversed(root_edges)]
    while stack:  # depth-first, in next_functions order: the same order on every rank
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(nxt for nxt, _ in reversed(node.next_functions) if nxt is not None and nxt not in seen)
    from twinpipe.parallel.experts.all_to_all import is_exchange_node

    kinds = {node: _cut_kind(node, is_exchange_node) for node in nodes}

    parent = {node: node for node in nodes if kinds[node] is None}

    def find(node: Node) -> Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    feeders: dict[Node, list[Node]] = defaultdict(list)
    for node in nodes:
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if kinds[nxt] is not None:
                feeders[nxt].append(node)
            elif kinds[node] is None:
                parent[find(nxt)] = find(node)
    roots = {node for node, _ in root_edges}
    for cut, fed in feeders.items():
        regular = [f for f in fed if kinds[f] is None]
        if len(regular) != len(fed) and (len(fed) > 1 or cut in roots):
            return None  # fed by a cut and by something else: two contributions from two sides
        if regular and cut in roots:
            return None
        for f in regular[1:]:
            parent[find(f)] = find(regular[0])
    index: dict[Node, int] = {}
    group_of = {node: index.setdefault(find(node), len(index)) for node in nodes if kinds[node] is None}

    # vertices: group ids (int) and cut nodes; edges group -> cut it feeds, cut -> its successors
    feeds: dict[int, list[Node]] = defaultdict(list)
    leaves: dict[int, list[Node]] = defaultdict(list)
    succ: dict[Any, list[Any]] = defaultdict(list)
    for node in nodes:
        if kinds[node] is None:
            if hasattr(node, "variable"):
                leaves[group_of[node]].append(node)
            continue
        for f in feeders.get(node, []):
            targets = feeds[group_of[f]] if kinds[f] is None else succ[f]
            if node not in targets:
                targets.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                dst = group_of.get(nxt, nxt)
                if dst not in succ[node]:
                    succ[node].append(dst)
    for group, cuts in feeds.items():
        succ[group] = list(cuts)
    vertices = list(dict.fromkeys([group_of.get(n, n) for n in nodes]))
    indegree = {v: 0 for v in vertices}
    for v in vertices:
        for w in succ.get(v, []):
            indegree[w] += 1
    remaining, ready = dict(indegree), [v for v in vertices if indegree[v] == 0]
    done = 0
    while ready:  # Kahn: every vertex reached means no cycle
        v = ready.pop()
        done += 1
        for w in succ.get(v, []):
            remaining[w] -= 1
            if remaining[w] == 0:
                ready.append(w)
    if done != len(vertices):
        return None
    return _Plan(kinds, group_of, feeds, leaves, succ, indegree)


def _timed_wait(work: Any) -> None:
    t0 = time.perf_counter()
    work.wait()
    COMM_STATS.record(time.perf_counter() - t0)


def _run_group(box: dict[tuple[Node, int], torch.Tensor], cuts: list[Node],
               leaves: list[Node]) -> Sequence[torch.Tensor | None]:
    """One group's `torch.autograd.grad` call: from the gradients delivered into it (`box`) to the
    cuts it feeds (returned) and its leaves (accumulated into `.grad`)."""
    if not box or not (cuts or leaves):
        return [None] * len(cuts)
    variables = [leaf.variable for leaf in leaves]
    got = torch.autograd.grad([GradientEdge(*edge) for edge in box], [GradientEdge(c, 0) for c in cuts]
                              + variables, list(box.values()), allow_unused=True)
    for variable, grad in zip(variables, got[len(cuts):]):
        if grad is not None:
            _accumulate(variable, grad)
    return got[:len(cuts)]


def _drive(plan: _Plan, root_edges: list[tuple[Node, int]], root_grads: list[torch.Tensor],
           stats: dict) -> Iterator[None]:
    """Run the plan; yield after issuing the backward's all-to-alls whenever nothing else can run
    until they arrive (a segment ends there)."""
    from twinpipe.parallel.experts import all_to_all

    kinds, group_of = plan.kinds, plan.group_of
    waiting = dict(plan.indegree)
    inbox: dict[Any, dict[tuple[Node, int], torch.Tensor]] = defaultdict(dict)  # vertex -> edge -> grad
    ready: list[Any] = []
    pending: list[tuple[Node, torch.Tensor, Any]] = []

    def deliver(edge: tuple[Node, int], grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        box = inbox[group_of.get(edge[0], edge[0])]
        box[edge] = box[edge] + grad if edge in box else grad

    def done(vertex: Any) -> None:
        for w in plan.succ.get(vertex, []):
            waiting[w] -= 1
            if waiting[w] == 0:
                ready.append(w)

    def hand_on(cut: Node, grad: torch.Tensor | None) -> None:
        for edge in (cut.next_functions if kinds[cut] == "fork" else cut.next_functions[:1]):
            if edge[0] is not None:
                deliver(edge, grad)
        done(cut)

    for edge, grad in zip(root_edges, root_grads):
        deliver(edge, grad)
    ready.extend(v for v in dict.fromkeys(group_of.get(n, n) for n, _ in root_edges) if waiting[v] == 0)
    while True:
        while ready:
            vertex = ready.pop(0)
            if isinstance(vertex, int):
                cuts = plan.feeds.get(vertex, [])
                for cut, grad in zip(cuts, _run_group(inbox.pop(vertex, {}), cuts,
                                                      plan.leaves.get(vertex, []))):
                    deliver((cut, 0), grad)
                done(vertex)
                continue
            cut = vertex
            grad = inbox.pop(cut, {}).get((cut, 0))
            if grad is None and kinds[cut] != "fork":
                grad = _zeros(cut)  # the engine would call the Function's backward with zeros
            if kinds[cut] == "a2a":
                out, work = all_to_all.start_backward(cut, grad)
                pending.append((cut, out, work))
                stats["exchanges"] += 1
            else:
                hand_on(cut, grad)
        if not pending:
            return
        yield  # a segment ends: the forward computes while the exchanges fly
        for cut, out, work in pending:
            _timed_wait(work)
            hand_on(cut, out)
        pending.clear()


def _segments(loss: torch.Tensor | None, outputs: Sequence[torch.Tensor],
              output_grads: Sequence[torch.Tensor], stats: dict) -> Iterator[None]:
    """Micro-batch 1's backward as segments; the first one runs before the forward."""
    if loss is not None:
        roots, grads = [loss], [torch.ones_like(loss)]
    else:
        roots, grads = list(outputs), list(output_grads)
    if not roots:
        return
    plan = None
    if all(t.grad_fn is not None for t in roots):
        root_edges = [(t.grad_fn, t.output_nr) for t in roots]
        plan = _plan(root_edges)
    if plan is None:  # no exact cut: one plain backward, inside the forward's first wait
        yield
        backward_chunk(loss, outputs, output_grads)
        yield
        return
    stats["planned"] = True
    yield from _drive(plan, root_edges, grads, stats)
    yield


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
LAST_REGION = {"switches": 0, "segments": 0, "exchanges": 0, "planned": False}
"""The last overlapped region: backward segments run inside the forward's waits (`switches`) and in
all (`segments`), the backward all-to-alls the driver issued (`exchanges`), and whether the backward
was cut (`planned`; False: one plain backward)."""

_ACTIVE: _Region | None = None


def wait(work: Any, switch: bool = True) -> None:
    """Wait for an async collective; inside an overlapped region's forward (and with `switch`), run
    the next backward segment first. Small exchanges needed at once (counts) pass switch=False."""
    region = _ACTIVE
    if switch and region is not None and not region.running and region.step():
        region.switches += 1
    _timed_wait(work)


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
    stats = {"exchanges": 0, "planned": False}
    region = _Region(_segments(loss1, list(outputs1), list(output_grads1), stats))
    segments = int(region.step())  # up to the backward's first all-to-all, before the forward
    _ACTIVE = region
    try:
        outputs0, loss0 = forward_chunk(module0, inputs0, criterion0, labels0)
    finally:
        _ACTIVE = None
    while region.step():
        segments += 1
    LAST_REGION.update(switches=region.switches, segments=segments + region.switches, **stats)
    return outputs0, loss0
