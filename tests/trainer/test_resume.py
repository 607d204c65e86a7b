"""Exact resume: a run killed (SIGKILL) and resumed with resume=auto logs the same fp32 losses per step
as a run that never stopped — including a kill in the middle of writing a checkpoint."""

import multiprocessing as mp
import os

import pytest

from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.loop import train
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import killed_run, make_cfg

STEPS = 6
COMMON = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2"]


def _killed_run(data_dir, run_dir, fault):
    """Train in a forked child that SIGKILLs itself at `fault`; return the child's exit code."""
    return killed_run(train, make_cfg(data_dir, run_dir, *COMMON), fault)


def test_kill_and_resume_is_exact(data_dir, tmp_path):
    straight = tmp_path / "straight"
    train(make_cfg(data_dir, straight, *COMMON, "resume=never"))
    ref = read_metrics(straight)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    # 1. killed while writing the step-4 checkpoint: shards on disk, no COMPLETE, no step_4
    assert _killed_run(data_dir, run, "save:4") == -9
    root = ckpt.checkpoint_root(run)
    assert (root / ".tmp-step_4").is_dir() and not (root / ".tmp-step_4" / ckpt.COMPLETE).exists()
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2]
    assert ckpt.resolve_resume("auto", run) == root / "step_2"
    # 2. resumed from step 2, killed right after step 5 (step 4's checkpoint is written this time)
    assert _killed_run(data_dir, run, "step:5") == -9
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [2, 4]
    assert not list(root.glob(".tmp-*"))
    # 3. resumed from step 4 to the end
    summary = train(make_cfg(data_dir, run, *COMMON, "resume=auto"))
    assert summary["step"] == STEPS
    got = read_metrics(run)  # the last record of each step (steps 3-5 were logged twice)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "expert_load"):
            assert a[key] == b[key], (key, a["step"], a[key], b[key])
    # keep=2: only the two newest complete checkpoints remain, each with its recipe and tokenizer
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [4, 6]
    for name in ("config.yaml", "tokenizer.json", "meta.json", "rank_0.pt", ckpt.COMPLETE):
        assert (root / "step_6" / name).is_file()


def test_resume_path_errors_and_inference_load(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=/nope"):
        ckpt.resolve_resume("/nope", tmp_path)
    run = tmp_path / "run"
    train(make_cfg(data_dir, run, "train.steps=1", "checkpoint.every=0"))
    model, tok = ckpt.load_model_for_inference(run, dtype=__import__("torch").float32)
    assert model.config.vocab_size == 512 and tok.vocab_size == 512
    import torch

    tokens = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert model(tokens).shape == (1, tokens.shape[1], 512)


def test_sigterm_checkpoints_after_the_step_and_exits_zero(data_dir, tmp_path):
    import signal
    import time

    run = tmp_path / "preempted"

    def child():
        train(make_cfg(data_dir, run, "train.steps=500", "checkpoint.every=0"))
        os._exit(0)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(timeout=240)
    assert proc.exitcode == 0
    last = read_metrics(run)[-1]["step"]
    assert 1 <= last < 500
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [last]


def test_inference_load_in_bf16_keeps_router_bias_fp32(data_dir, tmp_path):
    import torch

    train(make_cfg(data_dir, tmp_path, "train.steps=1", "checkpoint.every=0"))
    model, _ = ckpt.load_model_for_inference(tmp_path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    biases = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
