"""The CPU EMA of the weights (trainer/ema.py, `train.ema_decay`): its update rule, its checkpoint,
an exact resume, and `load_model_for_inference(..., ema=True)` (what `twinpipe-eval ema=true` reads).

Tolerance: the rule is checked against a float64 recurrence, rtol 1e-6 (fp32 rounding of three lerps).
The resume is exact: the resumed run trains bit-identically (tests/trainer/test_resume.py), and the
EMA folds the same fp32 weights in the same order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from twinpipe.model.safetensors_io import CheckpointError
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.ema import CPUEMA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_recipe import make_cfg  # noqa: E402

COMMON = ["train.steps=4", "checkpoint.every=2", "train.ema_decay=0.5", "checkpoint.keep=3"]


def test_update_rule():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = CPUEMA(model, 0.9)
    want = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in model.named_parameters():
            want[n] = 0.9 * want[n] + 0.1 * p.detach().double()
    got = ema.state_dict()
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7)
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu"
    ema.close()
    with pytest.raises(ValueError, match="train.ema_decay=1.0"):
        CPUEMA(model, 1.0)


def _ema_of(step_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = ckpt.load_model_for_inference(step_dir, ema=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpointed_resumed_exactly_and_loaded_for_eval(data_dir, tmp_path):
    from twinpipe.trainer.loop import train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(data_dir, straight, *COMMON, "resume=never"))
    train(make_cfg(data_dir, resumed, *COMMON, "train.steps=2", "resume=never"))
    train(make_cfg(data_dir, resumed, *COMMON, "resume=auto"))
    a, b = _ema_of(straight / "checkpoints" / "step_4"), _ema_of(resumed / "checkpoints" / "step_4")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    weights, _ = ckpt.load_model_for_inference(straight / "checkpoints" / "step_4")
    moved = [n for n, p in weights.named_parameters() if not torch.equal(p, a[n])]
    assert moved  # the average lags the weights
    step2 = _ema_of(straight / "checkpoints" / "step_2")
    assert any(not torch.equal(step2[n], a[n]) for n in a)

    plain = tmp_path / "plain"
    train(make_cfg(data_dir, plain, "train.steps=1", "checkpoint.every=0"))
    with pytest.raises(CheckpointError, match="no EMA of the weights"):
        ckpt.load_model_for_inference(plain, ema=True)
