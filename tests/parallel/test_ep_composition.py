"""A few training steps composing EP, EPLB, MTP and router-bias balancing, against one process.

4 gloo ranks: DP = 4, EP = 2, 12 physical slots for 8 experts (redundant replicas), the tiny
DeepSeek-V3 model with its MTP layer, AdamW (torch), the aux-loss-free bias update from the global
expert counts (`twinpipe.trainer.balance`), and an EPLB re-plan (weights + AdamW state moved) after
every second step. The reference is one process running the same global batch as 4 accumulated
micro-batches with the same optimizer and bias updates and no placement at all.

Exactly equal: the global expert counts of every step (so routing, bias updates and EPLB inputs) and
the router biases at the end. Per-step losses: rtol 1e-5 (summation orders differ, see
test_expert_parallel.py). Parameters: the four steps' total update must agree to 1e-3 relative
(norm of the difference over the norm of the reference update; measured <= 8e-5): AdamW divides by
sqrt(v), which magnifies rounding-level gradient differences in elements whose gradient is nearly
zero, so elementwise fp32 tolerances do not apply, while any routing, replica or state-move error
changes updates by O(1).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from twinpipe.model import ModelConfig, Transformer
from twinpipe.model.moe import set_aux_loss_scale
from twinpipe.parallel.experts.rebalance import ExpertRebalancer
from twinpipe.parallel.experts.grad_reduction import reduce_expert_grads
from twinpipe.parallel.experts.layer import apply_expert_parallel, expert_parallel_layers, is_expert_param
from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.local import run_local
from twinpipe.trainer.balance import ExpertLoadTracker, global_counts, update_router_bias

WORLD, EP, SLOTS, STEPS, GAMMA, MTP_LAMBDA = 4, 2, 12, 4, 0.01, 0.3


def _config() -> ModelConfig:
    return ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=512)


def _tokens(step: int, rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(1000 * step + rank))


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    out = model.forward_train(tokens[:, :-1])
    labels = tokens[:, 1:]
    lm = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    mtp = F.cross_entropy(out.mtp_logits[0].flatten(0, 1), labels[:, 1:].flatten())
    return lm + MTP_LAMBDA * mtp


def _reference(config: ModelConfig, model: Transformer):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = ExpertLoadTracker(model)
    losses, counts = [], []
    set_aux_loss_scale(model, 1.0 / WORLD)
    for step in range(STEPS):
        total = 0.0
        for r in range(WORLD):
            loss = _loss(model, _tokens(step, r, config.vocab_size)) / WORLD
            loss.backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        c, _ = tracker.take()
        update_router_bias(model, c, GAMMA)
        losses.append(total)
        counts.append(c)
    return losses, counts


def _composed(rank: int, world: int) -> None:
    config = _config()
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0.05)
    ref_model = copy.deepcopy(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_losses, ref_counts = _reference(config, ref_model)

    grid = build_grid(pp=1, dp=world, ep=EP)
    apply_expert_parallel(model, grid.ep_group, num_replicas=SLOTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tracker = ExpertLoadTracker(model)
    rebalancer = ExpertRebalancer(model)
    dense = [p for p in model.parameters() if not is_expert_param(p)]
    window = torch.zeros(len(rebalancer.layers), config.n_routed_experts, dtype=torch.int64)
    moved = 0.0
    for step in range(STEPS):
        loss = _loss(model, _tokens(step, rank, config.vocab_size))
        loss.backward()
        for p in dense:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        reduce_expert_grads(model, grid.edp_group, grid.dp_group, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = global_counts(tracker.take()[0], grid.dp_group)
        assert torch.equal(counts, ref_counts[step]), f"step {step}: routing differs from one process"
        update_router_bias(model, counts, GAMMA)
        window += counts
        if step % 2 == 1:
            moved += rebalancer.replan(window.float(), optimizer)["eplb/slots_received"]
            window.zero_()
        total = loss.detach() / world
        dist.all_reduce(total)
        torch.testing.assert_close(float(total), ref_losses[step], rtol=1e-5, atol=0.0)

    moved = torch.tensor(moved)
    dist.all_reduce(moved)
    assert float(moved) > 0, "no re-plan moved an expert: the test would not exercise EPLB moves"

    ref_params = dict(ref_model.named_parameters())
    layers = {id(layer.local): layer for layer in expert_parallel_layers(model)}
    for name, p in model.named_parameters():
        if ".experts.local." in name:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            ids = layers[id(owner)].local_logical_ids()
            want = ref_params[name.replace(".local.", ".")][ids]
            init[name] = init[name.replace(".local.", ".")][ids]
        else:
            want = ref_params[name]
        update_error = float((p.data - want.data).norm() / (want.data - init[name]).norm())
        assert update_error < 1e-3, f"{name}: parameter update differs by {update_error:.2e} (relative)"
    for (n, b), (_, rb) in zip(model.named_buffers(), ref_model.named_buffers()):
        if n.endswith("e_score_correction_bias"):
            assert torch.equal(b, rb), n


def test_ep_eplb_mtp_bias_balancing_match_one_process():
    run_local(_composed, WORLD)
