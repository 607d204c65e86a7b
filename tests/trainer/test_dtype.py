"""train.dtype: bf16 computes under autocast on any device (CPU included), fp32 computes in fp32; the
master weights stay fp32 either way."""

import torch
from torch import nn

import twinpipe.trainer.loop as loop
from twinpipe.parallel.pipeline.runner import autocast_context
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import make_cfg


def test_autocast_context_follows_train_dtype_on_cpu():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast_context("bf16", torch.device("cpu")):
        assert linear(x).dtype == torch.bfloat16
    with autocast_context("fp32", torch.device("cpu")):
        assert linear(x).dtype == torch.float32
    assert linear.weight.dtype == torch.float32


def test_bf16_run_computes_in_bf16_and_keeps_fp32_weights(data_dir, tmp_path):
    losses = {}
    for dtype in ("fp32", "bf16"):
        run = tmp_path / dtype
        out = loop.train(make_cfg(data_dir, run, f"train.dtype={dtype}", "train.steps=2", "checkpoint.every=0",
                                  "checkpoint.at_end=false"))
        losses[dtype] = [r["loss"] for r in read_metrics(run)]
        assert all(p.dtype == torch.float32 for p in out["model"].parameters())
    # Step 1 is the same weights and data, so the whole difference is bf16 arithmetic: present (the
    # run did compute in bf16), and no larger than bf16's ~3 significant digits can explain.
    rel = abs(losses["bf16"][0] - losses["fp32"][0]) / losses["fp32"][0]
    assert 1e-7 < rel < 1e-2, (rel, losses)
