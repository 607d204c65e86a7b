"""The engine under every pipeline schedule: per-phase chunk bookkeeping, compute and P2P helpers.

A rank runs one or two *phases* (a phase = one stage module this rank holds, with the micro-batch
chunks that pass through it). A `Placement` says, per phase, which module runs it and where its
inputs come from and its outputs go: another pipeline rank, `None` (this is the first stage: inputs
are local; or the last stage: the criterion runs here) or `LOCAL` (the other phase on this rank, the
turn of DualPipeV's V). DualPipe, DualPipeV and 1F1B differ only in their placement and in the order
in which `step()` calls the helpers below (dualpipe.py, schedule_1f1b.py), so each schedule reads like
its diagram:

    _forward_chunk(phase)                 F: receive inputs, run the stage, queue the send
    _backward_chunk(phase, enable_zb)     B: receive output grads, backward, queue the input grads
    _forward_backward_chunk(p0, p1)       F of one chunk beside B of another (the overlap hook)
    _weight_chunk()                       W: one deferred weight-gradient chunk (zero bubble)

Sends and receives are queued and launched together at the next compute, which waits for them
(`_commit`). A W chunk launches them but waits only after its weight gradients: W needs no received
tensor, so it fills the time the transfers take (on gloo the host would otherwise sit in `wait`).

With `p2p_groups` (a communicator per direction, `Grid.pp_flow_groups`) a compute waits for its
receives only; sends complete on their own and are waited for at the end of the step. An F&B chunk
without an overlap hook is then an F chunk and a B chunk: the forward starts once its input is there
and its output leaves before the backward, instead of both waiting for both inputs and both outputs
for the backward (what an overlap needs, since it interleaves the two). On V3 stages that takes a third
off DualPipe's bubble (`bench/pipeline.py --stages v3`). The send leaves before the peer posts the
receive it matches, which is safe only because every message of a communicator flows one way along
the pipeline (on one NCCL stream for both ways it would queue ahead of groups the peer waits for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.pipeline import p2p
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore

LOCAL = -1  # "the other phase on this rank" as a source or destination


@dataclass(frozen=True)
class Placement:
    """Where each phase of this rank gets its inputs and sends its outputs (pipeline positions)."""

    module_index: tuple[int, ...]  # phase -> index into the engine's modules
    fwd_src: tuple[int | None, ...]  # phase -> position, None (first stage) or LOCAL
    fwd_dst: tuple[int | None, ...]  # phase -> position, None (last stage) or LOCAL


@dataclass
class _Phase:
    inputs: list = field(default_factory=list)  # per chunk: list of stage inputs
    outputs: list = field(default_factory=list)  # per chunk: list of stage outputs
    input_grads: list = field(default_factory=list)
    output_grads: list = field(default_factory=list)
    labels: list = field(default_factory=list)  # per chunk (last stage only)
    losses: list = field(default_factory=list)  # per chunk (last stage with a criterion)
    next_f: int = 0
    next_b: int = 0
    next_send_f: int = 0
    next_send_b: int = 0


def sequential_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                output_grads1):
    """Default `overlapped_forward_backward`: chunk 0's forward, then chunk 1's backward.

    Returns (outputs0, loss0); loss0 is None unless chunk 0 ends at the criterion. Expert parallelism
    replaces this with a version that interleaves the two chunks' all-to-alls with compute.
    """
    outputs0 = module0(*inputs0)
    outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    if loss1 is not None:
        loss1.backward()
    elif outputs1:
        torch.autograd.backward(outputs1, grad_tensors=output_grads1)
    return outputs0, loss0


def split_batch(tensors: Sequence[torch.Tensor], num_chunks: int, batch_dim: int, what: str) -> list:
    """[t0, t1, ...] -> num_chunks lists [t0_i, t1_i, ...] of equal micro-batches along batch_dim."""
    chunks = [[] for _ in range(num_chunks)]
    for j, t in enumerate(tensors):
        size = t.shape[batch_dim]
        if size % num_chunks:
            raise ValueError(f"{what}[{j}] has {size} rows along batch_dim={batch_dim}, not divisible "
                             f"into {num_chunks} micro-batches")
        for i, part in enumerate(t.chunk(num_chunks, dim=batch_dim)):
            chunks[i].append(part)
    return chunks


class PipelineEngine(nn.Module):
    """Shared machinery of DualPipe, DualPipeV and 1F1B; subclasses give `placement` and `step`."""

    def __init__(self, modules: Sequence[nn.Module], batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None,
                 rank_mapping: Sequence[int] | None = None,
                 overlapped_forward_backward: Callable | None = None,
                 p2p_groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None) -> None:
        super().__init__()
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs torch.distributed initialised (one rank "
                               "is fine): call dist.init_process_group first")
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.num_ranks = self.group.size()
        mapping = list(range(self.num_ranks)) if rank_mapping is None else list(rank_mapping)
        if sorted(mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping={mapping}: must be a permutation of 0..{self.num_ranks - 1}")
        self.rank = mapping[self.group.rank()]  # position in the pipeline
        self._group_rank_of = {pos: g for g, pos in enumerate(mapping)}
        if overlapped_forward_backward is None:
            # As in deepseek-ai/DualPipe: a stage class may provide the overlap as a static method.
            same_type = len({type(m) for m in modules}) == 1
            overlapped_forward_backward = getattr(type(modules[0]), "overlapped_forward_backward",
                                                  None) if same_type else None
        self.overlapped_forward_backward = overlapped_forward_backward  # None: no overlap
        # (towards higher positions, towards lower): the same ranks as `group`, one communicator per way
        self.p2p_groups = p2p_groups
        self.placement = self._placement()
        # on_chunk(phase, chunk, forward): called as a chunk's forward or backward begins (the pipeline
        # runner marks the micro-batch in flight with it: in_flight.py)
        self.on_chunk: Callable[[int, int, bool], None] | None = None

    def _placement(self) -> Placement:
        raise TypeError(f"{type(self).__name__} must define _placement()")

    # ---- state ------------------------------------------------------------------------------------
    def _reset(self, criterion=None, return_outputs: bool = False) -> None:
        for req in getattr(self, "sent", []):  # the last step's sends (p2p_groups)
            req.wait()
        self.sent: list = []
        WeightGradStore.clear()
        self.phases = [_Phase() for _ in self.placement.module_index]
        self.ops: list = []  # queued P2P operations
        self.inflight: list = []  # launched, not yet waited for
        self.criterion = criterion
        self.return_outputs = return_outputs
        self.forward_only = not torch.is_grad_enabled()

    def _is_first(self, phase: int) -> bool:
        return self.placement.fwd_src[phase] is None

    def _is_last(self, phase: int) -> bool:
        return self.placement.fwd_dst[phase] is None

    def _peer(self, position: int) -> int:
        return self._group_rank_of[position]

    def _p2p_group(self, src: int, dst: int) -> dist.ProcessGroup:
        """The communicator of a message from pipeline position src to dst."""
        if self.p2p_groups is None:
            return self.group
        return self.p2p_groups[0] if dst > src else self.p2p_groups[1]

    def _load(self, inputs, labels, num_chunks: int) -> None:
        """Split the step's inputs to the first-stage phase and labels to the last-stage phase."""
        for phase in range(len(self.phases)):
            if self._is_first(phase):
                self.phases[phase].inputs = split_batch(inputs, num_chunks, self.batch_dim, "inputs")
            if self._is_last(phase):
                self.phases[phase].labels = (split_batch(labels, num_chunks, self.batch_dim, "labels")
                                             if labels else [[] for _ in range(num_chunks)])

    def _result(self):
        """(loss [num_chunks] or None, outputs or None) from the last-stage phase of this rank."""
        loss, outputs = None, None
        for ph in [p for i, p in enumerate(self.phases) if self._is_last(i)]:
            if self.criterion is not None:
                loss = torch.stack(ph.losses)
            if self.return_outputs:
                outputs = [torch.cat(parts, dim=self.batch_dim) for parts in zip(*ph.outputs)]
                outputs = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if not WeightGradStore.funcs_queue.empty():
            raise RuntimeError("schedule left deferred weight gradients unapplied")
        return loss, outputs

    # ---- compute ----------------------------------------------------------------------------------
    def _begin_forward(self, phase: int):
        ph = self.phases[phase]
        i = ph.next_f
        ph.next_f += 1
        if self.on_chunk is not None:
            self.on_chunk(phase, i, True)
        module = self.module[self.placement.module_index[phase]]
        inputs = ph.inputs[i]
        if self.forward_only:
            ph.inputs[i] = None
        last = self._is_last(phase)
        criterion = self.criterion if last else None
        labels = ph.labels[i] if last else []
        return module, inputs, criterion, labels

    def _end_forward(self, phase: int, outputs, loss) -> None:
        ph = self.phases[phase]
        if not self._is_last(phase):
            ph.outputs.append(outputs)
            return
        if loss is not None:
            ph.losses.append(loss)
        if self.return_outputs:
            ph.outputs.append([t.detach() for t in outputs])

    def _begin_backward(self, phase: int):
        """(module, loss, outputs, output_grads) of the next chunk to run backward in `phase`."""
        ph = self.phases[phase]
        i = ph.next_b
        if self.on_chunk is not None:
            self.on_chunk(phase, i, False)
        module = self.module[self.placement.module_index[phase]]
        if self._is_last(phase):
            return module, ph.losses[i], [], []
        pairs = [(o, g) for o, g in zip(ph.outputs[i], ph.output_grads[i])
                 if g is not None and o.requires_grad]
        ph.outputs[i] = ph.output_grads[i] = None
        return module, None, [o for o, _ in pairs], [g for _, g in pairs]

    def _end_backward(self, phase: int, loss) -> None:
        ph = self.phases[phase]
        i = ph.next_b
        ph.next_b += 1
        if loss is not None:
            loss.detach_()
        inputs, ph.inputs[i] = ph.inputs[i], None
        if self._is_first(phase):
            ph.input_grads.append(None)  # nobody upstream
            return
        ph.input_grads.append([(t.grad if t.grad is not None else torch.zeros_like(t))
                               if t.is_floating_point() else None for t in inputs])

    def _forward_compute(self, phase: int) -> None:
        module, inputs, criterion, labels = self._begin_forward(phase)
        outputs = module(*inputs)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        loss = criterion(*outputs, *labels) if criterion is not None else None
        self._end_forward(phase, outputs, loss)

    def _backward_compute(self, phase: int, enable_zb: bool = False) -> None:
        if self.forward_only:
            return
        _, loss, outputs, grads = self._begin_backward(phase)
        WeightGradStore.enabled = enable_zb
        if loss is not None:
            loss.backward()
        elif outputs:
            torch.autograd.backward(outputs, grad_tensors=grads)
        WeightGradStore.enabled = False
        if enable_zb:
            WeightGradStore.flush()
        self._end_backward(phase, loss)

    def _forward_backward_compute(self, phase0: int, phase1: int) -> None:
        if self.forward_only:
            self._forward_compute(phase0)
            return
        module0, inputs0, criterion0, labels0 = self._begin_forward(phase0)
        module1, loss1, outputs1, grads1 = self._begin_backward(phase1)
        overlapped = self.overlapped_forward_backward or sequential_forward_backward
        outputs0, loss0 = overlapped(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
        self._end_forward(phase0, outputs0, loss0)
        self._end_backward(phase1, loss1)

    # ---- communication ----------------------------------------------------------------------------
    def _recv_forward(self, phase: int) -> None:
        src = self.placement.fwd_src[phase]
        if src is None or src == LOCAL:
            return
        self.phases[phase].inputs.append(p2p.append_irecv_forward(
            self.ops, self._peer(src), self._p2p_group(src, self.rank), requires_grad=not self.forward_only))

    def _send_forward(self, phase: int) -> None:
        dst = self.placement.fwd_dst[phase]
        if dst is None:
            return
        ph = self.phases[phase]
        i = ph.next_send_f
        ph.next_send_f += 1
        outputs = ph.outputs[i]
        if self.forward_only:
            ph.outputs[i] = None
        if dst == LOCAL:  # the turn of a V: my output is my other phase's input
            grad = not self.forward_only
            self.phases[1 - phase].inputs.append(
                [t.detach().requires_grad_(grad and t.is_floating_point()) for t in outputs])
        else:
            p2p.append_isend(self.ops, outputs, self._peer(dst), self._p2p_group(self.rank, dst))

    def _recv_backward(self, phase: int) -> None:
        dst = self.placement.fwd_dst[phase]
        if self.forward_only or dst is None or dst == LOCAL:
            return
        self.phases[phase].output_grads.append(
            p2p.append_irecv_backward(self.ops, self._peer(dst), self._p2p_group(dst, self.rank)))

    def _send_backward(self, phase: int) -> None:
        src = self.placement.fwd_src[phase]
        if self.forward_only or src is None:
            return
        ph = self.phases[phase]
        i = ph.next_send_b
        ph.next_send_b += 1
        grads, ph.input_grads[i] = ph.input_grads[i], None
        if src == LOCAL:
            self.phases[1 - phase].output_grads.append(grads)
        else:
            p2p.append_isend(self.ops, grads, self._peer(src), self._p2p_group(self.rank, src))

    def _post(self) -> list:
        """Launch the queued operations; return the requests a compute must wait for: all of them, or
        with `p2p_groups` the receives (the sends join `sent`, waited for at the end of the step)."""
        if self.p2p_groups is None:
            return p2p.post(self.ops)
        sends, recvs = p2p.post_apart(self.ops)
        self.sent = [req for req in self.sent if not req.is_completed()] + sends
        return recvs

    def _commit(self) -> None:
        for req in self.inflight + self._post():
            req.wait()
        self.inflight = []

    # ---- chunks: what the schedules are written in ------------------------------------------------
    def _forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self._recv_forward(phase)
        self._commit()
        self._forward_compute(phase)
        if send:
            self._send_forward(phase)

    def _backward_chunk(self, phase: int, enable_zb: bool = False, recv: bool = True,
                        send: bool = True) -> None:
        if recv:
            self._recv_backward(phase)
        self._commit()
        self._backward_compute(phase, enable_zb)
        if send:
            self._send_backward(phase)

    def _forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        if self.overlapped_forward_backward is None and self.p2p_groups is not None and not self.forward_only:
            self._forward_chunk(phase0, recv=recv0)  # nothing to overlap: F, its output leaves, then B
            self._backward_chunk(phase1)
            return
        if recv0:
            self._recv_forward(phase0)
        self._recv_backward(phase1)
        self._commit()
        self._forward_backward_compute(phase0, phase1)
        self._send_forward(phase0)
        self._send_backward(phase1)

    def _weight_chunk(self) -> None:
        if self.forward_only:
            return
        self.inflight += self._post()
        WeightGradStore.pop()
