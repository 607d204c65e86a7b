"""Run a function on N local ranks as real processes (fork + torch.distributed).

Used by the multi-process tests (gloo on CPU) and by `launch/local.py`. Each rank gets its own process
started with fork, joins one process group, runs `fn(rank, world_size, *args)` and sends its return
value back. An exception on any rank is re-raised in the caller with that rank's traceback, and the
other ranks are stopped instead of left hanging.

Rendezvous: rank 0 binds the group's TCPStore itself on a port the OS assigns (port 0) and hands the
port to the other ranks through shared memory created before the fork; MASTER_ADDR/MASTER_PORT are
set to it before `fn` runs. (A port probed free by the parent and then released could be taken by a
concurrent job before rank 0 bound it: its ranks then met another job's store, "Connection closed by
peer". A store held by the parent itself deadlocked the forked ranks: its server thread existed
before the fork.)
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _join(rank: int, world_size: int, backend: str, port_box, port_ready) -> None:
    """Rank 0 hosts the store on an OS-assigned port and publishes it; the others wait for it."""
    timeout = timedelta(seconds=300)
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=timeout)
        port_box.value = store.port
        port_ready.set()
    else:
        if not port_ready.wait(timeout.total_seconds()):
            raise TimeoutError(f"rank 0 did not publish its store port within {timeout}")
        store = dist.TCPStore("127.0.0.1", port_box.value, world_size, is_master=False, timeout=timeout)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _rank_main(fn, rank, world_size, port_box, port_ready, backend, threads, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        _join(rank, world_size, backend, port_box, port_ready)
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
    port_box, port_ready = ctx.Value("i", 0, lock=False), ctx.Event()  # rank 0's store port, before the fork
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port_box, port_ready, backend,
                                                  threads_per_rank, args, queue))
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
