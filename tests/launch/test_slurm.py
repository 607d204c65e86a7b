"""launch/slurm.sbatch on a real SLURM: signal -> checkpoint -> requeue -> resume, bit for bit.

The test starts a one-node cluster on localhost from Debian's `slurm-wlm` and `munge` (docs/reference.md
§8: munged as user munge, slurmctld + slurmd as root with a slurm.conf of its own on free ports, state
under the test's temp dir), submits the script with 2 tasks on the CPU (gloo, dp=2), and once training
is under way sends USR1 to the batch shell, which is what `--signal=B:USR1@120` does before the time
limit (SLURM's signal timing has a resolution of about a minute, so the test sends it itself). The
script must forward it to the training step, the trainer must checkpoint and exit 0, the script must
requeue the job, and the requeued job must resume and finish. SLURM holds a requeued job until the
old job credential has expired (`AuthInfo=cred_expire`, 120 s by default; 5 s in this cluster).
The losses of every step must equal those of the same run without a stop (forked gloo ranks: the same
arithmetic in the same order).

Skipped, with the reason, where the packages are missing or the test is not root (`.ci/run` installs
them with apt-get where it can).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twinpipe.parallel.local import run_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_recipe import TINY, make_cfg  # noqa: E402  (the trainer tests' tiny recipe)

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
STEPS = 60
RUN = [f"train.steps={STEPS}", "checkpoint.every=0", "parallel.dp=2", "logging.plots=false"]


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start munged, slurmctld and slurmd"
    missing = [b for b in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun",
                           "sinfo") if _which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs slurm-wlm and munge with apt-get)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    done = subprocess.run(f"{_which('munge')} -n | {_which('unmunge')}", shell=True, capture_output=True)
    return done.returncode == 0


def _start_munged() -> int | None:
    """Start munged as user munge unless one answers already; its pid when this started it."""
    if _munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(128))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, timeout=30)
    for _ in range(50):
        if _munge_works():
            return int((run / "munged.pid").read_text())
        time.sleep(0.1)
    raise RuntimeError("munged started but `munge -n | unmunge` fails")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a one-node cluster (this host, 2 CPUs) that runs for the module's tests."""
    reason = _why_not()
    if reason:
        pytest.skip(f"SLURM test skipped: {reason}")
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=twinpipe-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={min(os.cpu_count() or 2, 2)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    munged = _start_munged()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([_which(name), "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for name in ("slurmctld", "slurmd")]
    try:
        for _ in range(300):
            state = subprocess.run([_which("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the one-node SLURM did not come up: sinfo says {state.stdout!r} {state.stderr!r}")
        yield env
    finally:
        for p in daemons:
            p.terminate()
            p.wait(timeout=30)
        if munged is not None:
            os.kill(munged, 15)


def _job(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run([_which("scontrol"), "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _until(what: str, check, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _reference(rank, world, data_dir, run_dir):
    from twinpipe.trainer.loop import train

    return train(make_cfg(data_dir, run_dir, *RUN, "resume=never", "checkpoint.at_end=false"))["step"]


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, data_dir, tmp_path):
    from twinpipe.trainer.checkpoint import io as ckpt
    from twinpipe.trainer.metrics import read_metrics

    assert run_local(_reference, 2, data_dir, tmp_path / "straight") == [STEPS, STEPS]
    want = [r["loss"] for r in read_metrics(tmp_path / "straight")]

    run = tmp_path / "run"
    overrides = [*TINY, f"data.tokenizer={data_dir / 'tok'}", f"data.cache_dir={data_dir / 'cache'}",
                 f"run.dir={run}", *RUN, "parallel.backend=gloo"]
    env = {**slurm, "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    submit = subprocess.run([_which("sbatch"), "--parsable", f"--chdir={tmp_path}",
                             f"--output={tmp_path}/slurm-%j.out", "--nodes=1", "--ntasks-per-node=2",
                             "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", str(SCRIPT), *overrides],
                            env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"
    metrics = run / "metrics.jsonl"
    try:
        _until("step 3 of the first start", lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3)
        subprocess.run([_which("scancel"), "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
        _until("the requeue", lambda: _job(env, job).get("Restarts") == "1"
               and _job(env, job).get("JobState") == "PENDING")
        stopped = [s for s, _ in ckpt.complete_checkpoints(run)]
        _until("the resumed job to finish", lambda: _job(env, job).get("JobState") in ("COMPLETED", "FAILED"),
               timeout_s=180)
    finally:
        subprocess.run([_which("scancel"), job], env=env, timeout=30)
    said = log.read_text()
    state = _job(env, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", said[-3000:]
    assert len(stopped) == 1 and 3 <= stopped[0] < STEPS, stopped  # written on the signal, mid-run
    assert "USR1 (time limit or pre-emption)" in said and f"requeueing job {job}" in said
    assert f"job {job} start 1" in said and f"resumed from {run / 'checkpoints' / f'step_{stopped[0]}'}" in said
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == want  # bit for bit
