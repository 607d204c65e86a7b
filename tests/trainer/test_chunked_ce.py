"""Chunked cross-entropy / log-probabilities / entropy (trainer/chunked_ce.py) against the plain form.

Tolerance. The chunked form computes the same fp32 softmax per token; what differs is the order of fp32
sums (the head weight's gradient is summed chunk by chunk, the GEMMs may block differently), so values
agree to a few fp32 ulps of their magnitude: rtol 1e-5 / atol 1e-6 in fp32. Under bf16 autocast both
forms round the logits to bf16 from the same GEMM inputs; the plain form also rounds the weight
gradient to bf16 once per GEMM where the chunked one accumulates in fp32, so gradients there agree to
bf16 precision (rtol 2e-2 of the largest entry).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twinpipe.model.config import ModelConfig
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.local import run_local
from twinpipe.trainer.chunked_ce import linear_cross_entropy_sum, rows_for_budget, token_logprobs_and_entropy
from twinpipe.trainer.loss import PretrainLoss

FP32 = dict(rtol=1e-5, atol=1e-6)


def _inputs(n=37, h=24, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)     # [N, H]
    weight = torch.randn(v, h, generator=g).mul_(0.3).requires_grad_()  # [V, H]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


def _plain(hidden, weight, labels):
    logp = F.linear(hidden, weight).float().log_softmax(-1)          # [N, V]
    valid = labels != -100
    lp = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0] * valid
    return lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("rows", [1, 8, 37, 1000])
def test_logprobs_entropy_and_gradients_match_plain(rows):
    hidden, weight, labels = _inputs()
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    got = token_logprobs_and_entropy(hidden, weight, labels, rows)
    (got[0] @ g_lp + got[1] @ g_ent).backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = _plain(hidden, weight, labels)
    (want[0] @ g_lp + want[1] @ g_ent).backward()
    for a, b in zip((*got, *got_grads), (*want, hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, **FP32)
    assert torch.all(got[0][labels == -100] == 0)


def test_cross_entropy_sum_bf16_autocast():
    hidden, weight, labels = _inputs(n=64, h=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(hidden, weight, labels, 16)
    got.backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # same bf16 logits, fp32 softmax
    for a, b in zip(got_grads, (hidden.grad, weight.grad)):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    """What autograd keeps for the backward is the inputs, not [N, V] logits (the memory claim)."""
    hidden, weight, labels = _inputs(n=64, h=8, v=500)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy_sum(hidden, weight, labels, rows_for_budget(0.01, 500))  # 2 rows per chunk
    assert saved and max(saved) < 64 * 500 / 4
    assert rows_for_budget(0.01, 500) == 2 and rows_for_budget(1, 10**9) == 1


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                          intermediate_size=64, moe_intermediate_size=16,
                                          num_attention_heads=2, num_nextn_predict_layers=2))


def _batch(vocab=200, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    labels[0, :3] = -100
    loss = PretrainLoss(mtp_depths=2)
    batch = {"input_ids": ids, "labels": labels}
    return {**batch, "global_counts": {k: v.float() for k, v in loss.normalizers(batch).items()}}


def _loss_and_grads(model, batch, chunk_mib):
    model.zero_grad(set_to_none=True)
    loss, metrics = PretrainLoss(0.3, 2, chunk_mib)(model.forward_train(batch["input_ids"]), batch)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pretrain_loss_main_and_mtp_heads_chunked():
    model, batch = _model(), _batch()
    plain = _loss_and_grads(model, batch, 0.0)
    chunked = _loss_and_grads(model, batch, 4 * 200 * 5 / 2**20)  # 5 tokens per chunk
    torch.testing.assert_close(chunked[0], plain[0], **FP32)
    for k in ("lm_loss", "mtp_loss"):
        torch.testing.assert_close(chunked[1][k], plain[1][k], **FP32)
    assert plain[2].keys() == chunked[2].keys() and "lm_head.weight" in plain[2]
    for name, grad in plain[2].items():
        torch.testing.assert_close(chunked[2][name], grad, **FP32, msg=name)


def _pipeline(rank, world, schedule):
    from twinpipe.parallel.grid import build_grid
    from twinpipe.parallel.pipeline.runner import PipelineRunner

    grid = build_grid(pp=world, dp=1, ep=1)
    model, batches = _model(), [_batch(seed=s) for s in range(4)]
    runner = PipelineRunner(model, schedule, grid.pp, grid.pp_rank, grid.pp_group, torch.device("cpu"),
                            mirror_group=grid.pp_mirror_group)
    loss_fn = PretrainLoss(0.3, 2, 4 * 200 * 5 / 2**20)

    def objective(output, micro_batch):
        loss, _ = loss_fn(output, micro_batch)
        return loss, {"loss": loss.detach()}

    metrics = runner.run(batches, objective)
    return float(metrics["loss"]), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_pipeline_last_stage_chunked_equals_one_process_plain(schedule):
    """The pipeline's last stage hands the loss the heads' inputs; chunked CE there equals one process
    with whole logits. The gradients are summed in another order (per stage and micro-batch, then over
    the mirror pair), and the router's picks feed tiny gradients (1e-5) with cancellations, so they are
    compared as one vector: |got - want| <= 1e-5 |want| (fp32 order effects are ~1e-7 relative)."""
    from twinpipe.model.moe import set_aux_loss_scale

    model, ref_loss = _model(), 0.0
    set_aux_loss_scale(model, 1 / 4)  # as the runner sets it: the balance loss averaged over micro-batches
    for s in range(4):  # whole logits, gradients accumulated over the micro-batches
        batch = _batch(seed=s)
        loss, _ = PretrainLoss(0.3, 2, 0.0)(model.forward_train(batch["input_ids"]), batch)
        loss.backward()
        ref_loss += float(loss.detach())
    results = run_local(_pipeline, 2, schedule, timeout_s=120)
    assert results[0][0] == pytest.approx(ref_loss, rel=1e-6)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    # a module both ranks hold has the pair's summed gradient on each: take the first rank's
    got = torch.cat([next(torch.from_numpy(r[1][n]) for r in results if n in r[1]).flatten() for n in names])
    want = torch.cat([model.get_parameter(n).grad.flatten() for n in names])
    assert (got - want).norm() <= 1e-5 * want.norm()


@pytest.mark.parametrize("with_entropy", [False, True])
def test_working_memory_within_the_budget(with_entropy):
    """`loss.ce_chunk_mib` bounds what the loss allocates beyond its inputs and gradients: every
    tensor an operator returns is counted (bench.memory.LiveBytes) through forward and backward, at
    a budget of 1 MiB over 600 tokens x 2000 vocab (4.6 MiB of fp32 logits, so 5 chunks). The bound
    is exact arithmetic on buffer sizes, not a timing: CHUNK_BUFFERS fp32 [rows, vocab] buffers plus
    the gradients [N, H] and [V, H] (fp32) and [N]-sized vectors."""
    from bench.memory import LiveBytes

    n, h, v = 600, 8, 2000
    hidden, weight, labels = _inputs(n=n, h=h, v=v)
    rows = rows_for_budget(1.0, v)
    with LiveBytes() as mem:
        lp, ent = token_logprobs_and_entropy(hidden, weight, labels, rows, with_entropy)
        (-lp.sum() + (ent.sum() if with_entropy else 0)).backward()
    grads, vectors = 4 * (n * h + v * h), 16 * 4 * n
    working = mem.peak - grads - vectors
    assert 0.5 * 2**20 < working <= 2**20, working / 2**20


def test_grpo_loss_through_the_kernel_equals_the_logits_form():
    """GRPO's per-token logprobs at temperature 0.7 and entropy from (hidden / T) @ W^T in chunks equal
    log_softmax(logits / T) of the whole logits: the loss, its metrics and the gradients of the head's
    input and weight (FP32 tolerance above: the same softmax, sums in another order)."""
    from types import SimpleNamespace

    from twinpipe.trainer.grpo.loss import GRPOLoss
    from twinpipe.trainer.step import add_global_counts

    g = torch.Generator().manual_seed(3)
    b, t, h, v = 3, 7, 16, 300
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g).mul_(0.3)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = -100
    batch = {"labels": labels, "loss_mask": (labels != -100).float(),
             "old_logprobs": -5 + 0.3 * torch.randn(b, t, generator=g),
             "ref_logprobs": -5 + 0.3 * torch.randn(b, t, generator=g),
             "advantages": torch.randn(b, generator=g), "first_update": torch.tensor(True)}
    results = []
    for chunked in (True, False):
        loss_fn = GRPOLoss(clip_low=0.1, clip_high=0.3, beta=0.05, temperature=0.7, max_new_tokens=5,
                           ce_chunk_mib=0.002)  # 0.002 MiB: 3 rows per chunk
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = (SimpleNamespace(hidden=hid, head_weight=w) if chunked
               else SimpleNamespace(logits=F.linear(hid, w)))
        loss, metrics = loss_fn(out, add_global_counts(loss_fn, [batch], None, torch.device("cpu"))[0])
        loss.backward()
        results.append((loss.detach(), metrics, hid.grad, w.grad, loss_fn.take_diff_max()))
    (loss_c, m_c, gh_c, gw_c, d_c), (loss_p, m_p, gh_p, gw_p, d_p) = results
    torch.testing.assert_close(loss_c, loss_p, **FP32)
    for k in m_p:
        torch.testing.assert_close(m_c[k], m_p[k], **FP32, msg=k)
    torch.testing.assert_close(gh_c, gh_p, **FP32)
    torch.testing.assert_close(gw_c, gw_p, **FP32)
    assert d_c == pytest.approx(d_p, rel=1e-5)
