"""Selective recomputation (`twinpipe.parallel.recompute`) changes memory, not arithmetic.

Every option (norms, mla_up, attention, router, moe, full and their combinations) gives a loss and
gradients *bit-identical* (torch.equal) to no recomputation, in fp32: the backward reruns the same
forward ops on the same inputs and back-propagates through the same graph. Checked in one process (with
MTP and a packed-document mask), with the FP8 emulation, under each pipeline schedule (2 gloo ranks
each, the runner's own micro-batch order on both sides, so the comparison stays exact; DualPipe and
DualPipeV with the zero-bubble W split) and, for the collective-free attention and router, under
expert parallelism with the sub-layer EP overlap. No region is recomputed twice (nested), the
expert-load tracker must not count a recomputed forward, and routing replay holds through a
recomputed router.
"""

from __future__ import annotations

import copy

import pytest
import torch

from twinpipe.model.config import ModelConfig
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.local import run_local
from twinpipe.parallel.recompute import apply_recompute, parse_options

OPTIONS = ["norms", "mla_up", "attention", "router", "moe", "full", ["norms", "mla_up", "moe"],
           ["norms", "mla_up", "attention", "router"]]


def _config(layers: int = 2) -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=96, hidden_size=64, num_hidden_layers=layers,
                              intermediate_size=96, moe_intermediate_size=32, num_attention_heads=2,
                              num_nextn_predict_layers=1)


def _batch(config: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=g)        # [B, T]
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(2, 16)  # two packed documents
    return tokens, positions


def _loss_and_grads(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model.forward_train(tokens, positions)
    ce = torch.nn.functional.cross_entropy
    loss = ce(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), tokens[:, 1:].reshape(-1))
    for k, lg in enumerate(out.mtp_logits, start=1):
        loss = loss + 0.3 * ce(lg[:, :-1].reshape(-1, lg.shape[-1]), tokens[:, 1 + k:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_identical(ref, got, what: str) -> None:
    (ref_loss, ref_grads), (loss, grads) = ref, got
    assert torch.equal(ref_loss, loss), f"{what}: loss {loss.item()} != {ref_loss.item()}"
    assert grads.keys() == ref_grads.keys(), what
    for name in ref_grads:
        assert torch.equal(ref_grads[name], grads[name]), f"{what}: gradient of {name} differs"


@pytest.mark.parametrize("fp8", ["off", "emulate"])
def test_every_option_is_bit_identical(fp8, monkeypatch):
    from twinpipe.parallel import recompute

    reruns = []
    original_rerun = recompute._rerun
    monkeypatch.setattr(recompute, "_rerun", lambda: (reruns.append(1), original_rerun())[1])
    torch.manual_seed(0)
    config = _config()
    base = Transformer(config)
    if fp8 != "off":
        from twinpipe.fp8 import convert_model

        base = convert_model(base, fp8)
    tokens, positions = _batch(config)
    ref = _loss_and_grads(base, tokens, positions)
    for option in OPTIONS:
        model = copy.deepcopy(base)
        counts = apply_recompute(model, option)
        assert counts[option] if isinstance(option, str) else sum(counts.values()), f"{option}: {counts}"
        reruns.clear()
        _assert_identical(ref, _loss_and_grads(model, tokens, positions), f"recompute={option} fp8={fp8}")
        # each wrapped module runs once per forward, so once per backward: no region reran inside another
        assert len(reruns) == sum(counts.values()), f"{option}: {len(reruns)} recomputations for {counts}"
        # the state dict (names, values) is untouched; a second application wraps nothing twice
        assert list(model.state_dict()) == list(base.state_dict())
        kinds = {type(m) for m in model.modules()}
        apply_recompute(model, option)
        assert {type(m) for m in model.modules()} == kinds


def test_mla_up_keeps_the_latents_not_q_per_head():
    """Under mla_up the attention keeps x and the latents (c_kv, k_pe) for its recomputation, no
    per-head q (nor the keys made from the latents): `MLA.attend` recomputes the query path with the
    core. Without recomputation they are saved (B x T x heads x qk_head_dim floats each; so the check
    can fail)."""
    from twinpipe.model.attention import MLA

    torch.manual_seed(0)
    config = _config()
    x = torch.randn(2, 16, config.hidden_size)
    per_head_bytes = 2 * 16 * config.num_attention_heads * config.qk_head_dim * 4
    per_head = []
    for option in ("none", "mla_up"):
        mla = MLA(config, 0)
        apply_recompute(mla, option)
        params = {p.untyped_storage().data_ptr() for p in mla.parameters()}
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mla(x.clone().requires_grad_())
        per_head.append(saved.count(per_head_bytes))
    assert per_head[0] >= 2 and per_head[1] == 0, per_head


def test_block_regions_keep_the_plain_graph():
    """`Block.attention` and `Block.route` (the regions `attention` and `router` recompute) cut the block
    without changing its autograd graph: the gate and the experts read one view of the normed x, as in
    `MoE.forward` alone, so the gradients meet in the same order and everything equals the plain
    composition h + attn(norm(h)), h + moe(norm(h)) bit for bit (a second view of x for the experts
    sums the three gradients of x in another order: last-bit differences, seen here)."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0)
    blocks = Transformer(config).layers[1:]  # MoE blocks
    x = torch.randn(2, 12, config.hidden_size, generator=torch.Generator().manual_seed(3))

    def plain(block, h):
        h = h + block.self_attn(block.input_layernorm(h))
        return h + block.mlp(block.post_attention_layernorm(h))

    results = []
    for forward in (plain, lambda block, h: block(h)):
        blocks.zero_grad(set_to_none=True)
        h = out = x.clone().requires_grad_()
        for block in blocks:
            out = forward(block, out)
        out.square().mean().backward()
        results.append([out.detach(), h.grad, *(p.grad for p in blocks.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_attention_and_router_keep_only_the_residuals():
    """Under FP8 with [attention, router] a MoE block keeps two tensors of width hidden in the compute
    dtype, the block input and the residual after attention: the attention sublayer and the router
    recompute from them, the routed and shared experts keep their input in FP8. Without them the
    attention's norm, MLA and the router's input x are kept too (so the check can fail)."""
    from twinpipe.fp8 import convert_model

    config = ModelConfig.preset("tiny", vocab_size=96, hidden_size=128, num_hidden_layers=2, intermediate_size=96,
                                moe_intermediate_size=32, num_attention_heads=2, num_nextn_predict_layers=0)
    kept = []
    for option in ("none", ["attention", "router"]):
        torch.manual_seed(0)
        block = convert_model(Transformer(config), "emulate").layers[1]  # a MoE block
        apply_recompute(block, option)
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        wide: set[int] = set()

        def pack(t):
            if (t.dtype == torch.float32 and t.dim() and t.shape[-1] == config.hidden_size
                    and t.untyped_storage().data_ptr() not in params):
                wide.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(torch.randn(2, 16, config.hidden_size, requires_grad=True))
        kept.append(len(wide))
    assert kept[0] > 2 and kept[1] == 2, kept


def test_recomputed_forward_is_not_counted():
    """Under `full` the MoE layers run again in the backward; the tracker must count one forward."""
    from twinpipe.trainer.balance import ExpertLoadTracker

    torch.manual_seed(0)
    config = _config()
    plain = Transformer(config)
    full = copy.deepcopy(plain)
    apply_recompute(full, "full")
    tokens, positions = _batch(config)
    taken = []
    for model in (plain, full):
        tracker = ExpertLoadTracker(model)
        _loss_and_grads(model, tokens, positions)
        taken.append(tracker.take())
        tracker.remove()
    assert torch.equal(taken[0][0], taken[1][0]) and taken[0][1] == taken[1][1]
    assert int(taken[0][0].sum()) > 0


def test_routing_replay_through_a_recomputed_router():
    """GRPO's routing replay replaces the gate's picks by a forward hook; under `router` (and `full`)
    the gate reruns in the backward, where the hook takes the backward's micro-batch: the same picks,
    so the same loss and gradients, and the flips are counted once."""
    from twinpipe.parallel.pipeline import in_flight
    from twinpipe.trainer.grpo.routing_replay import RouteReplay, main_gates

    torch.manual_seed(0)
    config = _config()
    base = Transformer(config)
    tokens, positions = _batch(config)
    layers, k = len(main_gates(base)), config.num_experts_per_tok
    g = torch.Generator().manual_seed(5)
    routes = torch.stack([torch.randperm(config.n_routed_experts, generator=g)[:k] for _ in range(2 * layers * 16)])
    routes = routes.view(2, layers, 16, k)                                              # [B, L, T, K]
    routes[:, :, :3] = -1  # live routing there
    results = []
    for option in ("none", ["norms", "mla_up", "attention", "router"], "full"):
        model = copy.deepcopy(base)
        apply_recompute(model, option)
        replay = RouteReplay(model)
        replay.expect([routes])
        in_flight.mark(forward=0, backward=0)
        try:
            results.append((_loss_and_grads(model, tokens, positions), replay.take_flips()))
        finally:
            in_flight.clear()
            replay.remove()
    (ref, ref_flips), *others = results
    assert ref_flips[1] == 2 * layers * 13 and ref_flips[0] > 0, ref_flips
    for (got, flips), option in zip(others, ("attention+router", "full")):
        _assert_identical(ref, got, option)
        assert flips == ref_flips, option


def test_options_are_checked():
    assert parse_options("none") == []
    assert parse_options(["moe", "norms", "moe"]) == ["norms", "moe"]
    with pytest.raises(ValueError, match=r"train.recompute=attn: unknown option 'attn'"):
        parse_options("attn")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_options(["none", "full"])


def _pipeline(rank, world, schedule, fp8):
    from twinpipe.parallel.grid import build_grid
    from twinpipe.parallel.pipeline.runner import PipelineRunner
    from twinpipe.parallel.pipeline.zero_bubble import split_weight_gradients

    grid = build_grid(pp=world, dp=1, ep=1)
    torch.manual_seed(0)
    config = _config(layers=4)
    base = Transformer(config)
    if fp8 != "off":
        from twinpipe.fp8 import convert_model

        base = convert_model(base, fp8)
    if schedule != "1f1b":  # as parallelize: the zero-bubble W split, then recomputation wraps it
        split_weight_gradients(base)
    g = torch.Generator().manual_seed(3)
    micro_batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 16), generator=g)}
                     for _ in range(4)]

    def objective(output, mb):
        ce = torch.nn.functional.cross_entropy
        ids = mb["input_ids"]
        loss = ce(output.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        for k, lg in enumerate(output.mtp_logits, start=1):
            loss = loss + 0.3 * ce(lg[:, :-1].reshape(-1, config.vocab_size), ids[:, 1 + k:].reshape(-1))
        return loss, {"loss": loss.detach()}

    results = []
    for option in ("none", ["norms", "mla_up", "moe", "full"], ["norms", "mla_up", "attention", "router"]):
        model = copy.deepcopy(base)
        if option != "none":
            apply_recompute(model, option)
        runner = PipelineRunner(model, schedule, grid.pp, grid.pp_rank, grid.pp_group, torch.device("cpu"),
                                mirror_group=grid.pp_mirror_group)
        metrics = runner.run(micro_batches, objective)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((metrics["loss"], grads))
    for got in results[1:]:
        _assert_identical(results[0], got, f"{schedule} fp8={fp8} rank {rank}")
    return len(results[0][1])


@pytest.mark.parametrize("schedule,fp8", [("1f1b", "off"), ("dualpipe", "off"), ("dualpipev", "off"),
                                          ("dualpipe", "emulate")])
def test_pipeline_schedules_bit_identical(schedule, fp8):
    """Each schedule; under DualPipe / DualPipeV with the zero-bubble W split (the recomputed Linears'
    weight gradients are deferred to the W chunks), FP8 emulated or not."""
    counted = run_local(_pipeline, 2, schedule, fp8, timeout_s=120)
    assert all(n > 0 for n in counted)


def _expert_parallel(rank, world, fp8):
    """Two micro-batches of two expert-parallel MoE blocks (ep = world), micro-batch 1's backward
    overlapped with micro-batch 0's forward (`overlap.overlapped_forward_backward`, as DualPipe runs
    them), then micro-batch 0's backward: outputs, input and parameter gradients per option."""
    import torch.distributed as dist
    from torch import nn

    from twinpipe.parallel.experts import overlap
    from twinpipe.parallel.experts.layer import apply_expert_parallel

    config = ModelConfig.preset("tiny", num_hidden_layers=3, num_nextn_predict_layers=0)

    def moe_blocks() -> nn.Module:
        torch.manual_seed(0)
        model = Transformer(config)
        if fp8 != "off":
            from twinpipe.fp8 import convert_model

            model = convert_model(model, fp8)
        apply_expert_parallel(model, dist.group.WORLD)
        return nn.Sequential(*model.layers[1:])

    g = torch.Generator().manual_seed(10 + rank)
    inputs = [torch.randn(2, 12, config.hidden_size, generator=g) for _ in range(2)]  # [B, T, H] each
    targets = [torch.randn(2, 12, config.hidden_size, generator=g) for _ in range(2)]
    criterion = lambda out, target: (out - target).square().mean()  # noqa: E731
    results = []
    for option in ("none", ["norms", "mla_up", "attention", "router"]):
        stage = moe_blocks()
        apply_recompute(stage, option)
        x0, x1 = (x.clone().requires_grad_() for x in inputs)
        loss1 = criterion(stage(x1), targets[1])
        out0, loss0 = overlap.overlapped_forward_backward(stage, [x0], criterion, [targets[0]], stage, loss1, [], [])
        assert overlap.LAST_REGION["planned"], overlap.LAST_REGION  # the backward was cut, not run whole
        loss0.backward()
        grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        results.append(((out0.detach(), loss0.detach(), x0.grad, x1.grad), grads))
    (ref, ref_grads), (got, grads) = results
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), f"rank {rank}: outputs or input gradients differ"
    assert grads.keys() == ref_grads.keys() and all(torch.equal(ref_grads[n], grads[n]) for n in grads), rank
    return len(grads)


@pytest.mark.parametrize("fp8", ["off", "emulate"])
def test_attention_and_router_under_expert_parallelism(fp8):
    """`attention` and `router` hold no collective, so they run under ep > 1 (unlike `full`), also with
    the sub-layer EP overlap, whose backward segments cut at the router's outputs: bit-identical."""
    assert all(n > 0 for n in run_local(_expert_parallel, 2, fp8, timeout_s=120))
