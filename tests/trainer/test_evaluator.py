"""Evaluation during training: held-out loss and MTP acceptance through the inference path, equal to
the model's own training forward (`forward_train`: main logits and MTP logits) in one process and on a
DualPipeV pipeline of 2 ranks. Tolerance 1e-5: fp32, the cached prefill vs the training forward
differ in summation order only; the acceptance counts argmaxes, equal unless a near-tie flips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from twinpipe.parallel.grid import Grid
from twinpipe.data.tokenizer import train_bpe
from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.local import run_local
from twinpipe.parallel.parallelize import parallelize
from twinpipe.trainer.evaluator import Evaluator

CFG = OmegaConf.create({"eval": {"every": 2, "batches": 2}, "train": {"seq_len": 32, "micro_batch": 2}})


def build():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=300, initializer_range=0.05)).eval()


def tokenizer():
    return train_bpe(iter(["def add(a, b):\n    return a + b\n" * 30]), vocab_size=300)


def _pipeline(rank, world):
    torch.set_num_threads(1)
    grid = build_grid(2, 1, 1)
    model = parallelize(build(), grid, torch.device("cpu"), "dualpipev")
    return Evaluator(CFG, tokenizer(), model, grid, "dualpipev")(1)


def test_metrics_equal_the_training_forward_on_any_layout():
    model = build()
    evaluate = Evaluator(CFG, tokenizer(), model, Grid.single())
    assert evaluate(3) == {}  # between evaluations
    got = evaluate(2)
    windows = torch.tensor(evaluate.windows)                                        # [4, 33]
    with torch.no_grad():
        out = model.forward_train(windows)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    accept = (out.mtp_logits[0][:, :-1].argmax(-1) == out.logits[:, 1:-1].argmax(-1)).double().mean()
    assert got["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["eval_mtp_acceptance"] == pytest.approx(float(accept), abs=1e-12)
    for ranks in run_local(_pipeline, 2):
        assert ranks["eval_loss"] == pytest.approx(got["eval_loss"], rel=1e-5)
        assert ranks["eval_mtp_acceptance"] == pytest.approx(got["eval_mtp_acceptance"], abs=1e-12)


def test_every_recipe_evaluates_during_training(tmp_path):
    """The pretraining recipe with eval.every=2: eval_loss and eval_mtp_acceptance land in metrics.jsonl at
    steps 1, 2 and 4 (and only there), through the loop's default evaluator."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trainer_recipe import make_cfg

    from twinpipe.trainer.loop import train
    from twinpipe.trainer.metrics import read_metrics

    data = tmp_path / "data"
    data.mkdir()
    train_bpe(iter(["def add(a, b):\n    return a + b\n" * 30]), vocab_size=512).save(data / "tok")
    train(make_cfg(data, tmp_path / "run", "train.steps=4", "eval.every=2", "eval.batches=1",
                   "checkpoint.every=0", "checkpoint.at_end=false", "resume=never"))
    records = read_metrics(tmp_path / "run")
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated == [1, 2, 4]
    assert all(0 < r["eval_loss"] < 10 and 0 <= r["eval_mtp_acceptance"] <= 1 for r in records if "eval_loss" in r)
