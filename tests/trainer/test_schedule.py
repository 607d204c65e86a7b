"""LR, batch-ramp, λ and γ schedules against hand-computed values (DeepSeek-V3 report §4.2)."""

import math

import pytest
from omegaconf import OmegaConf

from twinpipe.trainer.config import OptimSchema
from twinpipe.trainer.optim.schedule import batch_size_at, lr_at


def optim(**kw):
    return OmegaConf.merge(OmegaConf.structured(OptimSchema), kw)


def test_steps_schedule_phases():
    o = optim(lr=1.0, min_lr=0.1, warmup_steps=4, constant=3, decay=10, unit="steps", tail=[[5, 0.05]])
    assert [lr_at(o, s, 0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_at(o, s, 0) for s in (4, 5, 6)] == [1.0, 1.0, 1.0]
    assert lr_at(o, 7, 0) == 1.0  # cosine starts at lr
    assert lr_at(o, 12, 0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_at(o, 17, 0) == 0.05 and lr_at(o, 21, 0) == 0.05  # tail phase
    assert lr_at(o, 22, 0) == 0.05  # after the last phase the last value holds


def test_v3_schedule_in_tokens():
    o = OmegaConf.load(__import__("importlib.resources").resources.files("twinpipe.recipes") / "optim/v3.yaml")
    o = optim(**{k: v for k, v in o.items() if k != "defaults"})
    assert lr_at(o, 999, 0) == pytest.approx(2.2e-4 * 1000 / 2000)
    assert lr_at(o, 5000, 9.9e12) == 2.2e-4
    assert lr_at(o, 5000, 10e12 + 4.3e12 / 2) == pytest.approx((2.2e-4 + 2.2e-5) / 2)
    assert lr_at(o, 5000, 14.3e12 + 100e9) == pytest.approx(2.2e-5)
    assert lr_at(o, 5000, 14.3e12 + 400e9) == pytest.approx(7.3e-6)
    # batch size ramps 3072 -> 15360 over the first 469B tokens, in multiples of micro x dp
    assert batch_size_at(o, 15360, 0, 16) == 3072
    assert batch_size_at(o, 15360, 469e9 / 2, 16) == (3072 + 15360) // 2 // 16 * 16
    assert batch_size_at(o, 15360, 469e9, 16) == 15360


def test_batch_ramp_in_a_run(data_dir, tmp_path):
    from trainer_recipe import make_cfg

    from twinpipe.trainer.loop import train
    from twinpipe.trainer.metrics import read_metrics

    train(make_cfg(data_dir, tmp_path, "train.steps=3", "optim.ramp_start=4", "optim.ramp_tokens=256",
                   "checkpoint.every=0"))
    got = read_metrics(tmp_path)
    # tokens seen 0, 128, 320 of 32-token sequences: 4, then 4 + 4 * 128/256 = 6, then the full 8
    assert [r["global_batch"] for r in got] == [4, 6, 8]
    assert [r["tokens"] for r in got] == [128, 320, 576]
