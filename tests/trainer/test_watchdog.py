"""A silent rank ends the job within parallel.timeout_s, named with its last step; a dead one within
seconds. Real processes: 3 forked ranks join a gloo group as torchrun/srun ranks would (env://, rank 0
hosting the TCPStore), all-reduce once per "step", and one of them is stopped (SIGSTOP: a frozen
process keeps its sockets open) or killed (SIGKILL) 1.5 s into step 4."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist

from twinpipe.parallel.grid import collective_timeout_s, init_distributed
from twinpipe.trainer.watchdog import Watchdog, watched_ranks

TIMEOUT_S = 10.0  # parallel.timeout_s: the watchdog calls a rank silent after 5 s (about 4 s of slack to the
# timeout for a loaded 2-core machine: detection takes silent_s + one 1 s poll + the exit; a healthy rank
# would have to be starved of the CPU for 5 s to be called silent)
WORLD = 3


def _rank(rank: int, port: int, victim: int, sig: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(name)s: %(message)s", force=True)
    torch.set_num_threads(1)
    init_distributed("gloo", TIMEOUT_S)
    dog = Watchdog.for_process_group(TIMEOUT_S)
    t = torch.zeros(1)
    for step in range(1, 10_000):
        dist.all_reduce(t)
        dog.beat(step)
        if rank == victim and step == 3:
            time.sleep(1.5)  # frozen in the middle of step 4's work, its heartbeat of step 3 out
            os.kill(os.getpid(), sig)
        time.sleep(0.02)


def _run(victim: int, sig: int) -> tuple[dict[int, int], float]:
    """Exit codes of the ranks other than the victim, and how long after the victim's fault they took."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, victim, sig)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and procs[victim].is_alive() and sig == signal.SIGKILL:
            time.sleep(0.01)
        if sig == signal.SIGSTOP:  # wait for the stop itself
            while time.monotonic() < deadline and _state(procs[victim].pid) != "T":
                time.sleep(0.01)
        faulted = time.monotonic()
        others = [p for r, p in enumerate(procs) if r != victim]
        for p in others:
            p.join(timeout=max(deadline - time.monotonic(), 0))
        took = time.monotonic() - faulted
        return {r: p.exitcode for r, p in enumerate(procs) if r != victim}, took
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0-hosting-the-store"])
def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(victim, capfd):
    codes, took = _run(victim, signal.SIGSTOP)
    assert all(code not in (0, None) for code in codes.values()), codes
    assert took < TIMEOUT_S, took  # before gloo's own timeout would fire
    err = capfd.readouterr().err
    assert f"rank {victim} silent" in err and "its last finished step: 3" in err, err[-3000:]


def test_a_killed_rank_is_noticed_in_seconds():
    codes, took = _run(1, signal.SIGKILL)
    assert all(code not in (0, None) for code in codes.values()), codes
    assert took < 3.0, took  # the closed connection, not the watchdog's 3 s


def test_timeouts_and_watched_ranks():
    assert collective_timeout_s("gloo") == 300 and collective_timeout_s("nccl") == 600
    assert collective_timeout_s("gloo", 42) == 42
    assert watched_ranks(2, 4) == [0, 1, 3]
    assert watched_ranks(1020, 1024) == [1021, 1022, 1023, 0, 1, 2, 3, 4]
