"""The trainer with pipeline parallelism reproduces one process on the same global batches.

`parallel.pp=4 parallel.schedule=dualpipe` (4 ranks) and `parallel.pp=2 parallel.dp=2
parallel.schedule=dualpipev` (4 ranks) against `parallel.pp=1 parallel.dp=1`, 20 steps, 4-layer tiny
model (one block per stage), micro_batch=1 so each step has enough micro-batches for the schedules
(DualPipe needs >= 2 * pp).

Tolerance. The arithmetic differs from one process only in the order of fp32 additions: gradients
are summed per rank in schedule order and then all-reduced over the pipeline (and data-parallel) group.
Each step's gradient differs by a few ulps and Adam carries that on. Measured over the 20 steps
(relative): loss <= 3e-5 at every step for DualPipe/DualPipeV, <= 1.2e-7 for 1F1B (which accumulates
micro-batches in the one-process order); grad_norm <= 6e-5 over steps 1-10. From step ~11 on, a
router tie (two expert scores within an ulp) can go the other way, after which expert loads and the
gradient legitimately differ (grad_norm by up to 2e-2 at one step) while the loss stays within 3e-5.
So: loss rel 1e-4 at every step; grad_norm rel 2e-4 and expert loads equal over steps 1-10. A real
fault (a stage's gradient copy not summed, the MTP share of the embedding lost, a wrong 1/n, a
micro-batch fed twice) moves the loss by more than 1e-3 within a few steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from twinpipe.parallel.local import run_local

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_recipe import make_cfg  # noqa: E402  (the trainer tests' tiny recipe)

STEPS = 20
COMMON = [f"train.steps={STEPS}", "checkpoint.every=0", "checkpoint.at_end=false", "resume=never",
          "model.num_hidden_layers=4", "train.micro_batch=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("pipeline-data")
    train_bpe(corpus_sample(200_000), 512).save(d / "tok")
    return d


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    from twinpipe.trainer.loop import train
    from twinpipe.trainer.metrics import read_metrics

    run_dir = tmp_path_factory.mktemp("pp1")
    train(make_cfg(data_dir, run_dir, *COMMON))
    return read_metrics(run_dir)


def _rank(rank, world, data_dir, run_dir, overrides):
    from twinpipe.trainer.loop import train

    train(make_cfg(data_dir, run_dir, *COMMON, *overrides))
    return rank


@pytest.mark.parametrize("overrides", [
    ["parallel.pp=4", "parallel.schedule=dualpipe"],
    ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=dualpipev"],
    ["parallel.pp=4", "parallel.schedule=1f1b"],
], ids=["pp4-dualpipe", "pp2xdp2-dualpipev", "pp4-1f1b"])
def test_pipeline_training_matches_one_process(overrides, single, data_dir, tmp_path):
    from twinpipe.trainer.metrics import read_metrics

    run_local(_rank, 4, data_dir, tmp_path, overrides, timeout_s=600)
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(single, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), ("loss", a["step"])
        if a["step"] <= 10:
            for key in ("lm_loss", "mtp_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=2e-4), (key, a["step"])
            assert b["expert_load"] == a["expert_load"], a["step"]
    assert single[-1]["loss"] < single[0]["loss"] - 0.5  # it learns, so the curves say something


def test_torchrun_script_starts_a_pipeline_recipe(data_dir, tmp_path):
    """launch/torchrun.sh N <overrides>: two gloo ranks, DualPipeV over pp=2, metrics of every step."""
    import os
    import subprocess

    from trainer_recipe import TINY

    from twinpipe.trainer.metrics import read_metrics

    root = Path(__file__).resolve().parents[2]
    overrides = [*TINY, *COMMON, "train.steps=2", f"data.tokenizer={data_dir / 'tok'}",
                 f"data.cache_dir={data_dir / 'cache'}", f"run.dir={tmp_path}", "parallel.pp=2",
                 "parallel.schedule=dualpipev"]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "launch" / "torchrun.sh"), "2", *overrides], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def _train_steps(rank, world, data_dir, run_dir, resume):
    from twinpipe.trainer.loop import train

    train(make_cfg(data_dir, run_dir, *COMMON, "train.steps=4", "checkpoint.every=2",
                   "checkpoint.keep=2", f"resume={resume}", "parallel.pp=2",
                   "parallel.schedule=dualpipev"))
    return rank


def test_pipeline_checkpoint_resumes_exactly(data_dir, tmp_path):
    """pp=2 DualPipeV: 4 steps straight vs 2 steps, checkpoint, resume for 2 more (same losses)."""
    import shutil

    from twinpipe.trainer.metrics import read_metrics

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_local(_train_steps, 2, data_dir, straight, "never", timeout_s=600)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_local(_train_steps, 2, data_dir, resumed, "auto", timeout_s=600)
    want, got = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
