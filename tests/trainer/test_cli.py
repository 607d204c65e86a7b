"""The recipe keys work from `twinpipe-train` and from `torchrun ... -m twinpipe.trainer` (one short
real run each), and a wrong world size stops with the grid's message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinpipe.parallel.local import run_local
from twinpipe.trainer.loop import train
from trainer_recipe import TINY, make_cfg


def _args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.tokenizer={data_dir / 'tok'}", f"data.cache_dir={data_dir / 'cache'}",
            f"run.dir={run_dir}", "train.steps=2", "checkpoint.every=1", "checkpoint.keep=1", *extra]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)  # the entry point sets the offline defaults itself
    return env


def _check_run(run_dir: Path, steps: int = 2) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    for key in ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "expert_load_max_over_mean"):
        assert all(isinstance(r[key], float) for r in lines), key
    assert (run_dir / "checkpoints" / f"step_{steps}" / "COMPLETE").is_file()
    return lines


def test_twinpipe_train_console_script(data_dir, tmp_path):
    exe = Path(sys.executable).with_name("twinpipe-train")
    run_dir = tmp_path / "cli"
    proc = subprocess.run([str(exe), *_args(data_dir, run_dir, "logging.plots=true", "train.seed=5",
                                            "fp8=off", "eplb.every=0", "parallel.schedule=1f1b")],
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(run_dir)
    for png in ("loss.png", "lr.png", "expert_load.png"):
        assert (run_dir / png).stat().st_size > 1000
    assert not (tmp_path / "outputs").exists()  # Hydra does not chdir nor write ./outputs
    cfg = (run_dir / "checkpoints" / "step_2" / "config.yaml").read_text()
    assert "seed: 5" in cfg


def test_torchrun_two_data_parallel_ranks(data_dir, tmp_path):
    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "twinpipe.trainer", *_args(data_dir, run_dir, "parallel.dp=2")]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(run_dir)
    meta = json.loads((run_dir / "checkpoints" / "step_2" / "meta.json").read_text())
    assert meta["dp"] == 2 and meta["step"] == 2


def test_recipe_error_is_one_line_naming_the_key(tmp_path):
    exe = Path(sys.executable).parent / "twinpipe-train"
    proc = subprocess.run([str(exe), "train.dtype=fp16", f"run.dir={tmp_path / 'run'}"], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "twinpipe-train: train.dtype='fp16': allowed values are fp32, bf16" in proc.stderr
    assert "Traceback" not in proc.stderr


def _wrong_world(rank, world, data_dir, run_dir):
    train(make_cfg(data_dir, run_dir, "parallel.dp=1"))


def test_world_size_mismatch_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(RuntimeError, match=r"world size 2 != parallel.pp x parallel.dp = 1 x 1 = 1"):
        run_local(_wrong_world, 2, data_dir, tmp_path)


def test_multirun_sweep_gets_one_run_dir_per_job(data_dir, tmp_path):
    exe = Path(sys.executable).with_name("twinpipe-train")
    args = [a for a in _args(data_dir, tmp_path, "checkpoint.every=0") if not a.startswith("run.dir=")]
    proc = subprocess.run([str(exe), "--multirun", "train.seed=0,1", *args], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "pretrain").iterdir())  # default run.dir: runs/<recipe>/<overrides>
    assert len(runs) == 2 and all(len(r.name) <= 100 for r in runs)
    losses = [_check_run(r)[0]["loss"] for r in runs]
    assert losses[0] != losses[1]  # different seeds, different runs
