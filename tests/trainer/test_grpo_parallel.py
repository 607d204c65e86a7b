"""GRPO across processes and time: dp=4 x ep=2, pp=2 (DualPipeV) and MTP-drafted rollouts under dp=2
equal one process (same rollouts, same losses), a run killed by SIGKILL mid-rollout resumes exactly,
and routing replay makes the training forward route every token as the rollout did, including a
forced near-tie that flips without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_recipe import grpo_cfg, make_data
from one_process import assert_matches_one_process
from trainer_recipe import killed_run
from twinpipe.parallel.grid import Grid
from twinpipe.parallel.local import run_local
from twinpipe.trainer.metrics import read_metrics
from twinpipe.trainer.train import run


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("grpo-data"))


PARALLEL = ["train.steps=3", "train.micro_batch=2", "resume=never", "grpo.beta=0.05", "optim.lr=1e-2"]
ROLLOUT = ("reward_mean", "reward_std", "response_length_mean", "frac_zero_std_groups", "accuracy")


def _assert_same_run(ref: list[dict], got: list[dict]) -> None:
    """Rollout metrics exactly, losses as `assert_matches_one_process` says; `loss` itself absolutely (a
    GRPO loss is ~0, a relative tolerance means nothing)."""
    assert_matches_one_process(ref, got, keys=("entropy", "kl", "grad_norm"), first_grad=1e-5, first_flip_picks=8)
    for a, b in zip(ref, got):
        assert {k: b[k] for k in ROLLOUT} == {k: a[k] for k in ROLLOUT}, a["step"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["logprob_diff_max"] <= 1e-5


def _rank(rank: int, world: int, data: Path, run_dir: Path) -> None:
    run(grpo_cfg(data, run_dir, *PARALLEL, "parallel.dp=4", "parallel.ep=2"))


def test_dp4_ep2_equals_one_process(grpo_data, tmp_path):
    """Each dp rank rolls out its one group (EP pairs in lockstep), the reference runs in the same
    layout. The rollouts are the same tokens (sampling noise keyed by sequence index): rollout metrics
    equal exactly. Losses within `assert_matches_one_process`'s tolerances (the same sums in another
    order)."""
    run(grpo_cfg(grpo_data, tmp_path / "one", *PARALLEL))
    run_local(_rank, 4, grpo_data, tmp_path / "four")
    _assert_same_run(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four"))


PIPELINE = [*PARALLEL, "model.num_hidden_layers=4"]  # DualPipeV: 2 ranks x 2 stages, one block each


def _pp_rank(rank: int, world: int, data: Path, run_dir: Path) -> None:
    run(grpo_cfg(data, run_dir, *PIPELINE, "parallel.pp=2", "parallel.schedule=dualpipev"))


def test_pp2_dualpipev_equals_one_process(grpo_data, tmp_path):
    """Rollouts through DualPipeV's two stages (`generate_parallel`), the reference's logprobs through
    `score_parallel`: the same tokens (keyed noise), so rollout metrics equal exactly; pi_old and the
    reference logprobs come from the same logits computed on other micro-batch shapes (fp32 rounding:
    `logprob_diff_max` stays <= 1e-5), so losses within `assert_matches_one_process`'s tolerances."""
    run(grpo_cfg(grpo_data, tmp_path / "one", *PIPELINE))
    run_local(_pp_rank, 2, grpo_data, tmp_path / "pp")
    _assert_same_run(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp"))


def _speculative_rank(rank: int, world: int, data: Path, run_dir: Path) -> None:
    run(grpo_cfg(data, run_dir, *PARALLEL, "grpo.speculative=true", "parallel.dp=2"))


def test_speculative_dp2_equals_one_process(grpo_data, tmp_path):
    """MTP-drafted rollouts draw with noise keyed by sequence: each dp rank's half of the sequences gets
    the tokens and the accept/reject decisions it gets in one process (acceptance equal exactly)."""
    run(grpo_cfg(grpo_data, tmp_path / "one", *PARALLEL, "grpo.speculative=true"))
    run_local(_speculative_rank, 2, grpo_data, tmp_path / "dp")
    ref, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "dp")
    _assert_same_run(ref, got)
    assert [r["speculative_acceptance"] for r in got] == [r["speculative_acceptance"] for r in ref]


RESUME = ["train.steps=4", "grpo.updates_per_rollout=2", "checkpoint.every=3", "grpo.beta=0.05"]


def test_kill_mid_rollout_and_resume_is_exact(grpo_data, tmp_path):
    """Killed after step 3's checkpoint, half-way through a rollout's two updates: the resume takes
    the saved rollout for step 4, then the policy, optimizer and prompt position carry on bit for bit."""
    run(grpo_cfg(grpo_data, tmp_path / "straight", *RESUME, "resume=never"))
    assert killed_run(run, grpo_cfg(grpo_data, tmp_path / "killed", *RESUME), "step:3") == -9
    run(grpo_cfg(grpo_data, tmp_path / "killed", *RESUME, "resume=auto"))
    ref, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm", "kl", "entropy", "clip_fraction", *ROLLOUT, "expert_load"):
            assert a[key] == b[key], (key, a["step"])


def test_routing_replay(grpo_data, tmp_path):
    """Routes recorded during the rollout (decode with the latent cache) against the training forward's
    own: without replay they agree except where the two arithmetics round differently; then one expert's
    router bias is nudged so that a token's last pick loses to another expert by 1e-6 in the training
    forward (a near-tie broken the other way, as an ulp of difference would) -> without replay that
    route flips; with replay 100% of the training routes are the rollout's."""
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.trainer.build import build_model
    from twinpipe.trainer.grpo.rollout import RolloutSource
    from twinpipe.trainer.grpo.routing_replay import RouteReplay, main_gates

    cfg = grpo_cfg(grpo_data, tmp_path, "grpo.routing_replay=true")
    model = build_model(cfg, torch.device("cpu"))
    replay = RouteReplay(model)
    source = RolloutSource(cfg, load_tokenizer(grpo_data / "tok"), Grid.single(), model, None, replay)
    batches = source.next_step()
    routes = torch.cat([mb["routes"] for mb in batches])                           # [N, L, T, K]
    used = routes[..., 0] >= 0                                                      # [N, L, T]
    gates = main_gates(model)

    def training_routes(replaying: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen: list[list[torch.Tensor]] = [[] for _ in gates]
        hooks = [g.register_forward_hook(lambda m, a, out, s=s: s.append((out[1].detach(), out[2].detach())))
                 for g, s in zip(gates, seen)]
        replay.expect([mb["routes"] for mb in batches] if replaying else [])
        model.train()
        try:
            with torch.no_grad():
                for mb in batches:
                    if replaying:
                        model.forward_train(mb["input_ids"])
                    else:
                        replay.remove()
                        model.forward_train(mb["input_ids"])
                        replay.__init__(model)
        finally:
            for h in hooks:
                h.remove()
        N, L, T, K = routes.shape
        idx = torch.stack([torch.cat([i for i, _ in s]).view(N, T, K) for s in seen], 1)
        scores = [torch.cat([sc for _, sc in s]).view(N, T, -1) for s in seen]
        return idx.sort(-1).values, scores

    want = routes.sort(-1).values
    live, scores = training_routes(False)
    agree = (live == want).all(-1)[used].double().mean()
    assert agree > 0.98, agree  # the recorder's positions line up with the training rows
    replayed, _ = training_routes(True)
    assert torch.equal(replayed[used], want[used])

    # force a near-tie at the first used token of layer 0: expert b overtakes the rollout's weaker pick a
    n, t = [int(i) for i in used[:, 0].nonzero()[0]]
    gate = gates[0]
    bias = gate.e_score_correction_bias
    biased = scores[0][n, t] + bias                                                 # [E]
    picks = routes[n, 0, t]
    a = int(picks[biased[picks].argmin()])
    for b in biased.argsort(descending=True).tolist():
        if b in picks.tolist():
            continue
        saved = bias.clone()
        bias[b] += float(biased[a] - biased[b]) + 1e-6
        live, _ = training_routes(False)
        if not torch.equal(live[n, 0, t], want[n, 0, t]):
            break
        bias.copy_(saved)
    else:
        pytest.fail("no single-expert nudge flipped the route")
    replayed, _ = training_routes(True)
    assert torch.equal(replayed[used], want[used])

