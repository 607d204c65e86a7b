"""optim.moment_dtype=bf16 reaches the expert slots under expert parallelism (`ExpertAdamW`).

Unit level (one process): the update is `adamw_`, the ZeRO bucket's, so an expert parameter updated as
a slot (ep > 1) and as a bucket segment (ep = 1) is bit-identical, moments included; the independent
reference is torch.optim.AdamW whose fp32 moments are rounded to bf16 after every step (what
"computed in fp32, stored in bf16" means), equal bit for bit. Trainer level: dp=2 x ep=2 with EPLB and
bf16 moments keeps the experts' moments bf16 (2 bytes each), and follows one process without expert
parallelism on the same global batch, stopped at step 2 and resumed, to the tolerance of the fp32 test
(tests/trainer/test_data_parallel.py: `one_process.assert_matches_one_process`, grad norms rel 1e-5).

Why the fp32 tolerance still holds: from the same state the two layouts differ only in the order of
fp32 gradient additions (a few ulps, ~1e-7 relative); bf16 storage rounds both runs' moments the same
way except where that difference straddles a bf16 rounding boundary (about a 1e-7 / 4e-3 chance per
element), and there one moment element differs by one bf16 ulp (0.4%), changing that element's update
by under 0.4%. Measured over these 3 steps: bf16 losses equal to one process's as logged, gradient
norms within 8.9e-9 relative (fp32: 1.2e-7 and 3.0e-8). Over 8 steps (not run here) the rounding
flips accumulate: bf16 loss 8.9e-7 (fp32 1.2e-7), gradient norm up to 6.3e-4 at step 6 (fp32 2.0e-4
at step 7), which is why the test stops at 3 steps, as the fp32 one does. What the losses catch: an
expert update off by one AdamW step moves step 2's gradient norm by 1e-4. What they do not catch at 3
steps: the old fp32 expert moments under a bf16 recipe (5.1e-8 on the gradient norm; over 8 steps it
changes the routing at step 6 and the loss by 7.9e-6); the dtype and byte checks catch that.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinpipe.parallel.local import run_local
from twinpipe.trainer.metrics import read_metrics
from twinpipe.trainer.optim.optimizer import no_decay
from twinpipe.trainer.optim.zero import ZeroAdamW
from one_process import assert_matches_one_process
from trainer_recipe import make_cfg

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def _params() -> list[tuple[str, nn.Parameter]]:
    """Expert-like slots [S, I, H] and a no-decay vector."""
    g = torch.Generator().manual_seed(0)
    return [("experts.gate_proj", nn.Parameter(torch.randn(4, 6, 5, generator=g))),
            ("experts.down_proj", nn.Parameter(torch.randn(4, 5, 6, generator=g))),
            ("norm.weight", nn.Parameter(torch.randn(7, generator=g)))]


def _grads(step: int, named) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # mixed magnitudes, so some moments sit far below others (bf16 keeps 8 bits of each)
    return [torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g).pow(4) for _, p in named]


def _run(moment_dtype: torch.dtype, as_experts: bool, steps: int = 5, clip_coef: float = 0.7):
    """ZeroAdamW over _params() on one rank, the experts as `expert_param` slots or as bucket segments;
    returns {name: (param, exp_avg, exp_avg_sq)} and state_bytes()."""
    named = _params()
    opt = ZeroAdamW(named, betas=BETAS, eps=EPS, weight_decay=WD, no_decay=no_decay, moment_dtype=moment_dtype,
                    expert_param=lambda n, p: as_experts and n.startswith("experts."))
    for step in range(steps):
        for (_, p), g in zip(named, _grads(step, named)):
            p.grad = g.clone()
        opt.reduce_gradients()
        opt.step(LR, clip_coef)
        opt.zero_grad()
    out = {}
    for name, p in named:
        if p in opt.expert_names:
            st = opt.expert_opt.state[p]
            out[name] = (p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
            assert float(st["step"]) == steps
        else:
            (b,) = opt.buckets
            s = next(s for s in b.segments if s.name == name)
            rows = slice(s.start, s.start + p.numel())
            out[name] = (p.detach().clone(), b.exp_avg[rows].view(p.shape), b.exp_avg_sq[rows].view(p.shape))
    return out, opt.state_bytes()


def _torch_reference(moment_dtype: torch.dtype, steps: int = 5, clip_coef: float = 0.7):
    """torch.optim.AdamW with its fp32 moments rounded to `moment_dtype` after every step."""
    named = _params()
    params = dict(named)
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": WD},
                             {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, foreach=False)
    for step in range(steps):
        for (_, p), g in zip(named, _grads(step, named)):
            p.grad = g * clip_coef
        opt.step()
        for st in opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                st[k].copy_(st[k].to(moment_dtype))
    return {n: (params[n].detach().clone(), opt.state[params[n]]["exp_avg"].to(moment_dtype),
                opt.state[params[n]]["exp_avg_sq"].to(moment_dtype)) for n in params}


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_expert_slots_update_like_bucket_segments_and_torch(moment_dtype):
    slots, slot_bytes = _run(moment_dtype, as_experts=True)
    segments, _ = _run(moment_dtype, as_experts=False)
    reference = _torch_reference(moment_dtype)
    for name in reference:
        for what, a, b, ref in zip(("param", "exp_avg", "exp_avg_sq"), slots[name], segments[name], reference[name]):
            assert a.dtype == (torch.float32 if what == "param" else moment_dtype), (name, what, a.dtype)
            assert torch.equal(a, b), (name, what, "slot vs bucket segment")
            assert torch.equal(a, ref), (name, what, "vs torch AdamW (moments rounded each step)")
    # bf16 storage really rounds: after 5 steps the bf16 run's parameters are not the fp32 run's
    if moment_dtype == torch.bfloat16:
        fp32, _ = _run(torch.float32, as_experts=True)
        assert not torch.equal(fp32["experts.gate_proj"][0], slots["experts.gate_proj"][0])


def test_expert_moment_bytes_follow_moment_dtype():
    """Expert slots hold exp_avg + exp_avg_sq (8 bytes per element in fp32, 4 in bf16); the bucket's
    no-decay vector (7 elements) master + moments (12 or 8 bytes)."""
    expert_numel = 4 * 6 * 5 + 4 * 5 * 6
    _, fp32 = _run(torch.float32, as_experts=True, steps=1)
    _, bf16 = _run(torch.bfloat16, as_experts=True, steps=1)
    assert fp32 == 8 * expert_numel + 12 * 7
    assert bf16 == 4 * expert_numel + 8 * 7


BF16_COMMON = ["train.steps=3", "checkpoint.every=2", "optim.moment_dtype=bf16"]
EP_LAYOUT = ["parallel.dp=2", "parallel.ep=2", "eplb.every=2", "eplb.replicas=12"]


def _ep_rank(rank, world, data_dir, run_dir, steps, resume):
    """dp=2 x ep=2 with EPLB and bf16 moments; returns the experts' moment dtypes, their state bytes
    and this rank's optimizer-state bytes."""
    from twinpipe.trainer import loop

    seen = {}
    build = loop.build_optimizer

    def build_and_keep(*args, **kwargs):
        seen["opt"] = build(*args, **kwargs)
        return seen["opt"]

    loop.build_optimizer = build_and_keep
    summary = loop.train(make_cfg(data_dir, run_dir, *BF16_COMMON, *EP_LAYOUT, f"train.steps={steps}",
                                  f"resume={resume}"))
    opt = seen["opt"]
    states = list(opt.expert_opt.state.values())
    dtypes = {str(st[k].dtype) for st in states for k in ("exp_avg", "exp_avg_sq")}
    expert_bytes = sum(st[k].numel() * st[k].element_size() for st in states for k in ("exp_avg", "exp_avg_sq"))
    expert_numel = sum(p.numel() for p in opt.expert_names)
    bucket = opt.buckets[0]
    return dtypes, expert_bytes, expert_numel, summary["optimizer_state_bytes"], bucket.hi - bucket.lo


def test_ep2_bf16_moments_match_one_process_and_resume(data_dir, tmp_path):
    """One process (experts in the bucket) vs dp=2 x ep=2 with an EPLB re-plan after step 2 (moving the
    bf16 moments), stopped at step 2 and resumed; bf16 moments on both sides."""
    ref_dir, ep_dir = tmp_path / "ep1", tmp_path / "ep2"
    from twinpipe.trainer.loop import train

    train(make_cfg(data_dir, ref_dir, *BF16_COMMON, "resume=never"))
    first = run_local(_ep_rank, 2, data_dir, ep_dir, 2, "never")
    resumed = run_local(_ep_rank, 2, data_dir, ep_dir, 3, "auto")
    for dtypes, expert_bytes, expert_numel, total, shard in first + resumed:
        assert dtypes == {"torch.bfloat16"}
        assert expert_bytes == 2 * 2 * expert_numel  # half of fp32's 2 x 4 bytes
        assert total == expert_bytes + 8 * shard     # bucket: fp32 master + two bf16 moments
    ref, got = read_metrics(ref_dir), read_metrics(ep_dir)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert "eplb/slots_received" in got[1]
    assert_matches_one_process(ref, got, later_grad=1e-5)
