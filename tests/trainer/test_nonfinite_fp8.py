"""A non-finite loss skips the step (weights, biases and optimizer untouched) or stops the run; the
fp8= recipe key swaps in the FP8 layers."""

import math

import pytest

import twinpipe.trainer.loop as loop
from twinpipe.trainer.loss import PretrainLoss
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import make_cfg


class NaNAtCall(PretrainLoss):
    """The pretraining loss, except NaN on its `bad`-th call (one micro-batch of one step)."""

    bad = 5  # 4 micro-batches per step: call 5 is step 2's first micro-batch

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def __call__(self, output, batch):
        self.calls += 1
        loss, metrics = super().__call__(output, batch)
        return (loss * math.nan if self.calls == self.bad else loss), metrics


def test_nan_step_is_skipped_and_training_goes_on(data_dir, tmp_path, monkeypatch):
    import torch

    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    loop.train(make_cfg(data_dir, tmp_path / "one", "train.steps=1", "checkpoint.every=0"))
    monkeypatch.setattr(loop, "PretrainLoss", NaNAtCall)
    loop.train(make_cfg(data_dir, tmp_path / "skip", "train.steps=3", "checkpoint.every=2"))
    got = read_metrics(tmp_path / "skip")
    assert [r["skipped"] for r in got] == [False, True, False]
    assert got[1]["loss"] is None and math.isfinite(got[2]["loss"])
    # after the skipped step 2 the weights and router biases are exactly those after step 1
    one, _ = load_model_for_inference(tmp_path / "one" / "checkpoints" / "step_1")
    skip, _ = load_model_for_inference(tmp_path / "skip" / "checkpoints" / "step_2")
    a, b = one.state_dict(), skip.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_with_on_nonfinite_stop_raises(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "PretrainLoss", NaNAtCall)
    with pytest.raises(FloatingPointError, match="train.on_nonfinite=stop"):
        loop.train(make_cfg(data_dir, tmp_path / "stop", "train.steps=3", "train.on_nonfinite=stop",
                            "checkpoint.every=0", "checkpoint.at_end=false"))


def test_fp8_emulate_trains(data_dir, tmp_path):
    import torch

    from twinpipe.trainer.build import build_model

    model = build_model(make_cfg(data_dir, tmp_path, "fp8=emulate"), torch.device("cpu"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FP8Linear", "FP8Experts"} <= kinds, kinds
    loop.train(make_cfg(data_dir, tmp_path, "fp8=emulate", "train.steps=2", "checkpoint.every=0",
                        "checkpoint.at_end=false"))
    got = read_metrics(tmp_path)
    assert len(got) == 2 and all(math.isfinite(r["loss"]) for r in got)
