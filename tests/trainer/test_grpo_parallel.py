"""GRPO across processes and time: dp=4 x ep=2, pp=2 (DualPipeV) and MTP-drafted rollouts under dp=2
equal one process (same rollouts, same losses), a run killed by SIGKILL mid-rollout resumes exactly,
and routing replay makes the training forward route every token as the rollout did, including a
forced near-tie that flips without it, in one process and through DualPipeV's stages."""

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


def _assert_same_run(ref: list[dict], got: list[dict], keys: tuple[str, ...] = ("entropy", "kl", "grad_norm"),
                     loss_abs: float = 1e-6) -> None:
    """Rollout metrics exactly, losses as `assert_matches_one_process` says; `loss` itself absolutely (a
    GRPO loss is ~0, a relative tolerance means nothing)."""
    assert_matches_one_process(ref, got, keys=keys, first_grad=1e-5, first_flip_picks=8)
    for a, b in zip(ref, got):
        assert {k: b[k] for k in ROLLOUT} == {k: a[k] for k in ROLLOUT}, a["step"]
        assert b["loss"] == pytest.approx(a["loss"], abs=loss_abs)
        assert ("logprob_diff_max" in b) == ("logprob_diff_max" in a)  # logged at each rollout's first update
        assert b.get("logprob_diff_max", 0.0) <= 1e-5


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
    from twinpipe.parallel.pipeline import in_flight
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
                for i, mb in enumerate(batches):
                    in_flight.mark(forward=i)  # as the step runner does
                    if replaying:
                        model.forward_train(mb["input_ids"])
                    else:
                        replay.remove()
                        model.forward_train(mb["input_ids"])
                        replay.__init__(model)
        finally:
            in_flight.clear()
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



def _spy_on_replay() -> list[tuple]:
    """Patch `RouteReplay` (in this process) to keep, for every replayed gate call, (rollout number,
    micro-batch, layer, the routes it replayed [B, T, K], the picks it returned [N, K], the live
    router's picks [N, K])."""
    from twinpipe.parallel.pipeline import in_flight
    from twinpipe.trainer.grpo.routing_replay import RouteReplay

    seen: list[tuple] = []
    hook, expect = RouteReplay._hook, RouteReplay.expect

    def spied_expect(self, routes):
        self.expected = getattr(self, "expected", 0) + 1
        expect(self, routes)

    def spied_hook(self, layer):
        inner = hook(self, layer)

        def spy(module, args, out):
            result = inner(module, args, out)
            if result is not None:
                index = in_flight.micro_batch()
                seen.append((self.expected, index, layer, self.routes[index][:, layer].clone(),
                             result[1].clone(), out[1].clone()))
            return result
        return spy

    RouteReplay._hook, RouteReplay.expect = spied_hook, spied_expect
    return seen


REPLAY = [*PIPELINE, "grpo.routing_replay=true", "grpo.updates_per_rollout=2", "train.steps=4"]


def _pp_replay_rank(rank: int, world: int, data: Path, run_dir: Path) -> list[tuple]:
    seen = _spy_on_replay()
    run(grpo_cfg(data, run_dir, *REPLAY, "parallel.pp=2", "parallel.schedule=dualpipev"))
    return seen


def test_routing_replay_pp2_dualpipev_equals_one_process(grpo_data, tmp_path, monkeypatch):
    """Routing replay through DualPipeV's stages (2 ranks x 2 stages, one MoE block each): the rollout
    records each rank's layers for the groups it ran and the pipeline group merges them; in training
    each stage's gates take the routes of the micro-batch the schedule runs there (`in_flight`).
    Against the one-process run with replay: the rollouts' routes of every (rollout, micro-batch,
    layer) equal exactly (same tokens, same picks: the decode's router scores on other group shapes
    fall on the same side of every tie here), every one is replayed once, 100% of the training
    routes are the rollout's, and the live router agrees with them as well as in one process (a
    route fed to the wrong micro-batch or layer would agree on a few percent: a misalignment check);
    the runs' metrics as `_assert_same_run` says (two updates per rollout: the second one's ratio
    differs from 1, so the loss sees the replayed gate weights)."""
    from twinpipe.trainer.grpo import routing_replay

    pp_seen = [s for per_rank in run_local(_pp_replay_rank, 2, grpo_data, tmp_path / "pp") for s in per_rank]
    monkeypatch.setattr(routing_replay.RouteReplay, "_hook", routing_replay.RouteReplay._hook)
    monkeypatch.setattr(routing_replay.RouteReplay, "expect", routing_replay.RouteReplay.expect)
    one_seen = _spy_on_replay()  # after the ranks forked (they spy for themselves)
    run(grpo_cfg(grpo_data, tmp_path / "one", *REPLAY))

    def by_key(seen):
        out = {}
        for expected, index, layer, routes, picks, live in seen:
            out.setdefault((expected, index, layer), []).append((routes, picks, live))
        return out

    one, pp = by_key(one_seen), by_key(pp_seen)
    layers = {layer for _, _, layer in one}
    assert sorted(pp) == sorted(one) and len(one) == 4 * 8 * len(layers) and len(layers) >= 2  # steps x mbs x L
    agree = []  # first update of each rollout (the rollout's weights): live router vs replayed routes
    for key in one:
        assert len(pp[key]) == len(one[key]) == 1, key  # each replayed once (on the rank holding it)
        (r1, _, _), (r2, picks, live) = one[key][0], pp[key][0]
        assert torch.equal(r2, r1), key
        used = r2.reshape(picks.shape)[:, 0] >= 0
        assert used.any()
        assert torch.equal(picks[used], r2.reshape(picks.shape)[used]), key  # 100% of the training routes
        if key[0] % 2:
            agree.append(float((picks.sort(-1).values == live.sort(-1).values).all(-1)[used].double().mean()))
    assert min(agree) > 0.9 and sum(agree) / len(agree) > 0.98, agree
    ref, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp")
    # from step 2 on the weights differ by ulps (Adam at lr 1e-2 amplifies the gradients' rounding), and a
    # rollout's second update (steps 2, 4) sees it through ratios != 1: measured step 4 loss 1.5e-6 apart
    # (2.8e-5 relative), grad_norm 1.05e-5 relative; so loss within 1e-5 and grad_norm at step 1 only
    _assert_same_run(ref, got, keys=("entropy", "kl"), loss_abs=1e-5)
    assert [r["routing_replay_flips"] for r in got] == pytest.approx([r["routing_replay_flips"] for r in ref],
                                                                      abs=0.02)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_stage_chunks_map_to_the_micro_batches_entering_and_leaving_there(schedule):
    """`StagePlacement.micro_batch` (the engine's chunk of a stage -> the step's micro-batch, which
    routing replay reads) agrees with `entries` / `exits` (what the runner feeds) at every first and
    last stage, and gives every stage each micro-batch of its direction once, in order."""
    from twinpipe.parallel.pipeline.placement import StagePlacement

    n = 8
    for pp in (2, 4):
        placement = StagePlacement(schedule, pp)
        per_stage = n // 2 if schedule == "dualpipe" else n
        for rank in range(pp):
            for module, stage in enumerate(placement.stages(rank)):
                got = [placement.micro_batch(module, i, n) for i in range(per_stage)]
                assert got == list(range(got[0], got[0] + per_stage)) and got[0] in (0, n - per_stage)
                if stage == 0:
                    assert got == list(placement.entries(rank, n)), (pp, rank, module)
                if stage == placement.num_stages - 1:
                    assert got == list(placement.exits(rank, n)), (pp, rank, module)
