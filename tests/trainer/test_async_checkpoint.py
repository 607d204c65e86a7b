"""Asynchronous checkpoints (checkpoint.async_save=true, trainer/checkpoint/writer.py): the loop goes on
while a writer thread writes the state as it was at the save; a SIGKILL mid-write leaves the previous
complete checkpoint, from which resume=auto continues exactly (fp32: the same arithmetic, so equal
losses); asynchronous and synchronous checkpoints of the same run hold the same tensors."""

import json
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from twinpipe.parallel.local import run_local
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.checkpoint import format as fmt
from twinpipe.trainer.checkpoint import writer as checkpoint_writer
from twinpipe.trainer.checkpoint.checksum import first_mismatch
from twinpipe.trainer.loop import train
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import killed_run, make_cfg

STEPS = 6
COMMON = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2"]


def _saved(folder) -> dict:
    """Every tensor (and value) of a checkpoint folder: the DCP state by flat key, rank files, meta."""
    saved = ckpt.saved_tensors(folder)
    state = {k: ckpt.empty_saved(folder, saved, k) for k in saved if hasattr(saved[k], "size")}
    with ckpt.single_process_quiet():
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    out = {"dcp": state, "meta": json.loads((folder / fmt.META).read_text()),
           "config": (folder / fmt.CONFIG).read_text()}
    for f in sorted(folder.glob("rank_*.pt")):
        out[f.name] = torch.load(f, weights_only=True)
        # Python's `random` state differs from run to run with any checkpointing (forked ranks inherit
        # the parent's; a resume restores it and then differs): the trainer does not draw from it
        out[f.name].get(fmt.RNG, {}).pop("python", None)
    return out


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _same_checkpoint(sync_run, async_run, step):
    """`_saved` of both runs' step_`step` is equal (tensors bitwise)."""
    a, b = (ckpt.checkpoint_root(r) / fmt.step_dir(step) for r in (sync_run, async_run))
    assert first_mismatch(a) is None and first_mismatch(b) is None
    da, db = _saved(a), _saved(b)
    for d in (da, db):  # the recipes differ in run.dir, async_save and resume only
        d["config"] = [line for line in d["config"].splitlines() if not line.lstrip().startswith(
            ("dir:", "async_save:", "resume:"))]
    _assert_same(da, db, fmt.step_dir(step))


def test_sigkill_during_async_write_resumes_exactly(data_dir, tmp_path):
    straight = tmp_path / "sync"
    train(make_cfg(data_dir, straight, *COMMON, "resume=never"))
    ref = read_metrics(straight)

    run = tmp_path / "async"
    async_cfg = make_cfg(data_dir, run, *COMMON, "checkpoint.async_save=true")
    # the writer thread SIGKILLs the process after step 4's shards are written, before COMPLETE
    assert killed_run(train, async_cfg, "save:4") == -9
    root = ckpt.checkpoint_root(run)
    assert (root / ".tmp-step_4").is_dir() and not (root / ".tmp-step_4" / ckpt.COMPLETE).exists()
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2]
    summary = train(async_cfg)  # resume=auto: from step 2
    assert summary["step"] == STEPS
    got = read_metrics(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "expert_load"):
            assert a[key] == b[key], (key, a["step"], a[key], b[key])
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [4, 6] and not list(root.glob(".tmp-*"))
    for step in (4, 6):
        _same_checkpoint(straight, run, step)
    # the stall reaches metrics.jsonl in the record after each save; a synchronous write is done by then
    assert got[4]["checkpoint_stall_s"] > 0  # step 5, after the step-4 save
    assert ref[2]["checkpoint_step"] == 2 and ref[2]["checkpoint_gb_per_s"] > 0 and ref[2]["checkpoint_stall_s"] > 0


def test_save_returns_before_the_write_and_writes_the_state_of_the_save(tmp_path, monkeypatch):
    """The write is held until the state has changed and the caller has moved on: the checkpoint still
    holds the values at save(); a second save waits for the first write (one staged copy at most)."""
    release, started = threading.Event(), threading.Event()
    real = checkpoint_writer.save_checkpoint

    def held(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", held)
    weight = torch.arange(6.0).reshape(2, 3)
    state = {fmt.MODEL: {"w": weight}, fmt.OPTIM: {fmt.OPTIM_STEP: 1, "m": weight * 2}}
    writer = checkpoint_writer.CheckpointWriter(async_save=True)
    writer.save(tmp_path, 1, state, {"loader": {"pos": torch.tensor(5)}}, {fmt.STEP: 1}, "a: 1\n", None, 3)
    assert started.wait(30) and writer.pending is not None and not writer.pending.done()
    weight.add_(100.0)  # the next optimizer step
    state[fmt.OPTIM]["m"].mul_(-1)
    second = threading.Thread(target=writer.save, args=(tmp_path, 2, state, {}, {fmt.STEP: 2}, "a: 1\n", None, 3))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first write: it has not staged its copy yet
    release.set()
    second.join(30)
    writer.close()
    first = _saved(ckpt.checkpoint_root(tmp_path) / fmt.step_dir(1))
    assert torch.equal(first["dcp"]["model.w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(first["dcp"]["optim.m"], torch.arange(6.0).reshape(2, 3) * 2)
    assert first["rank_0.pt"]["loader"]["pos"].item() == 5
    later = _saved(ckpt.checkpoint_root(tmp_path) / fmt.step_dir(2))
    assert torch.equal(later["dcp"]["model.w"], torch.arange(6.0).reshape(2, 3) + 100)
    metrics = writer.report()
    assert metrics["checkpoint_step"] == 2 and metrics["checkpoint_write_s"] > 0


def _dp_rank(rank, world, data_dir, run_dir, *extra):
    train(make_cfg(data_dir, run_dir, "parallel.dp=2", "train.steps=2", "checkpoint.every=2", "resume=never", *extra))


def test_async_equals_sync_under_data_parallelism(data_dir, tmp_path):
    """Two gloo ranks (ZeRO-1 shards as DTensors, the writer's own gloo group): the same files' tensors."""
    run_local(_dp_rank, 2, data_dir, tmp_path / "sync")
    run_local(_dp_rank, 2, data_dir, tmp_path / "async", "checkpoint.async_save=true")
    _same_checkpoint(tmp_path / "sync", tmp_path / "async", 2)
