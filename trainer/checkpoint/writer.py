"""Who writes a run's checkpoints: the step itself (synchronous), or a writer thread while the next steps
run (`checkpoint.async_save=true`; the key is not `async`, a Python keyword).

    sync:   save = checkpoint.save_checkpoint(...)                      the step waits for the disk
    async:  save = wait for the write in flight                         (at most one: the host-memory bound)
                   -> stage the state to host memory                    (buffers reused from save to save)
                   -> hand checkpoint.save_checkpoint(staged) to the writer thread, return

Both paths write through `checkpoint.save_checkpoint`, so an asynchronous checkpoint is the same files
as a synchronous one of the same state, and as atomic: `.tmp-step_N`, SHA256SUMS hashed by all ranks,
COMPLETE, rename. The writer thread's collectives (DCP's plan exchange, the checksum sharing, the
agreement on failures) run over a gloo process group of their own, so they never interleave with the
training step's collectives. A process killed mid-write leaves a `.tmp-step_N` folder and resume=auto
takes the previous complete checkpoint. A failed write (a full disk) raises its CheckpointError at the
next save or at the end of the run, on every rank.

Host memory: one staged copy of this rank's state (model, optimizer shards, EMA; pinned on CUDA), kept
for the run. Each save reports `checkpoint_stall_s` (what the step loop waited: the whole write when
synchronous; the wait for the previous write plus the staging copy when asynchronous) and, once its
write is done, `checkpoint_step`, `checkpoint_gb` (the folder's size), `checkpoint_write_s` (start of
the write to COMPLETE, checksums included) and `checkpoint_gb_per_s`; the loop adds them to the next
record of metrics.jsonl.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from twinpipe.trainer.checkpoint.io import save_checkpoint

log = logging.getLogger(__name__)


class CheckpointWriter:
    """`save(...)` takes `checkpoint.save_checkpoint`'s arguments; `report()` the metrics of the saves
    since the last call; `close()` waits for the write in flight. Every rank makes the same calls."""

    def __init__(self, async_save: bool) -> None:
        self.async_save = async_save
        self.pending: Future | None = None
        self.metrics: dict[str, float] = {}
        self.lock = threading.Lock()  # the writer thread adds to `metrics`
        if async_save:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            # synchronous staging on this thread (the state must not change while it is copied); the
            # stager keeps its host buffers and refills them at the next save
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=False, use_non_blocking_copy=False))
            self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")

    def save(self, run_dir: str | Path, step: int, state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any], config_yaml: str, tokenizer: Any, keep: int) -> None:
        t0 = time.perf_counter()
        if not self.async_save:
            self._write(t0, run_dir, step, state, rank_state, meta, config_yaml, tokenizer, keep)
            self._add(checkpoint_stall_s=time.perf_counter() - t0)
            return
        self.wait()
        staged = self.stager.stage(state)  # host copies: the next steps may change the state meanwhile
        args = (run_dir, step, staged, copy.deepcopy(rank_state), copy.deepcopy(meta), config_yaml, tokenizer, keep)
        self.pending = self.pool.submit(self._write, time.perf_counter(), *args, group=self.group)
        self._add(checkpoint_stall_s=time.perf_counter() - t0)

    def _write(self, t0: float, run_dir: str | Path, step: int, *args: Any, group: Any = None) -> None:
        final = save_checkpoint(run_dir, step, *args, group=group)
        seconds = time.perf_counter() - t0
        gb = sum(p.stat().st_size for p in final.iterdir() if p.is_file()) / 1e9
        self._add(checkpoint_step=step, checkpoint_gb=gb, checkpoint_write_s=seconds, checkpoint_gb_per_s=gb / seconds)
        log.info("checkpoint step %d: %.3f GB in %.2f s (%.2f GB/s)%s", step, gb, seconds, gb / seconds,
                 ", written while training" if self.async_save else "")

    def _add(self, **metrics: float) -> None:
        with self.lock:
            self.metrics.update(metrics)

    def wait(self) -> None:
        """Until the write in flight is complete (its error, if any, raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def report(self) -> dict[str, float]:
        """The checkpoint metrics gathered since the last call (for the next metrics.jsonl record)."""
        with self.lock:
            out, self.metrics = self.metrics, {}
        return out

    def close(self) -> None:
        """Wait for the last write and release the writer thread and the host buffers."""
        try:
            self.wait()
        finally:
            if self.async_save:
                self.pool.shutdown()
                self.stager.close()
