"""DualPipe and DualPipeV: bidirectional pipeline schedules of DeepSeek-V3 (docs/reference.md §4).

One schedule, two stage placements. On every rank the schedule runs two phases: phase 0 carries
micro-batches from this rank's *outer* end towards the middle of the pipeline, phase 1 carries them
back out. Only where the turn in the middle is differs:

    DualPipe (N ranks, N even): rank r holds stage r and stage N-1-r; micro-batches enter at both
        ends (half at rank 0, half at rank N-1). The two middle ranks are each other's turn.
        rank:        0      1      2      3            phase 0 of rank 0,1: stages 0,1 ->
        module[0]:   s0 ->  s1 ->  s2 ->  s3           phase 0 of rank 3,2: stages 0,1 <-
        module[1]:   s3 <-  s2 <-  s1 <-  s0
    DualPipeV (N ranks): rank r holds stage r and stage 2N-1-r; all micro-batches enter at rank 0, go
        down to rank N-1, turn there (locally) and come back up.
        rank:        0      1      2      3
        module[0]:   s0 ->  s1 ->  s2 ->  s3 -.
        module[1]:   s7 <-  s6 <-  s5 <-  s4 <-'

With h = half the length of one direction (N/2 for DualPipe, N for DualPipeV), p = this rank's
distance from its outer end, and K = micro-batches per direction, every rank runs the eight steps
below (`_schedule`), the counts of docs/reference.md §4. B chunks marked zero-bubble only compute
input gradients; their weight gradients wait in WeightGradStore for a W chunk.

The API follows deepseek-ai/DualPipe: `step(*inputs, num_chunks, criterion, labels, return_outputs)`
returns `(loss, outputs)`, losses per micro-batch on the rank(s) where the criterion runs, gradients
summed over micro-batches; under `torch.no_grad()` it only runs forwards. With DualPipe the two copies
of a stage are separate parameters whose gradients the caller sums (see stages.py).
"""

from __future__ import annotations

import torch

from twinpipe.parallel.pipeline.p2p import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from twinpipe.parallel.pipeline.engine import LOCAL, PipelineEngine, Placement
from twinpipe.parallel.pipeline.weight_grad_store import WeightGradStore

__all__ = ["DualPipe", "DualPipeV", "WeightGradStore", "set_p2p_tensor_shapes",
           "set_p2p_tensor_dtype"]


class _BidirectionalPipe(PipelineEngine):
    """The eight-step schedule; subclasses say where the stages sit (`_placement`, `_geometry`)."""

    def _geometry(self) -> tuple[int, int, bool]:
        """(h, p, is_turn): half length of a direction, distance from the outer end, turn rank."""
        raise TypeError(f"{type(self).__name__} must define _geometry()")

    def _chunks_per_direction(self, num_chunks: int) -> int:
        raise TypeError(f"{type(self).__name__} must define _chunks_per_direction()")

    def step(self, *inputs: torch.Tensor, num_chunks: int = 0, criterion=None, labels=(),
             return_outputs: bool = False):
        """Run forward (and backward, unless grad is disabled) of `num_chunks` micro-batches."""
        k = self._chunks_per_direction(num_chunks)
        self._reset(criterion, return_outputs)
        if not self.forward_only and criterion is None and any(
                self._is_last(p) for p in range(2)):
            raise ValueError(f"{type(self).__name__}.step on rank {self.rank}: training needs a "
                             "criterion on the ranks that hold a last stage")
        self._load(list(inputs), list(labels), k)
        self._schedule(k)
        self._commit()
        result = self._result()
        self._reset()
        return result

    def _schedule(self, k: int) -> None:
        h, p, turn = self._geometry()

        # Step 1: nF0 -- fill: forwards from my outer end only.
        for _ in range(2 * (h - p - 1)):
            self._forward_chunk(0)

        # Step 2: nF0F1 -- the first chunks come back through the turn.
        n = p + 1
        self._recv_forward(0)
        for i in range(n):
            self._forward_chunk(0, recv=False, send=turn)
            self._recv_forward(0)
            self._forward_chunk(1, send=(not turn) or (i < n - 1))
            if not turn:
                self._send_forward(0)

        # Step 3: nB1W1F1 -- first backwards; their weight gradients fill the gap at once.
        for _ in range(h - p - 1):
            self._backward_chunk(1, enable_zb=True)
            self._recv_forward(1)
            self._weight_chunk()
            self._forward_chunk(1, recv=False)

        # Step 4: nF0B1F1B0 -- steady state, each forward beside a backward of the other phase.
        for i in range(k - 2 * h + p + 1):
            if i == 0 and turn:
                # The turn rank keeps these two apart, which shortens the others' wait.
                self._forward_chunk(0, recv=False, send=False)
                self._send_forward(1)
                self._backward_chunk(1, send=False)
                self._send_forward(0)
                self._send_backward(1)
            else:
                self._forward_backward_chunk(0, 1, recv0=i > 0)
            self._forward_backward_chunk(1, 0)

        # Step 5: nB1F1B0 -- phase 0 has no forwards left.
        for _ in range(h - p - 1):
            self._backward_chunk(1)
            self._forward_backward_chunk(1, 0)

        # Step 6: nB1B0 -- drain; the second half of these backwards defers W (zero bubble).
        n = p + 1
        enable_zb = False
        for i in range(n):
            if i == n // 2 and p % 2 == 1:
                enable_zb = True
            self._backward_chunk(1, enable_zb=enable_zb)
            if i == n // 2 and p % 2 == 0:
                enable_zb = True
            self._backward_chunk(0, enable_zb=enable_zb)

        # Step 7: nWB0 -- weight gradients fill the wait for the last phase-0 gradients.
        for _ in range(h - p - 1):
            self._weight_chunk()
            self._backward_chunk(0, enable_zb=True)

        # Step 8: nW -- the remaining weight gradients.
        for _ in range(p + 1):
            self._weight_chunk()


class DualPipe(_BidirectionalPipe):
    """DualPipe: `modules = (stage r, stage N-1-r)` on pipeline rank r of N (N even).

    Rank 0 takes the inputs of the micro-batches entering at its end and the labels of those leaving
    there (the others'); rank N-1 the same for its end. `num_chunks` counts both directions: even and
    at least 2N.
    """

    def _placement(self) -> Placement:
        n, r = self.num_ranks, self.rank
        if n % 2:
            raise ValueError(f"DualPipe on {n} ranks: DualPipe needs an even number of pipeline "
                             "ranks (use DualPipeV for an odd count)")
        first_half = r < n // 2
        outer = (r - 1 if r > 0 else None) if first_half else (r + 1 if r < n - 1 else None)
        inner = r + 1 if first_half else r - 1
        # phase 0 runs module 0 on the first half (stage r) and module 1 on the second (stage N-1-r).
        return Placement(module_index=(0, 1) if first_half else (1, 0),
                         fwd_src=(outer, inner), fwd_dst=(inner, outer))

    def _geometry(self) -> tuple[int, int, bool]:
        h = self.num_ranks // 2
        p = min(self.rank, self.num_ranks - 1 - self.rank)
        return h, p, p == h - 1

    def _chunks_per_direction(self, num_chunks: int) -> int:
        n = self.num_ranks
        if num_chunks <= 0 or num_chunks % 2 or num_chunks < 2 * n:
            raise ValueError(f"DualPipe num_chunks={num_chunks} on {n} ranks: need an even number "
                             f">= 2 * ranks = {2 * n}")
        return num_chunks // 2


class DualPipeV(_BidirectionalPipe):
    """DualPipeV: `modules = (stage r, stage 2N-1-r)` on pipeline rank r of N.

    Rank 0 takes all inputs and labels and returns the losses; `num_chunks` >= 2N.
    """

    def _placement(self) -> Placement:
        n, r = self.num_ranks, self.rank
        outer = r - 1 if r > 0 else None
        inner = r + 1 if r < n - 1 else LOCAL
        return Placement(module_index=(0, 1), fwd_src=(outer, inner), fwd_dst=(inner, outer))

    def _geometry(self) -> tuple[int, int, bool]:
        return self.num_ranks, self.rank, self.rank == self.num_ranks - 1

    def _chunks_per_direction(self, num_chunks: int) -> int:
        n = self.num_ranks
        if num_chunks <= 0 or num_chunks < 2 * n:
            raise ValueError(f"DualPipeV num_chunks={num_chunks} on {n} ranks: need >= 2 * ranks "
                             f"= {2 * n}")
        return num_chunks
