"""Plain 1F1B (one forward, one backward): the baseline schedule, with DualPipe's step() interface.

Rank r of N holds stage r. Rank 0 takes the inputs, rank N-1 the labels and returns the losses.

    warm-up    N-r-1 forwards
    steady     C-(N-r-1) times: one forward, then the oldest chunk's backward
    cool-down  N-r-1 backwards
Bubble (PP-1)(F+B) per rank (docs/reference.md §4); no weight gradients are deferred.
"""

from __future__ import annotations

import torch
from torch import nn

from twinpipe.parallel.pipeline.engine import PipelineEngine, Placement


class OneFOneB(PipelineEngine):
    """1F1B over the ranks of `process_group`; `module` is this rank's stage."""

    def __init__(self, module: nn.Module, batch_dim: int = 0, process_group=None,
                 rank_mapping=None, p2p_groups=None) -> None:
        super().__init__((module,), batch_dim, process_group, rank_mapping, p2p_groups=p2p_groups)

    def _placement(self) -> Placement:
        n, r = self.num_ranks, self.rank
        return Placement(module_index=(0,), fwd_src=(r - 1 if r > 0 else None,),
                         fwd_dst=(r + 1 if r < n - 1 else None,))

    def step(self, *inputs: torch.Tensor, num_chunks: int = 0, criterion=None, labels=(),
             return_outputs: bool = False):
        if num_chunks <= 0:
            raise ValueError(f"OneFOneB num_chunks={num_chunks}: need at least one micro-batch")
        self._reset(criterion, return_outputs)
        if not self.forward_only and criterion is None and self._is_last(0):
            raise ValueError("OneFOneB.step on the last rank: training needs a criterion")
        self._load(list(inputs), list(labels), num_chunks)
        if self.forward_only:
            for _ in range(num_chunks):
                self._forward_chunk(0)
        else:
            self._schedule(num_chunks)
        self._commit()
        result = self._result()
        self._reset()
        return result

    def _schedule(self, c: int) -> None:
        warmup = min(self.num_ranks - self.rank - 1, c)
        for _ in range(warmup):
            self._forward_chunk(0)
        steady = c - warmup
        if steady:
            self._recv_forward(0)
        for i in range(steady):
            self._forward_chunk(0, recv=False)  # its send goes out with the next receive below
            self._backward_chunk(0)
            if i < steady - 1:
                self._recv_forward(0)
        for _ in range(warmup):
            self._backward_chunk(0)
