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


EP = ["parallel.dp=2", "parallel.ep=2", "eplb.every=1", "eplb.replicas=10", "train.ema_decay=0.5",
      "checkpoint.every=1", "checkpoint.keep=10"]


def _ep_rank(rank, world, data_dir, run_dir, *extra):
    from twinpipe.trainer.loop import train

    train(make_cfg(data_dir, run_dir, *EP, *extra))


def _placements(step_dir: Path) -> dict[str, torch.Tensor]:
    from twinpipe.trainer.checkpoint import format as fmt

    saved = ckpt.saved_tensors(step_dir)
    state = {fmt.MODEL: {k.split(".", 1)[1]: ckpt.empty_saved(step_dir, saved, k)
                         for k in saved if k.startswith(fmt.MODEL + ".") and k.endswith(".phy2log")}}
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    return state[fmt.MODEL]


def _recurrence(start: dict[str, torch.Tensor], weights: list[dict[str, torch.Tensor]], decay: float):
    out = {n: t.double() for n, t in start.items()}
    for w in weights:
        out = {n: decay * out[n] + (1 - decay) * w[n].double() for n in out}
    return out


def test_expert_parallel_ema_follows_eplb_moves_and_resumes_under_another_layout(data_dir, tmp_path):
    """dp2 x ep2 with EPLB re-placing the 10 slots of 8 experts after every step: the EMA saved per EP
    rank and merged for evaluation equals the recurrence over the run's own merged weights of each
    step (rtol 1e-6: the fp32 lerps against a float64 recurrence, as test_update_rule). Were the
    averages not moved with their slots, a moved expert's average would mix two experts' weights (the
    test checks that the placement did change). Then a resume of step 2 under ep=1 (the EMA read
    through the logical experts) continues the same recurrence, and a resume under the same layout is
    bit-identical to the straight run."""
    from twinpipe.parallel.local import run_local
    from twinpipe.trainer.checkpoint import format as fmt

    run = tmp_path / "ep"
    run_local(_ep_rank, 2, data_dir, run, "train.steps=3", "resume=never")
    steps = [run / fmt.CHECKPOINTS / fmt.step_dir(s) for s in (1, 2, 3)]
    places = [_placements(d) for d in steps]
    assert any(not torch.equal(places[0][k], places[-1][k]) for k in places[0])  # EPLB moved slots
    weights = [{n: p.detach() for n, p in ckpt.load_model_for_inference(d)[0].named_parameters()} for d in steps]
    emas = [_ema_of(d) for d in steps]
    # step 1's average from step 2's and 3's: the same recurrence through every move
    want = _recurrence(emas[0], weights[1:], 0.5)
    for n, w in want.items():
        torch.testing.assert_close(emas[2][n].double(), w, rtol=1e-6, atol=1e-7)

    resumed = tmp_path / "ep_resumed"
    run_local(_ep_rank, 2, data_dir, resumed, "train.steps=2", "resume=never")
    run_local(_ep_rank, 2, data_dir, resumed, "train.steps=3", "resume=auto")
    again = _ema_of(resumed / fmt.CHECKPOINTS / fmt.step_dir(3))
    assert all(torch.equal(again[n], emas[2][n]) for n in again)

    from twinpipe.trainer.loop import train

    other = tmp_path / "ep1"
    import shutil

    shutil.copytree(steps[1], other / fmt.CHECKPOINTS / fmt.step_dir(2))
    train(make_cfg(data_dir, other, "train.steps=3", "train.ema_decay=0.5", "checkpoint.every=1", "resume=auto"))
    step3 = other / fmt.CHECKPOINTS / fmt.step_dir(3)
    w3 = {n: p.detach() for n, p in ckpt.load_model_for_inference(step3)[0].named_parameters()}
    want = _recurrence(emas[1], [w3], 0.5)
    got = _ema_of(step3)
    for n, w in want.items():
        torch.testing.assert_close(got[n].double(), w, rtol=1e-6, atol=1e-7)
