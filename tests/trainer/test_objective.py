"""One training step for any objective: any batch key reaches the loss, any metric comes back, and the
loss is normalised by the global batch's count, under every layout.

Two runs of `train(cfg, loss_fn=..., batch_source=...)` (the public seam) over the same global batches:
- `test_global_normalisation_is_split_independent`: the pretraining loss (CE + λ·MTP, each a mean over
  the global batch's valid targets) on a global batch of 8 rows whose labels are masked raggedly (row
  i keeps a different share, one row keeps none), split 1×8, 2×4, 8×1 micro-batches, dp 2 and 4, pp 2
  (DualPipeV) and pp 2 × dp 2. A mean of micro-batch means would differ between these splits by far
  more than the tolerance (checked: `_mean_of_means` vs the global mean on the same batch).
- `test_any_keys_and_metrics_under_every_layout`: a loss that reads an extra key (`token_weight`),
  normalises by a fractional global count (the sum of the weights) and returns its own metric names,
  under pp 2 (DualPipeV), pp 4 (DualPipe, 1F1B), dp 2 and dp 2 × ep 2, against one process.

Gradients are read off the parameters after one optimizer step with AdamW's lr = 1e9, eps = 1000 and
no weight decay or clipping: Adam's first update is lr·g/(|g| + eps) = 1e6·g·(1 − |g|/1000), so
p0 − p1 is 1e6× the gradient up to a map that is the same in every run (|g| < 0.1 here). The factor
matters for RMSNorm gains (weights 1.0, fp32 spacing 1.2e-7): their gradients of ~1e-7 move them by
~0.1, so the readout resolves the gradient to ~1e-6 even there.

Tolerance. The runs differ only in the order of fp32 sums (matmul shapes, micro-batch accumulation,
all-reduces): the dense model of the first test has no router, so nothing discrete can flip, and the
MoE model of the second is compared at step 1, where every run routes identical weights: on these 256
tokens the smallest margin between a selected and an unselected expert (or expert group) score is
1.2e-5 (measured over every MoE layer and MTP; ~200 fp32 spacings of a score near 0.5), while the
layouts' sums move scores by a few spacings, so no CPU can flip a route here (the expert counts are
checked equal). Losses and metrics: relative 1e-6 (measured ≤ 1.2e-7 on an AMD EPYC).
Gradients: 1 − 2⟨x,y⟩/(|x|²+|y|²) < 1e-10 per parameter (measured ≤ 2e-12; DualPipe's own bound on
exact gradients is 1e-13, and here the gradient also passes through p0 − p1 in fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from twinpipe.parallel.local import run_local
from twinpipe.trainer.loss import IGNORE_INDEX, PretrainLoss, cross_entropy_sum, global_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_recipe import make_cfg  # noqa: E402

GLOBAL, SEQ, VOCAB = 8, 32, 512
GRADIENT_READOUT = ["train.steps=1", "optim.warmup_steps=0", "optim.lr=1e9", "optim.eps=1000",
                    "optim.weight_decay=0", "train.grad_clip=0", "checkpoint.every=0",
                    "checkpoint.at_end=false", "resume=never", "model.num_hidden_layers=4"]
DENSE = ["model.first_k_dense_replace=4"]


def global_batch() -> dict[str, torch.Tensor]:
    """8 rows of random tokens; row i has its first 4i labels masked (row 7 is fully masked), and a
    random weight per token."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    for i in range(GLOBAL):
        labels[i, :4 * i + (SEQ if i == GLOBAL - 1 else 0)] = IGNORE_INDEX
    return {"input_ids": ids[:, :-1], "labels": labels,
            "position_ids": torch.arange(SEQ).expand(GLOBAL, SEQ).clone(),
            "token_weight": 0.5 + torch.rand(GLOBAL, SEQ, generator=g)}


class FixedBatches:
    """A batch source: every step the same global batch, this dp rank's slice in micro-batches."""

    def __init__(self, cfg, tokenizer, dp_rank: int, dp_size: int, model=None) -> None:
        assert model is not None  # the trainer builds the model first and hands it over
        self.dp_rank, self.dp_size, self.micro = dp_rank, dp_size, cfg.train.micro_batch
        self.global_batch = cfg.train.global_batch

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        per_rank = self.global_batch // self.dp_size
        rows = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        mine = {k: v[rows] for k, v in global_batch().items()}
        return [{k: v[i:i + self.micro] for k, v in mine.items()} for i in range(0, per_rank, self.micro)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WeightedLoss:
    """Token-weighted CE of the main head (normalised by the global sum of weights on valid targets)
    + 0.3 × MTP CE (by the global count of MTP targets); metrics under names of its own."""

    def normalizers(self, batch):
        valid = batch["labels"] != IGNORE_INDEX
        return {"weight": (batch["token_weight"] * valid).sum(), "mtp": valid[:, 1:].sum()}

    def __call__(self, output, batch):
        labels, weight = batch["labels"], batch["token_weight"]  # [B, T]
        logp = torch.log_softmax(output.logits.float(), dim=-1)  # [B, T, V]
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
        valid = labels != IGNORE_INDEX
        weighted = (nll * weight * valid).sum() / global_count(batch, "weight")
        mtp = cross_entropy_sum(output.mtp_logits[0], labels[:, 1:]) / global_count(batch, "mtp")
        share = (weight * valid).sum() / global_count(batch, "weight")
        return weighted + 0.3 * mtp, {"weighted_ce": weighted.detach(), "mtp_ce": mtp.detach(),
                                      "weight_share": share.detach()}


def _run(rank, world, data_dir, run_dir, overrides, weighted):
    from twinpipe.trainer.loop import train

    cfg = make_cfg(data_dir, run_dir, *GRADIENT_READOUT, *overrides)
    before = {}

    class Source(FixedBatches):  # keeps the initial weights of this rank's part
        def __init__(self, *args, model=None):
            super().__init__(*args, model=model)
            before.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta})

    summary = train(cfg, loss_fn=WeightedLoss() if weighted else None, batch_source=Source)
    after = {n: p.detach() for n, p in summary["model"].named_parameters() if not p.is_meta}
    grads = {n: before[n] - after[n] for n in after}  # ≈ the gradient (module docstring)
    placements = [b for n, b in summary["model"].named_buffers() if n.endswith("phy2log") and not b.is_meta]
    return summary["last"], grads, placements


def _layout(data_dir, run_dir, overrides, weighted):
    """(metrics of step 1, {parameter: gradient}) of one layout, gathered over its ranks."""
    opts = dict(o.split("=") for o in overrides)
    world = int(opts.get("parallel.pp", 1)) * int(opts.get("parallel.dp", 1))
    if world == 1:
        results = [_run(0, 1, data_dir, run_dir, overrides, weighted)]
    else:
        results = run_local(_run, world, data_dir, run_dir, overrides, weighted, timeout_s=300)
    grads: dict[str, torch.Tensor] = {}
    slots: dict[str, list[torch.Tensor]] = {}
    for _, g, placements in results:
        for phy2log in placements:  # ep ranks hold slots p -> expert p, in rank order
            assert torch.equal(phy2log, torch.arange(phy2log.numel()))
        for name, t in g.items():
            if ".experts.local." in name:  # this ep rank's experts: gathered in rank order
                slots.setdefault(name.replace(".experts.local.", ".experts."), []).append(t)
            else:
                grads.setdefault(name, t)  # pipeline copies and dp replicas hold the same values
    grads.update({name: torch.cat(parts) for name, parts in slots.items()})
    return results[0][0], grads


def _grad_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    denom = (x @ x + y @ y).item()
    return 0.0 if denom == 0 else 1 - 2 * (x @ y).item() / denom


def _assert_same(ref, got, metric_names):
    (ref_metrics, ref_grads), (metrics, grads) = ref, got
    for name in metric_names:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-6), name
    assert metrics["expert_load"] == ref_metrics["expert_load"]
    assert set(grads) == set(ref_grads)
    worst = max(_grad_error(grads[n], ref_grads[n]) for n in grads)
    assert worst < 1e-10
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4  # the readout saw gradients


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("objective-data")
    train_bpe(corpus_sample(200_000), VOCAB).save(d / "tok")
    return d


@pytest.fixture(scope="module")
def dense_reference(data_dir, tmp_path_factory):
    return _layout(data_dir, tmp_path_factory.mktemp("dense-ref"), [*DENSE, "train.micro_batch=8"], False)


def _mean_of_means(batch: dict[str, torch.Tensor], logits_fn, micro: int) -> float:
    means = []
    for i in range(0, GLOBAL, micro):
        labels = batch["labels"][i:i + micro]
        count = (labels != IGNORE_INDEX).sum()
        if count:
            means.append(cross_entropy_sum(logits_fn(batch["input_ids"][i:i + micro]), labels) / count)
    return torch.stack(means).mean().item()


def test_a_mean_of_means_would_depend_on_the_split():
    """The batch is ragged enough that the old normalisation gives another loss per split."""
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB)
    batch = global_batch()
    one = _mean_of_means(batch, lambda ids: table[ids], 8)
    split = _mean_of_means(batch, lambda ids: table[ids], 1)
    assert abs(one - split) / abs(one) > 1e-3


@pytest.mark.parametrize("overrides", [
    ["train.micro_batch=2"], ["train.micro_batch=1"], ["parallel.dp=2", "train.micro_batch=4"],
    ["parallel.dp=4", "train.micro_batch=1"],
    ["parallel.pp=2", "parallel.schedule=dualpipev", "train.micro_batch=2"],
    ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=dualpipev", "train.micro_batch=1"],
], ids=["2x4", "8x1", "dp2", "dp4", "pp2-dualpipev", "pp2xdp2-dualpipev"])
def test_global_normalisation_is_split_independent(overrides, dense_reference, data_dir, tmp_path):
    got = _layout(data_dir, tmp_path, [*DENSE, *overrides], False)
    _assert_same(dense_reference, got, ["loss", "lm_loss", "mtp_loss", "grad_norm"])


@pytest.fixture(scope="module")
def moe_reference(data_dir, tmp_path_factory):
    return _layout(data_dir, tmp_path_factory.mktemp("moe-ref"), ["train.micro_batch=1"], True)


def test_weighted_loss_reference_is_what_it_says(moe_reference):
    metrics, _ = moe_reference
    assert metrics["weight_share"] == pytest.approx(1.0, rel=1e-6)  # shares add up over the batch
    assert metrics["loss"] == pytest.approx(metrics["weighted_ce"] + 0.3 * metrics["mtp_ce"], rel=1e-6)
    assert "lm_loss" not in metrics  # the metrics are the loss's own


@pytest.mark.parametrize("overrides", [
    ["parallel.pp=2", "parallel.schedule=dualpipev", "train.micro_batch=1"],
    ["parallel.pp=4", "parallel.schedule=dualpipe", "train.micro_batch=1"],
    ["parallel.pp=4", "parallel.schedule=1f1b", "train.micro_batch=1"],
    ["parallel.dp=2", "train.micro_batch=2"],
    ["parallel.dp=2", "parallel.ep=2", "train.micro_batch=2"],
], ids=["pp2-dualpipev", "pp4-dualpipe", "pp4-1f1b", "dp2", "dp2xep2"])
def test_any_keys_and_metrics_under_every_layout(overrides, moe_reference, data_dir, tmp_path):
    got = _layout(data_dir, tmp_path, overrides, True)
    _assert_same(moe_reference, got, ["loss", "weighted_ce", "mtp_ce", "weight_share", "grad_norm"])
