"""V3 transformer stages under DualPipe, DualPipeV and 1F1B against the unpartitioned model.

Each gloo rank builds the same tiny model (same seed), runs its stages, and sums gradients over the
pipeline group as the pipeline runner does; it also runs the whole model micro-batch by micro-batch
(`forward_train` + the trainer's pretraining loss). Per-micro-batch losses must be bitwise equal (fp32,
the same ops on the same shapes, including MTP on the last stage with its copy of the embedding).
Gradients are sums over micro-batches (and over copies of the shared embedding and DualPipe's stage
pairs) in another order: 1 - 2<x,y>/(|x|^2+|y|^2) < 1e-13 in float64, DualPipe's own bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from twinpipe.model.attention import document_causal_mask
from twinpipe.model.config import ModelConfig
from twinpipe.model.moe import set_aux_loss_scale
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.local import run_local
from twinpipe.parallel.pipeline.runner import PipelineRunner, StageCriterion, sum_gradients
from twinpipe.parallel.pipeline.stages import build_stages, set_stage_p2p_shapes, split_layers
from twinpipe.trainer.loss import GLOBAL_COUNTS, PretrainLoss

MICRO, SEQ = 1, 8


def tiny_model(layers: int) -> Transformer:
    cfg = ModelConfig.preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64,
                             moe_intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                             v_head_dim=8)
    torch.manual_seed(0)
    return Transformer(cfg)


def micro_batches(n: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n * MICRO, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).expand(n * MICRO, SEQ)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": pos}
    return [{k: v[i * MICRO:(i + 1) * MICRO] for k, v in batch.items()} for i in range(n)]


class _MeanOfMicroBatches:
    """The pretraining loss of one micro-batch (normalised by its own valid tokens) / n, as an
    objective: (loss to back-propagate, metrics)."""

    def __init__(self, n: int) -> None:
        self.loss_fn, self.n = PretrainLoss(0.3, mtp_depths=1), n

    def __call__(self, output, batch):
        counts = {k: v.float() for k, v in self.loss_fn.normalizers(batch).items()}
        loss, metrics = self.loss_fn(output, {**batch, GLOBAL_COUNTS: counts})
        return loss / self.n, metrics


def reference(layers: int, mbs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = tiny_model(layers)
    objective = _MeanOfMicroBatches(len(mbs))
    n = len(mbs)
    set_aux_loss_scale(model, 1.0 / n)
    losses = []
    for mb in mbs:
        loss, _ = objective(model.forward_train(mb["input_ids"], mb["position_ids"]), mb)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), [p.grad.clone() for p in model.parameters()]


def grad_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return (1 - 2 * (x @ y) / (x @ x + y @ y)).item()


def _rank(rank, world, schedule, layers, n):
    mbs = micro_batches(n, 128)
    ref_loss, ref_grads = reference(layers, mbs)
    model = tiny_model(layers)
    runner = PipelineRunner(model, schedule, world, rank, dist.group.WORLD, torch.device("cpu"))
    # The runner's step, but keeping the per-micro-batch losses step() returns.
    set_aux_loss_scale(runner.stages, 1.0 / n)
    set_stage_p2p_shapes(MICRO, SEQ, model.config.hidden_size)
    inputs, labels = runner.feeds(mbs)
    loss, _ = runner.pipe.step(*inputs, num_chunks=n, criterion=StageCriterion(_MeanOfMicroBatches(n), mbs, model.lm_head.weight),
                               labels=labels)
    sum_gradients(list(model.parameters()), dist.group.WORLD)
    errors = [grad_error(p.grad, r) for p, r in zip(model.parameters(), ref_grads)]
    # which reference losses this rank's step() returns
    if schedule == "dualpipe":
        want = ref_loss[n // 2:] if rank == 0 else ref_loss[:n // 2] if rank == world - 1 else None
    elif schedule == "dualpipev":
        want = ref_loss if rank == 0 else None
    else:
        want = ref_loss if rank == world - 1 else None
    same_loss = (loss is None) if want is None else bool(torch.equal(loss, want))
    return same_loss, max(errors)


@pytest.mark.parametrize("schedule,world,layers,n", [
    ("dualpipe", 2, 2, 4), ("dualpipev", 1, 2, 2), ("dualpipev", 2, 4, 4), ("1f1b", 2, 3, 3),
])
def test_stages_match_unpartitioned(schedule, world, layers, n):
    for same_loss, worst in run_local(_rank, world, schedule, layers, n, timeout_s=300):
        assert same_loss
        assert worst < 1e-13


def test_split_layers_balanced_and_explicit():
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    assert split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]
    with pytest.raises(ValueError, match="num_hidden_layers=3 < 4 pipeline stages"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match=r"layer_split=\[2, 2\]"):
        split_layers(5, 2, [2, 2])


@pytest.mark.parametrize("split, pp, schedule, needle", [
    ([3, 1], 1, "1f1b", r"parallel.layer_split=\[3, 1\]: needs pipeline parallelism"),
    ([2, 2], 2, "dualpipev", r"dualpipev at parallel.pp=2 has 4 stages; give 4 counts >= 1 summing to "
                             r"model.num_hidden_layers=4"),
    ([4, 0], 2, "1f1b", r"1f1b at parallel.pp=2 has 2 stages"),
    ([2, 3], 2, "dualpipe", r"summing to model.num_hidden_layers=4"),
])
def test_layer_split_refused_in_one_line(split, pp, schedule, needle):
    """parallel.layer_split is checked with the recipe, before any process starts."""
    from twinpipe.trainer.config import check_layer_split

    with pytest.raises(ValueError, match=needle):
        check_layer_split(split, pp, schedule, 4)
    check_layer_split([3, 1], 2, "1f1b", 4)  # what is allowed passes
    check_layer_split([1, 2, 1, 1], 2, "dualpipev", 5)


def test_stage_modules_share_the_models_parameters():
    model = tiny_model(4)
    first, last = build_stages(model, "dualpipev", 1, 0)
    assert first.embed_tokens is model.embed_tokens and last.embed_tokens is model.embed_tokens
    assert last.lm_head is model.lm_head and last.mtp is model.mtp
    assert [b for b in first.layers] == [model.layers[0], model.layers[1]]
    with pytest.raises(ValueError, match="parallel.pp=3: DualPipe needs an even number"):
        build_stages(model, "dualpipe", 3, 0)
    with pytest.raises(ValueError, match="dualpipev on parallel.pp=4 ranks makes 8 stages"):
        build_stages(model, "dualpipev", 4, 0)


def test_stages_keep_packed_documents_apart(monkeypatch):
    """Packed documents (positions restarting inside a row) through DualPipeV's two stages on one
    rank equal forward_train bit for bit (same ops, same shapes), each stage computing the mask once."""
    import twinpipe.parallel.pipeline.stages as stages

    model = tiny_model(2)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    with torch.no_grad():
        want = model.forward_train(ids, pos)
        calls = []

        def counted(position_ids):
            calls.append(position_ids)
            return document_causal_mask(position_ids)

        monkeypatch.setattr(stages, "document_causal_mask", counted)
        first, last = build_stages(model, "dualpipev", 1, 0)
        hidden, *mtp = last(*first(ids, pos))  # the heads' inputs: the loss applies lm_head
    assert len(calls) == 2
    assert torch.equal(hidden, want.hidden)
    assert len(mtp) == 1 and torch.equal(mtp[0], want.mtp_hidden[0])


@pytest.mark.parametrize("schedule,pp,layers", [("dualpipe", 4, 4), ("dualpipev", 2, 4), ("1f1b", 3, 5)])
def test_local_modules_and_owned_ones_count_each_parameter_once(schedule, pp, layers):
    """Every rank keeps what its stages run and nothing else (the rest on meta, names unchanged);
    the `owned` modules of all ranks cover every parameter of the model exactly once."""
    from collections import Counter

    from twinpipe.parallel.pipeline.stages import keep_local_stages, local_module_names, owned_module_names

    full = tiny_model(layers)
    all_params = {n for n, _ in full.named_parameters()}
    owned_count: Counter = Counter()
    held = 0
    for r in range(pp):
        model = tiny_model(layers)
        keep_local_stages(model, schedule, pp, r)
        local = local_module_names(model, schedule, pp, r)
        for stage in build_stages(model, schedule, pp, r):  # what the stages reference is kept
            assert not any(p.is_meta for p in stage.parameters())
        kept = {n for n, p in model.named_parameters() if not p.is_meta}
        assert {n for n, p in model.named_parameters()} == all_params
        assert kept == {n for n in all_params if any(n.startswith(m + ".") for m in local)}
        for n, p in model.named_parameters():
            if not p.is_meta:
                assert torch.equal(p, full.get_parameter(n)), n  # same values as the whole model
        held += len(kept)
        owned = owned_module_names(model, schedule, pp, r)
        assert owned <= local
        owned_count.update(n for n in all_params if any(n.startswith(m + ".") for m in owned))
    assert set(owned_count) == all_params and set(owned_count.values()) == {1}
    assert held > len(all_params) if schedule != "dualpipev" else held == len(all_params)
