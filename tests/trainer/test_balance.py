"""Aux-loss-free balancing: the router-bias update pulls a skewed router back towards balance."""

import torch

from twinpipe.model.config import ModelConfig
from twinpipe.model.moe import MoE
from twinpipe.parallel.local import run_local
from twinpipe.trainer.balance import ExpertLoadTracker, global_counts, load_max_over_mean, update_router_bias


def _skewed_moe() -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = ModelConfig.preset("tiny", hidden_size=32, moe_intermediate_size=16)
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.moe = MoE(cfg)
    model.moe.reset_parameters(0.02)
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    x = torch.randn(4, 64, 32) + 3 * u  # [B, T, H], every token shares the direction u
    with torch.no_grad():  # experts 0 and 1 score high for every token: a collapsed router
        model.moe.gate.weight[:2] = u
    return model, x


def _loads(model, tracker, x):
    with torch.no_grad():
        model.moe(x)
    counts, _ = tracker.take()
    return counts


def test_bias_update_balances_a_skewed_router():
    model, x = _skewed_moe()
    tracker = ExpertLoadTracker(model)
    before = load_max_over_mean(_loads(model, tracker, x))
    assert before > 3.0  # 2 of 8 experts take most of the picks
    history = []
    for _ in range(80):
        counts = _loads(model, tracker, x)
        history.append(load_max_over_mean(counts))
        update_router_bias(model, counts, gamma=0.02)
    # 4.0 -> about 1.5: sign updates of fixed size keep the loads oscillating around balance
    assert max(history[-20:]) < 2.0 and sum(history[-20:]) / 20 < 1.8, history
    bias = model.moe.gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].max()  # overloaded experts pushed down, idle ones up
    # the bias only selects: gate values stay the unbiased sigmoid scores, normalized and scaled
    w, _, _ = model.moe.gate(x.reshape(-1, 32))
    assert torch.allclose(w.sum(-1), torch.full((w.shape[0],), 2.5))


def test_update_rule_and_centering():
    model, x = _skewed_moe()
    counts = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5]])  # mean 5
    update_router_bias(model, counts, gamma=0.001)
    b = model.moe.gate.e_score_correction_bias
    assert torch.equal(b, torch.tensor([-0.001, 0.001, 0, 0, 0, 0, 0, 0]))
    counts = torch.tensor([[10, 0, 0, 5, 5, 5, 5, 5]])
    b.zero_()
    update_router_bias(model, counts, gamma=0.001, center=True)
    assert abs(float(b.sum())) < 1e-9 and b[0] < 0 < b[1]


def _sum_counts(rank, world):
    local = torch.tensor([[rank, 10 * rank, 1]])
    return global_counts(local, None if world == 1 else __import__("torch").distributed.group.WORLD)


def test_counts_are_summed_over_data_parallel_ranks():
    out = run_local(_sum_counts, 2)
    assert all(torch.equal(o, torch.tensor([[1, 10, 2]])) for o in out)
