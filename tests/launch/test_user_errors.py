"""A user's error ends `twinpipe-train` with one line, `twinpipe-train: <what, naming key/file/line>`,
printed by rank 0, and exit status 1 on every rank; HYDRA_FULL_ERROR=1 shows the traceback instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_recipe import TINY  # noqa: E402  (the trainer tests' tiny recipe)


def _train(cmd: list[str], data_dir: Path, run_dir: Path, *overrides: str, full_error: bool = False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    args = [*TINY, f"data.tokenizer={data_dir / 'tok'}", f"data.cache_dir={run_dir / 'cache'}", f"run.dir={run_dir}",
            "train.steps=1", *overrides]
    return subprocess.run([*cmd, *args], env=env, cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=120)


def _said(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("twinpipe-train:")]


PY = [sys.executable, "-m", "twinpipe.trainer"]


def test_data_errors_are_one_line_naming_file_and_line(data_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = _train(PY, data_dir, tmp_path / "a", "data.source=files", f"data.paths=[{missing}]")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _said(proc) == [f"twinpipe-train: data path {missing} does not exist"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "def f(x):\\n    return x\\n"}\n{"text": oops}\n')
    proc = _train(PY, data_dir, tmp_path / "b", "data.source=files", f"data.paths=[{bad}]")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(_said(proc)) == 1 and _said(proc)[0].startswith(f"twinpipe-train: data file {bad} line 2: ")

    proc = _train(PY, data_dir, tmp_path / "c", "data.source=files", f"data.paths=[{missing}]", full_error=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_a_config_error_under_torchrun_is_said_once_and_every_rank_exits_1(data_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "twinpipe.trainer"]
    proc = _train(torchrun, data_dir, tmp_path / "run", "parallel.dp=2", "parallel.schedule=zigzag")
    assert proc.returncode == 1
    said = _said(proc)
    assert len(said) == 1 and said[0].startswith("twinpipe-train: parallel.schedule='zigzag': "), proc.stderr[-3000:]
    # torchrun stops the other rank as soon as one fails; what each rank does on its own:
    for rank in ("0", "1"):
        env_rank = dict(os.environ, RANK=rank)
        proc = subprocess.run([*PY, *TINY, f"run.dir={tmp_path / rank}", "parallel.schedule=zigzag"],
                              env=env_rank, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert len(_said(proc)) == (1 if rank == "0" else 0), (rank, proc.stderr[-2000:])
