"""A watchdog that ends a job whose rank went silent, instead of letting every other rank wait in a
collective for the backend's timeout (30 min gloo, 10 min NCCL by default).

Each rank runs one daemon thread. Every `interval` seconds, and at once after each `beat(step)`, it
publishes a heartbeat (a counter and the training loop's last finished step) in the job's TCPStore, through a client connection
of its own, and reads the heartbeats of the ranks it watches (all of them up to 16 ranks, else its
next 8 ranks around the ring, so a store serves O(world) reads per interval, not O(world^2)). A
watched rank whose counter has not moved for `silent_s` = `parallel.timeout_s` / 2 seconds is
silent: a frozen process (SIGSTOP, a stuck driver call holding the interpreter, a swapped-out node)
stops its heartbeat thread with it. The watching rank then logs one line naming that rank and its
last step and exits with status 1 (`os._exit`: the main thread may be blocked in a collective); the
ranks it leaves notice its death within seconds (a closed connection), so the whole job ends within
the timeout. A store that stops answering is reported as silent too (under srun rank 0's process
hosts it; under torchrun the agent does).

A dead rank (SIGKILL, a crash) needs no watchdog: its peers' collectives fail on the closed
connection within ~2 s. Nothing is lost either way: a checkpoint is complete only once its COMPLETE
marker is written, so the newest complete one stays valid and `resume=auto` (or torchrun
`--max-restarts`) continues from it.

torchrun `--max-restarts` needs `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in the agents' environment
(launch/torchrun.sh sets it). Without it the c10d rendezvous hands every round's workers the same
TCPStore, kept by the rank-0 agent for its whole life (torch/distributed/elastic/rendezvous/
dynamic_rendezvous.py, `next_rendezvous`: the store server is created only when
`_bootstrap_store_info is None`), and the workers' env:// client adds no per-attempt prefix
(torch/distributed/rendezvous.py, `_create_c10d_store`: "We create a new TCPStore for every retry so no
need to add prefix"), so a restarted worker reads the previous attempt's gloo/NCCL addresses under the
same `default_pg` keys and fails to connect (gloo: `connectFullMesh failed ... Connection refused` or
`Connect timeout`). `TORCHELASTIC_RESTART_COUNT` cannot name the attempt either: an agent whose worker
is alive (the frozen one) restarts through the membership-change path, which does not count as a
restart (elastic/agent/server/api.py, `_invoke_run`), so the agents disagree on it. With the variable
set, the rank-0 worker hosts a fresh store on a fresh port each round. torchrun's static rendezvous
(its default without --standalone or --rdzv-backend) shares one store whatever the variable says
(elastic/rendezvous/static_tcp_rendezvous.py, `use_agent_store` is always True): its restarts read
stale addresses too (1 of 3 tries failed here with the variable set). The frozen worker is still
stopped by its own agent only after the agent's fixed 30 s SIGTERM grace
(elastic/agent/server/local_elastic_agent.py, `_stop_workers` -> `_shutdown(timeout=30)`; a stopped
process acts on SIGKILL alone), so a restart after a hung rank takes that long.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

WATCH_ALL_UP_TO = 16
RING_NEIGHBOURS = 8
_PREFIX = "twinpipe-watchdog/"
# crash-test hook (as checkpoint.io.FAULT_ENV's save:N / step:N): "freeze:N:R" stops rank R with SIGSTOP
# after step N, in a process that started the run at step 0 (so a resumed attempt runs through)
FAULT_ENV = "TWINPIPE_FAULT"
SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def elastic_restart_problem(env: dict[str, str] | None = None) -> str | None:
    """Why torchrun's `--max-restarts` could not restart this job (see the module docstring), or None."""
    env = os.environ if env is None else env
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max-restarts={restarts} with the agent's shared TCPStore: a restarted worker "
                f"would read the previous attempt's addresses from it and fail to connect; start torchrun "
                f"with {SHARED_STORE_ENV}=1 in its environment and the c10d rendezvous (--standalone or "
                f"--rdzv-backend c10d; the static one always shares its store), as launch/torchrun.sh does, "
                f"or with --max-restarts=0")
    return None


def watched_ranks(rank: int, world: int) -> list[int]:
    """The ranks whose heartbeat `rank` checks."""
    if world <= WATCH_ALL_UP_TO:
        return [r for r in range(world) if r != rank]
    return [(rank + i) % world for i in range(1, RING_NEIGHBOURS + 1)]


class Watchdog:
    """Heartbeats of this rank and the check of the watched ones (see the module docstring). Start it
    on every rank after the process group exists; `beat(step)` after each step; `close()` at the end."""

    def __init__(self, timeout_s: float, rank: int, world: int, host: str, port: int,
                 store_rank: int | None = 0):
        self.rank, self.silent_s = rank, timeout_s / 2
        self.store_rank = store_rank  # the rank whose process hosts the store (None: torchrun's agent)
        self.interval = min(1.0, timeout_s / 10)
        self.step = self.first_step = 0
        self.where = f"{host}:{port}"
        self._store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                    timeout=timedelta(seconds=max(self.silent_s, 1.0)))
        self._watched = watched_ranks(rank, world)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by beat(): publish the new step now
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="watchdog-store")
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    @classmethod
    def for_process_group(cls, timeout_s: float) -> "Watchdog | None":
        """A watchdog for the process group torchrun/srun/run_local started (None without one)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            log.warning("watchdog off: MASTER_ADDR/MASTER_PORT not set (a process group not started by "
                        "torchrun, srun or run_local)")
            return None
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return cls(timeout_s, dist.get_rank(), dist.get_world_size(), host, int(port),
                   store_rank=None if agent else 0)

    def beat(self, step: int) -> None:
        self.first_step = self.first_step or step
        self.step = step
        self._wake.set()
        if self.first_step == 1 and os.environ.get(FAULT_ENV) == f"freeze:{step}:{self.rank}":
            log.warning("%s=%s: stopping this process at %.3f (crash test)", FAULT_ENV,
                        os.environ[FAULT_ENV], time.time())
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._pool.shutdown(wait=False)

    def _exchange(self, count: int) -> list[bytes]:
        """Publish this rank's heartbeat; the watched ranks' (b"" for one that has not beaten yet)."""
        self._store.set(f"{_PREFIX}{self.rank}", f"{count},{self.step}")
        keys = [f"{_PREFIX}{r}" for r in self._watched]
        if self._store.check(keys):
            return self._store.multi_get(keys)
        return [self._store.get(k) if self._store.check([k]) else b"" for k in keys]

    def _run(self) -> None:
        start = time.monotonic()
        seen = {r: (b"", start) for r in self._watched}  # last value, when it last changed
        count, failing_since = 0, None
        while True:
            if count:
                self._wake.wait(self.interval)
                self._wake.clear()
            if self._stop.is_set():
                return
            count += 1
            job = self._pool.submit(self._exchange, count)
            try:
                values = job.result(timeout=self.silent_s)
            except Exception as exc:  # noqa: BLE001 (a hung store: timeout; a closed one: refused)
                # a store that refuses connections for a moment is the job ending (its host leaves
                # first); one that hangs, or refuses for silent_s, is a silent host
                failing_since = failing_since or time.monotonic()
                if isinstance(exc, TimeoutError) or time.monotonic() - failing_since > self.silent_s:
                    self._store_silent(exc, seen)
                    return
                continue
            failing_since = None
            now = time.monotonic()
            for r, value in zip(self._watched, values):
                if value != seen[r][0]:
                    seen[r] = (value, now)
                elif now - seen[r][1] > self.silent_s:
                    last = value.decode().split(",")[1] if value else "none (never beat)"
                    self._fail(f"rank {r} silent for {now - seen[r][1]:.1f} s (no heartbeat; its last "
                               f"finished step: {last})")
                    return

    def _store_silent(self, exc: BaseException, seen: dict[int, tuple[bytes, float]]) -> None:
        host = "torchrun's agent" if self.store_rank is None else f"rank {self.store_rank}"
        last = seen.get(self.store_rank, (b"", 0.0))[0]
        step = f"; its last finished step: {last.decode().split(',')[1]}" if last else ""
        self._fail(f"{host} silent: the job's store it hosts at {self.where} did not answer for "
                   f"{self.silent_s:.1f} s ({type(exc).__name__}){step}")

    def _fail(self, what: str) -> None:
        log.error("watchdog on rank %d: %s; exiting (parallel.timeout_s=%g) so the job ends instead of "
                  "hanging; resume=auto continues from the newest complete checkpoint", self.rank, what,
                  2 * self.silent_s)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)
