"""A hung rank under torchrun `--max-restarts`: two single-rank "nodes" (two torchrun agents, c10d
rendezvous), rank 1 frozen with SIGSTOP after step 3 (a frozen process keeps its sockets open, so its
peer's collective would otherwise wait for gloo's timeout). The watchdog ends rank 0 within
parallel.timeout_s, naming rank 1 and its last step; the agents restart both workers (rank 1's agent
kills its stopped worker after torch's fixed 30 s SIGTERM grace, the one slow part of this test), and
the second attempt continues from the newest complete checkpoint (resume=auto) to the end, with the
losses of a run that never stopped, bit for bit (the same gloo arithmetic as forked ranks).

The agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as launch/torchrun.sh starts them: with
torch's shared store the restarted workers read the first attempt's gloo addresses and fail to connect
(trainer/watchdog.py says where in torch); the trainer refuses that combination in one line.

Timing margins (a loaded 2-core CI box): parallel.timeout_s=16, so the watchdog calls a rank silent
after 8 s without a heartbeat (published every second); a healthy rank's heartbeat thread is not
starved that long even at a load of 10 on 2 cores. The freeze time comes from the victim's own log
line (written just before SIGSTOP) and rank 0's death is polled every 50 ms, so the measured delay
can only overstate the watchdog's; it must stay under parallel.timeout_s. The rendezvous store is
hosted by this test on an OS-assigned port (no probed port another job could take)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from twinpipe.parallel.local import run_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_recipe import TINY, make_cfg  # noqa: E402  (the trainer tests' tiny recipe)

STEPS, FREEZE_AFTER, TIMEOUT_S = 8, 3, 16
RUN = [f"train.steps={STEPS}", "checkpoint.every=2", "parallel.dp=2", "logging.plots=false"]
BUDGET_S = 500  # the whole torchrun part, under pytest's 600 s per test


def _reference(rank, world, data_dir, run_dir):
    from twinpipe.trainer.loop import train

    return train(make_cfg(data_dir, run_dir, *RUN, "resume=never"))["step"]


def _worker_pid(tag: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"TWINPIPE_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
                return int(entry.name)
    return None


def _alive(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _agent(i: int, data_dir: Path, run: Path, endpoint: str, tag: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-conf", "is_host=false",
           "--rdzv-id", tag, "--max-restarts", "1", "--monitor-interval", "0.5",
           "-m", "twinpipe.trainer", *TINY, f"data.tokenizer={data_dir / 'tok'}",
           f"data.cache_dir={data_dir / 'cache'}", f"run.dir={run}", *RUN, "parallel.backend=gloo",
           f"parallel.timeout_s={TIMEOUT_S}", "resume=auto"]
    log = open(run.parent / f"agent{i}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, cwd=run.parent, stdout=log, stderr=subprocess.STDOUT, text=True)


def _logs(run: Path) -> str:
    return "".join((run.parent / f"agent{i}.log").read_text() for i in range(2))


def test_torchrun_restarts_a_hung_rank_into_an_exact_resume(data_dir, tmp_path):
    from twinpipe.trainer.metrics import read_metrics

    assert run_local(_reference, 2, data_dir, tmp_path / "straight") == [STEPS, STEPS]
    want = [r["loss"] for r in read_metrics(tmp_path / "straight")]

    run, tag = tmp_path / "run", uuid.uuid4().hex
    # the rendezvous store, on a port the OS gave it (the agents are its clients: is_host=false)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=60))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWINPIPE_TEST_TAG": tag, "LOGLEVEL": "INFO",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TWINPIPE_FAULT": f"freeze:{FREEZE_AFTER}:1"}
    agents = [_agent(i, data_dir, run, f"127.0.0.1:{store.port}", tag, env) for i in range(2)]
    deadline = time.monotonic() + BUDGET_S
    try:
        rank0 = None
        while (said := re.search(r"stopping this process at ([\d.]+)", _logs(run))) is None:
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), _logs(run)[-4000:]
            rank0 = rank0 or _worker_pid(tag, 0)  # the first attempt's rank 0, before it can go
            time.sleep(0.05)
        frozen_at = float(said.group(1))
        rank0 = rank0 or _worker_pid(tag, 0)  # None: gone already (the delay is then overstated)
        while _alive(rank0) and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.time() - frozen_at
        for a in agents:
            a.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
        del store
    logs = _logs(run)
    print(f"rank 0 gone {took:.1f} s after rank 1 froze (parallel.timeout_s={TIMEOUT_S})")
    assert [a.returncode for a in agents] == [0, 0], logs[-6000:]
    assert took < TIMEOUT_S, (took, logs[-6000:])  # the watchdog, before gloo's timeout
    said = [line for line in logs.splitlines() if "watchdog on rank 0: rank 1 silent" in line]
    assert len(said) == 1, logs[-6000:]
    assert 1 <= int(re.search(r"its last finished step: (\d+)", said[0]).group(1)) <= FREEZE_AFTER
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in logs
    resumed = re.findall(r"resumed from \S+step_(\d+) at step", logs)
    assert len(resumed) == 1 and int(resumed[0]) < FREEZE_AFTER + 1, logs[-6000:]
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == want  # the second attempt resumed exactly


def test_restarts_over_the_shared_agent_store_are_refused_in_one_line():
    """torchrun --max-restarts with torch's shared agent store (TORCHELASTIC_USE_AGENT_STORE=True in the
    workers' environment) could not restart: the trainer says so before joining the process group."""
    from twinpipe.trainer.watchdog import elastic_restart_problem

    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    problem = elastic_restart_problem(shared)
    assert problem is not None and "\n" not in problem
    assert "--max-restarts=2" in problem and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in problem
    assert elastic_restart_problem({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert elastic_restart_problem({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert elastic_restart_problem({}) is None
