"""Run a function on N local ranks as real processes (fork + torch.distributed).

Used by the multi-process tests (gloo on CPU) and by `launch/local.py`. Each rank gets its own process
started with fork, joins one process group over a free TCP port on localhost, runs `fn(rank,
world_size, *args)` and sends its return value back. An exception on any rank is re-raised in the
caller with that rank's traceback, and the other ranks are stopped instead of left hanging.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, backend, threads, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=300))
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensors by value. The queue's own pickler would share their storage
        # through file descriptors that vanish when this process exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
              threads_per_rank: int = 1, timeout_s: float = 600.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` forked ranks; return the results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main,
                         args=(fn, r, world_size, port, backend, threads_per_rank, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failure = None
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout_s)
            if not ok:
                failure = (rank, value)
                break
            results[rank] = pickle.loads(value)
    except queue_mod.Empty:
        failure = (-1, f"timed out after {timeout_s}s waiting for ranks")
    finally:
        if failure is not None:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=30)
    if failure is not None:
        rank, tb = failure
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return [results[r] for r in range(world_size)]
