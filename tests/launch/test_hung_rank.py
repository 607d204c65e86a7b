"""A hung rank under torchrun: the watchdog ends the other rank within parallel.timeout_s, naming the
frozen rank and its last step; the newest complete checkpoint stays valid, and the next start with
resume=auto finishes the run with the losses of a run that never stopped (bit for bit: the same gloo
arithmetic as forked ranks).

Rank 1's worker is frozen with SIGSTOP (a frozen process keeps its sockets open, so its peer's
collective would otherwise wait for gloo's timeout) once step 3 is logged. torchrun itself gives a
stopped worker 30 s to answer its SIGTERM before it kills it; the test kills the frozen worker as soon
as the other one has gone, as an operator (or SLURM ending the step) would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from twinpipe.parallel.local import run_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_recipe import TINY, make_cfg  # noqa: E402  (the trainer tests' tiny recipe)

STEPS, TIMEOUT_S = 8, 8
RUN = [f"train.steps={STEPS}", "checkpoint.every=2", "parallel.dp=2", "logging.plots=false"]


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


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _torchrun(data_dir: Path, run: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "twinpipe.trainer", *TINY, f"data.tokenizer={data_dir / 'tok'}",
           f"data.cache_dir={data_dir / 'cache'}", f"run.dir={run}", *RUN, "parallel.backend=gloo",
           f"parallel.timeout_s={TIMEOUT_S}", "resume=auto"]
    return subprocess.Popen(cmd, env=env, cwd=run.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_resume_continues_exactly(data_dir, tmp_path):
    from twinpipe.trainer.checkpoint import io as ckpt
    from twinpipe.trainer.metrics import read_metrics

    assert run_local(_reference, 2, data_dir, tmp_path / "straight") == [STEPS, STEPS]
    want = [r["loss"] for r in read_metrics(tmp_path / "straight")]

    run, tag = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TWINPIPE_TEST_TAG": tag}
    proc = _torchrun(data_dir, run, env)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach step 3"
            time.sleep(0.05)
        victim, other = _worker_pid(tag, 1), _worker_pid(tag, 0)
        assert victim is not None and other is not None
        os.kill(victim, signal.SIGSTOP)
        frozen = time.monotonic()
        while _alive(other) and time.monotonic() - frozen < 60:
            time.sleep(0.05)
        took = time.monotonic() - frozen
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < TIMEOUT_S, took  # the watchdog, before gloo's own timeout
    said = [line for line in err.splitlines() if "watchdog on rank 0: rank 1 silent" in line]
    assert len(said) == 1 and "its last finished step: " in said[0], err[-4000:]
    assert 1 <= int(re.search(r"its last finished step: (\d+)", said[0]).group(1)) < STEPS
    assert ckpt.resolve_resume("auto", run) is not None  # the newest complete checkpoint verifies

    proc = _torchrun(data_dir, run, env)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == want  # resumed from the newest complete checkpoint, exactly
