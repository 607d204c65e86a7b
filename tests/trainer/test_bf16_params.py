"""optim.param_dtype=bf16: BF16 parameters, FP32 master weights and FP32 gradients (DeepSeek-V3 §3.3).

Unit level (one process, exact): ZeroAdamW over a small model stores its parameters in BF16, takes the
FP32 master from their exact FP32 values, accumulates each micro-batch's BF16 gradient into an FP32
`main_grad` and runs AdamW on the master: torch.optim.AdamW on an FP32 copy fed the same FP32 sums of
the same BF16 gradients gives the same bits (master, parameters = its BF16 rounding, gradient norm), for
the dense bucket and for expert slots (`ExpertAdamW`'s "master" state). A gradient written outside
autograd (the zero-bubble deferred weight gradient, `weight_grad_store.accumulate`) lands in main_grad.

Trainer level (tiny recipe, train.dtype=bf16): dp=2 x ep=2 with EPLB, and pp=2 DualPipe (deferred
weight gradients; the embedding's two copies summed in FP32), each stopped at step 2 and resumed, and
pp=2 x dp=2 x ep=2 DualPipe (the EP overlap's backward writes the leaves' .grad itself; the runner
folds them into main_grad after each chunk), against the one-process BF16-parameter run with
`assert_matches_one_process`: step 1 starts from bitwise-equal weights (same routing: expert loads
equal, losses within 1e-6). Its grad norm differs by up to 4.75e-6 relative under pp=2 and 1.08e-5
under pp=2 x dp=2 x ep=2 (measured; dp=2 x ep=2: 2.6e-9), beyond the FP32 rule's 1e-6 (FP32
parameters under BF16 autocast: 1.3e-6 and 5.9e-7), presumably because a parameter used at both
pipeline ends (the embedding, which the MTP block shares) gets one BF16 gradient of its two uses in
one process and two BF16 gradients summed in FP32 under the pipeline; the bounds are 3e-5 and 5e-5
(6x and 4.6x, for other CPUs' kernels; a copy not summed or a wrong 1/n moves the norm by > 1e-3).
Later records: under BF16 autocast a router score near a tie flips already at step 2, with FP32
parameters as with BF16 ones (measured at step 2, BF16 parameters: 1 pick moved under dp=2 x ep=2, 2
under pp=2, 6 under pp=2 x dp=2 x ep=2; FP32 parameters: 1, 3 and 4), so the later losses fall under
the helper's `diverged_loss` rule (measured <= 3.9e-5 over the 3 steps) and the first flip may move up
to 32 picks (the FP32 rule allows 4): BF16 parameters put many scores within a rounding of a tie, and
how many flip together depends on last bits: pp=2 DualPipe moved 2 picks with the MoE input's
gradients summed in one order (ba2f242) and 12, at step 3, in the other (ee6be8a, the order before
both). 32 is 3% of the 1024 picks of a step (256 tokens x top-2 x 2 MoE layers incl. MTP); a fault
(experts read from the wrong slots, stale optimizer state) moves a large share of them. Resume is bitwise: the losses after a resume
equal the uninterrupted run's of the same layout exactly.

Against FP32 parameters (same recipe, train.dtype=bf16 in both): with FP32 parameters autocast already
rounds the GEMM operands to BF16; what changes is the BF16 embedding, norm gains and residual stream.
Measured over 8 steps: losses within 1.2e-4 relative of the FP32-parameter run (step 1: 1.65e-6); the
bound is 1e-3, 8x, as for trajectories that diverged (one_process.py). This shows the mode trains
like FP32 parameters; it does not separate faults at this size (measured: a master kept in BF16 moves
the step-8 loss by 6.4e-4; BF16 accumulation over the 4 micro-batches by under 1.6e-4), which is what
the exact unit test is for.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinpipe.parallel.local import run_local
from twinpipe.parallel.pipeline.weight_grad_store import accumulate
from twinpipe.trainer.metrics import read_metrics
from twinpipe.trainer.optim.optimizer import no_decay
from twinpipe.trainer.optim.zero import ZeroAdamW
from one_process import assert_matches_one_process
from trainer_recipe import make_cfg

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _micro_batches(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return [torch.randn(4, 5, generator=g) for _ in range(2)]


def _bf16_grads(master: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One micro-batch's gradients as the BF16 parameters produce them (the BF16 rounding of `master`)."""
    model = _model().bfloat16()
    with torch.no_grad():
        for p, m in zip(model.parameters(), master.parameters()):
            p.copy_(m)
    model(x.bfloat16()).float().pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("as_experts", [False, True])
def test_bf16_params_fp32_master_and_grads_exact(as_experts):
    """ZeroAdamW with param_dtype=bf16 (the second Linear as expert slots or in the bucket) vs
    torch.optim.AdamW on FP32 copies given the FP32 sum of the same BF16 micro-batch gradients."""
    ref = _model()
    exact = [p.detach().clone() for p in ref.parameters()]
    decay = [p for n, p in ref.named_parameters() if not no_decay(n, p)]
    exempt = [p for n, p in ref.named_parameters() if no_decay(n, p)]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": exempt, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS, foreach=False)
    model = _model()
    opt = ZeroAdamW(model.named_parameters(), betas=BETAS, eps=EPS, weight_decay=WD, no_decay=no_decay,
                    param_dtype=torch.bfloat16, expert_param=lambda n, p: as_experts and n.startswith("2."))
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    (bucket,) = opt.buckets
    dense_exact = [e.reshape(-1) for p, e in zip(params, exact) if p not in opt.expert_names]
    assert torch.equal(bucket.master, torch.cat(dense_exact))  # the master: the exact FP32 values
    for p, e in zip(params, exact):
        master = opt.expert_opt.state[p]["master"] if p in opt.expert_names else None
        if master is not None:
            assert master.dtype == torch.float32 and torch.equal(master, e)
        assert torch.equal(p, e.bfloat16())
    for step in range(3):
        grads = [torch.zeros_like(p) for p in ref.parameters()]
        for x in _micro_batches(step):
            for g, bg in zip(grads, _bf16_grads(ref, x)):
                g.add_(bg)                                       # FP32 sum of BF16 gradients
            model(x.bfloat16()).float().pow(2).sum().backward()
            assert all(p.grad is None for p in params)          # freed into main_grad by the hook
        for p, g in zip(params, grads):
            assert p.main_grad.dtype == torch.float32 and torch.equal(p.main_grad, g)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.clone()
        ref_norm = float(torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt())
        opt.reduce_gradients()
        assert opt.grad_norm() == ref_norm
        clip = 0.5
        for p in ref.parameters():
            p.grad.mul_(clip)
        torch_opt.step()
        torch_opt.zero_grad()
        versions = [p._version for p in params]
        opt.step(LR, clip)
        opt.zero_grad()
        # written in place, so caches keyed on the version counter (fp8/weight_cache.py) see the update
        assert all(p._version > v for p, v in zip(params, versions))
        for p, r in zip(params, ref.parameters()):
            assert p.dtype == torch.bfloat16 and torch.equal(p, r.detach().bfloat16()), step
            if p in opt.expert_names:
                assert torch.equal(opt.expert_opt.state[p]["master"], r.detach())
    flat_ref = torch.cat([r.detach().reshape(-1) for r, p in zip(ref.parameters(), params) if p not in opt.expert_names])
    assert torch.equal(bucket.master, flat_ref)
    # a gradient written outside autograd (a deferred Wgrad) goes to main_grad, rounded to BF16 first
    g = torch.randn(params[0].shape)
    accumulate(params[0], g)
    assert params[0].grad is None and torch.equal(params[0].main_grad, g.bfloat16().float())


def test_skipped_step_returns_expert_slots_to_bf16():
    """A step skipped after reduce_gradients (a non-finite norm: TrainStep calls zero_grad instead of
    step) leaves the expert slots as they were: BF16, the same bits, gradients cleared."""
    model = _model()
    opt = ZeroAdamW(model.named_parameters(), betas=BETAS, eps=EPS, weight_decay=WD, no_decay=no_decay,
                    param_dtype=torch.bfloat16, expert_param=lambda n, p: n.startswith("2."))
    before = [p.detach().clone() for p in model.parameters()]
    model(_micro_batches(0)[0].bfloat16()).float().pow(2).sum().backward()
    opt.reduce_gradients()
    assert {p.dtype for p in opt.expert_names} == {torch.float32}  # showing the master to the update
    opt.grad_norm()
    opt.zero_grad()
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.bfloat16 and torch.equal(p, b) and p.grad is None
        assert not p.main_grad.any()


def test_bad_param_dtype_values(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^optim.param_dtype='fp16': allowed values are fp32, bf16$"):
        make_cfg(data_dir, tmp_path, "optim.param_dtype=fp16")
    with pytest.raises(ValueError, match=r"^optim.param_dtype=bf16 with train.dtype=fp32: .*train.dtype=bf16"):
        make_cfg(data_dir, tmp_path, "optim.param_dtype=bf16")
    with pytest.raises(ValueError, match=r"^optim.param_dtype=bf16 with optim.zero=deepspeed"):
        make_cfg(data_dir, tmp_path, "optim.param_dtype=bf16", "train.dtype=bf16", "optim.zero=deepspeed")


BF16 = ["train.dtype=bf16", "optim.param_dtype=bf16", "checkpoint.every=2"]
LAYOUTS = {"dp2_ep2": ["parallel.dp=2", "parallel.ep=2", "eplb.every=2", "eplb.replicas=12"],
           "pp2_dualpipe": ["parallel.pp=2", "parallel.schedule=dualpipe"]}


def _train(data_dir, run_dir, steps: int, resume: str, *overrides: str, seen: dict | None = None):
    """A BF16-parameter run; returns its parameters' dtypes, its main_grads' dtypes, the expert slots'
    master dtypes, the optimizer state bytes and the final parameters (`seen["opt"]`: the optimizer)."""
    from twinpipe.trainer import loop

    seen = {} if seen is None else seen
    build = loop.build_optimizer

    def build_and_keep(*args, **kwargs):
        seen["opt"] = build(*args, **kwargs)
        return seen["opt"]

    loop.build_optimizer = build_and_keep
    try:
        summary = loop.train(make_cfg(data_dir, run_dir, *BF16, f"train.steps={steps}", f"resume={resume}",
                                      *overrides))
    finally:
        loop.build_optimizer = build
    opt, local = seen["opt"], [p for p in summary["model"].parameters() if not p.is_meta]
    masters = {str(st["master"].dtype) for st in opt.expert_opt.state.values()} if opt.expert_opt else set()
    return ({str(p.dtype) for p in local}, {str(p.main_grad.dtype) for p in local if p.requires_grad}, masters,
            summary["optimizer_state_bytes"], {n: p.detach().clone() for n, p in summary["model"].named_parameters()})


def _rank(rank, world, data_dir, run_dir, steps, resume, layout):
    return _train(data_dir, run_dir, steps, resume, *LAYOUTS[layout])[:4]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The one-process BF16-parameter run: 3 steps uninterrupted, and stopped at 2 then resumed."""
    whole, resumed = tmp_path_factory.mktemp("bf16_whole"), tmp_path_factory.mktemp("bf16_resumed")
    dtypes = [_train(data_dir, whole, 3, "never"), _train(data_dir, resumed, 2, "never"),
              _train(data_dir, resumed, 3, "auto")]
    return read_metrics(whole), read_metrics(resumed), dtypes, whole


def test_one_process_dtypes_bitwise_resume_and_inference_load(one_process):
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    whole, resumed, dtypes, run_dir = one_process
    for params, grads, masters, _, _ in dtypes:
        assert params == {"torch.bfloat16"} and grads == {"torch.float32"} and masters == set()
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in whole]
    # the checkpoint's model weights are the BF16 parameters; an FP32 inference model reads them exactly
    weights = dtypes[0][4]
    model, _ = load_model_for_inference(run_dir)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, weights[name].float()), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_process_and_resumes(layout, one_process, data_dir, tmp_path):
    ref = one_process[0]
    first = run_local(_rank, 2, data_dir, tmp_path, 2, "never", layout)
    resumed = run_local(_rank, 2, data_dir, tmp_path, 3, "auto", layout)
    for params, grads, masters, _ in first + resumed:
        assert params == {"torch.bfloat16"} and grads == {"torch.float32"}
        assert masters == ({"torch.float32"} if layout == "dp2_ep2" else set())
    got = read_metrics(tmp_path)
    assert_matches_one_process(ref, got, first_grad=3e-5, first_flip_picks=32)
    # bitwise resume under the layout: the same layout uninterrupted
    whole = tmp_path / "whole"
    run_local(_rank, 2, data_dir, whole, 3, "never", layout)
    assert [r["loss"] for r in read_metrics(whole)] == [r["loss"] for r in got]


def _overlap_rank(rank, world, data_dir, run_dir, *layout):
    return _train(data_dir, run_dir, 3, "never", *OVERLAP, *layout)[:4]


OVERLAP = ["train.global_batch=16", "checkpoint.every=0", "checkpoint.at_end=false"]


def test_dualpipe_with_expert_overlap_matches_one_process(data_dir, tmp_path):
    """pp=2 x dp=2 x ep=2 under DualPipe, whose paired chunks run the EP overlap (its backward writes
    the leaves' .grad itself; the pipeline runner folds them into main_grad after each chunk)."""
    ref = tmp_path / "one"
    _train(data_dir, ref, 3, "never", *OVERLAP)
    out = run_local(_overlap_rank, 4, data_dir, tmp_path / "pp_ep", "parallel.pp=2", "parallel.dp=2",
                    "parallel.ep=2", "parallel.schedule=dualpipe")
    for params, grads, masters, _ in out:
        assert params == {"torch.bfloat16"} and grads == {"torch.float32"} and masters == {"torch.float32"}
    assert_matches_one_process(read_metrics(ref), read_metrics(tmp_path / "pp_ep"), first_grad=5e-5,
                               first_flip_picks=32)


def test_loss_tracks_fp32_params(data_dir, tmp_path):
    from twinpipe.trainer.loop import train

    losses = {}
    for dtype in ("fp32", "bf16"):
        run = tmp_path / dtype
        train(make_cfg(data_dir, run, "train.dtype=bf16", f"optim.param_dtype={dtype}", "train.steps=8",
                       "checkpoint.every=0", "checkpoint.at_end=false"))
        losses[dtype] = [r["loss"] for r in read_metrics(run)]
    rel = [abs(a - b) / a for a, b in zip(losses["fp32"], losses["bf16"])]
    assert max(rel) < 1e-3, rel
    assert rel[0] > 0, "the BF16 parameters changed nothing: still FP32?"


def test_resume_under_another_layout_reads_the_expert_masters(data_dir, tmp_path, monkeypatch):
    """dp=2 x ep=2 saved at step 2, resumed in one process (experts back in the bucket): before step 3
    the experts' bucket master is the saved FP32 master (reshard reads the slots' "master" state), not
    the BF16 weights. Measured: 0.003% of its elements are BF16 numbers (read from the weights: all of them)."""
    from twinpipe.trainer.optim import zero

    run_local(_rank, 2, data_dir, tmp_path, 2, "never", "dp2_ep2")
    ep_run = read_metrics(tmp_path)
    masters = []
    step = zero.ZeroAdamW.step

    def step_and_keep(self, *args, **kwargs):
        masters.append(self.buckets[0].master.clone())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(zero.ZeroAdamW, "step", step_and_keep)
    seen: dict = {}
    _train(data_dir, tmp_path, 3, "auto", seen=seen)
    (bucket,) = seen["opt"].buckets
    experts = torch.cat([masters[0][s.start:s.start + s.param.numel()] for s in bucket.segments
                         if ".mlp.experts." in s.name])
    assert experts.numel() and (experts == experts.bfloat16().float()).float().mean() < 0.01
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3] and got[:2] == ep_run[:2]
