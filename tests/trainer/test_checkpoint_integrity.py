"""Checkpoints cannot be silently corrupt: SHA-256 of every file written with it (SHA256SUMS, which
coreutils' `sha256sum -c` accepts), verified before a resume or a conversion reads it; a failed write
leaves the previous checkpoint intact; `checkpoint.keep` never deletes the checkpoint just written.

Every resumed run here is compared with a run that never stopped: fp32 on one process, the same
arithmetic in the same order, so the losses are equal exactly."""

from __future__ import annotations

import logging
import resource
import shutil
import signal
import subprocess

import pytest

from twinpipe.model.safetensors_io import CheckpointError
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.checkpoint.checksum import SUMS, read_sums
from twinpipe.trainer.cli.convert import main as convert_main
from twinpipe.trainer.loop import train
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import make_cfg

EVERY2 = ["checkpoint.every=2", "logging.plots=false"]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """6 steps without a stop: the reference losses."""
    run = tmp_path_factory.mktemp("straight")
    train(make_cfg(data_dir, run, "train.steps=6", *EVERY2, "checkpoint.keep=3", "resume=never"))
    return run, {r["step"]: r["loss"] for r in read_metrics(run)}


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_sums_list_every_file_and_coreutils_agrees(straight):
    run, _ = straight
    folder = run / "checkpoints" / "step_6"
    sums = read_sums(folder)
    files = {p.name for p in folder.iterdir()} - {SUMS, ckpt.COMPLETE}
    assert set(sums) == files and {"rank_0.pt", ".metadata", "meta.json", "config.yaml"} <= files
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["flip-shard", "flip-rank-state", "truncate", "delete"])
def test_corrupt_newest_falls_back_and_resumes_exactly(damage, straight, data_dir, tmp_path, caplog):
    """A corrupt step_6 beside an intact step_4 (the run went on to step 6, then step_6 was damaged):
    resume=auto warns naming the file, resumes step 4 and reproduces steps 5-6 exactly; resume=PATH
    and twinpipe-convert of the damaged one stop with one line naming the file."""
    src, want = straight
    run = tmp_path / "run"
    shutil.copytree(src, run)
    bad = run / "checkpoints" / "step_6"
    target = {"flip-shard": bad / "__0_0.distcp", "flip-rank-state": bad / "rank_0.pt",
              "truncate": bad / "__0_0.distcp", "delete": bad / "meta.json"}[damage]
    if damage.startswith("flip"):
        _flip_byte(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-4096])
    else:
        target.unlink()

    with pytest.raises(CheckpointError, match=f"resume={bad}: {target}: ") as info:
        ckpt.resolve_resume(str(bad), run)
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:
        convert_main([f"src={bad}", f"dst={tmp_path / 'hf'}"])
    assert str(info.value.code).startswith(f"twinpipe-convert: src={bad}: {target}: ")

    with caplog.at_level(logging.WARNING, logger="twinpipe.trainer.checkpoint.io"):
        summary = train(make_cfg(data_dir, run, "train.steps=8", *EVERY2, "checkpoint.keep=1", "resume=auto"))
    assert summary["step"] == 8
    assert any(str(target) in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    got = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert [got[s] for s in (5, 6)] == [want[5], want[6]]  # resumed from step 4, bit for bit
    # keep=1 counted the step_8 just written first: the older ones went, the damaged step_6 too
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [8]


def test_keep_never_deletes_the_checkpoint_just_written(straight, data_dir, tmp_path):
    """A resume=PATH from step 2 of a run that reached step 6 saves step 4 with keep=1: the new step_4
    stays (not the higher-numbered step_6 of the other trajectory)."""
    src, want = straight
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "metrics.jsonl").unlink()
    train(make_cfg(data_dir, run, "train.steps=4", *EVERY2, "checkpoint.keep=1",
                   f"resume={run / 'checkpoints' / 'step_2'}"))
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [4]
    assert [r["loss"] for r in read_metrics(run)] == [want[3], want[4]]


def test_failed_write_leaves_the_previous_checkpoint(straight, data_dir, tmp_path):
    """A checkpoint write that fails in the OS (here RLIMIT_FSIZE: any file growing past 64 KiB fails
    with EFBIG, as a full disk fails with ENOSPC) stops the run with one line naming the previous
    complete checkpoint, which resume=auto then continues from, exactly."""
    src, want = straight
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(src / "checkpoints" / "step_2", run / "checkpoints" / "step_2")
    cfg = make_cfg(data_dir, run, "train.steps=4", *EVERY2, "resume=auto")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            train(cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    said = str(info.value)  # torch's zip writer reports the EFBIG as a RuntimeError of its own
    assert said.startswith("checkpoint step 4 not written (rank 0: RuntimeError: ") and "\n" not in said
    assert f" GiB free under {ckpt.checkpoint_root(run)})" in said
    assert said.endswith(f"the previous complete checkpoint {run / 'checkpoints' / 'step_2'} is intact")
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2]
    assert not list(ckpt.checkpoint_root(run).glob(".tmp-*"))
    train(cfg)
    assert [r["loss"] for r in read_metrics(run)][-2:] == [want[3], want[4]]
