"""Our ZeRO-1 AdamW: same arithmetic as torch.optim.AdamW, state split 1/dp, re-split by DCP."""

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from twinpipe.parallel.grid import build_grid
from twinpipe.parallel.local import run_local
from twinpipe.trainer.optim.optimizer import no_decay
from twinpipe.trainer.optim.zero import ZeroAdamW


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


X = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))


def test_one_rank_matches_torch_adamw_bitwise():
    ref_model, model = _model(), _model()
    decay = [p for n, p in ref_model.named_parameters() if not no_decay(n, p)]
    exempt = [p for n, p in ref_model.named_parameters() if no_decay(n, p)]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": exempt, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    opt = ZeroAdamW(model.named_parameters(), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, no_decay=no_decay)
    for _ in range(4):
        ref_model(X).pow(2).sum().backward()
        model(X).pow(2).sum().backward()
        ref.step()
        ref.zero_grad()
        opt.reduce_gradients()
        opt.step(1e-2)
        opt.zero_grad()
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_dense_grads_live_in_the_bucket():
    """The dense parameters' p.grad are views of the bucket's flat fp32 gradient, so the backward
    accumulates into it (no second copy of the gradients; same values, test above); a p.grad replaced
    by another tensor (the pipeline's sum over a shared parameter's copies does so) is copied in."""
    model = _model()
    opt = ZeroAdamW(model.named_parameters())
    bucket = opt.buckets[0]
    for _ in range(2):  # two micro-batches: the second adds in place
        model(X).pow(2).sum().backward()
    storage = bucket.grad.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in model.parameters())
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(bucket.grad, flat) and bucket.grad.abs().sum() > 0
    last = list(model.parameters())[-1]
    last.grad = torch.full_like(last, 3.0)
    opt.reduce_gradients()
    assert torch.equal(bucket.grad[-last.numel():], torch.full((last.numel(),), 3.0))
    assert last.grad.untyped_storage().data_ptr() == storage
    opt.zero_grad()
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in model.parameters())
    assert not bucket.grad.any()


def _train_and_save(rank, world, path):
    grid = build_grid(1, world, 1)
    model = _model()
    opt = ZeroAdamW(model.named_parameters(), dp_group=grid.dp_group, dp_mesh=grid.dp_mesh)
    model(X.chunk(world)[rank]).pow(2).sum().div(world).backward()
    opt.reduce_gradients()
    opt.step(1e-2)
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=path)
    return opt.state_bytes(), [p.detach().clone() for p in model.parameters()], opt.buckets[0].exp_avg.clone()


def _load(rank, world, path):
    grid = build_grid(1, world, 1)
    opt = ZeroAdamW(_model().named_parameters(), dp_group=grid.dp_group, dp_mesh=grid.dp_mesh)
    state = {"optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=path)
    opt.load_state_dict(state["optim"])
    return opt.step_count, opt.buckets[0].exp_avg.clone(), opt.buckets[0].master.clone()


def test_state_is_split_and_resplit_by_dcp(tmp_path):
    numel = sum(p.numel() for p in _model().parameters())  # 5*7+7 + 14 + 7*3+3 = 80
    saved = run_local(_train_and_save, 2, str(tmp_path))
    # each of 2 ranks holds 40 elements x (master, exp_avg, exp_avg_sq) x 4 bytes
    assert [s[0] for s in saved] == [numel // 2 * 3 * 4] * 2
    assert all(torch.equal(a, b) for a, b in zip(saved[0][1], saved[1][1]))  # params agree after all-gather
    loaded = run_local(_load, 3, str(tmp_path))  # resume on 3 ranks: shards of 27, 27, 26
    assert [len(r[1]) for r in loaded] == [27, 27, 26]
    assert [r[0] for r in loaded] == [1, 1, 1]
    assert torch.equal(torch.cat([r[1] for r in loaded]), torch.cat([s[2] for s in saved]))
    flat_params = torch.cat([p.reshape(-1) for p in saved[0][1]])
    assert torch.equal(torch.cat([r[2] for r in loaded]), flat_params)


def test_pipeline_norm_counts_each_copy_once_and_deepspeed_is_refused():
    """`counted` picks the parameters a rank adds to the global norm (DualPipe copies count on one
    rank); contiguous counted parameters are one range, so pp = 1 sums the flat gradient as before.
    DeepSpeed's ZeRO cannot be told which copies to skip: refused with pp > 1."""
    import pytest
    from omegaconf import OmegaConf

    from twinpipe.parallel.grid import Grid
    from twinpipe.trainer.optim.optimizer import build_optimizer

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    all_counted = ZeroAdamW(model.named_parameters())
    assert [b.norm_ranges for b in all_counted.buckets] == [[(0, 32)]]
    some = ZeroAdamW(model.named_parameters(), counted=lambda n, p: not n.startswith("1."))
    assert some.buckets[0].norm_ranges == [(0, 16), (26, 32)]
    some.reduce_gradients()
    assert some.grad_norm() == pytest.approx((22 * 4.0) ** 0.5, rel=1e-12)

    optim = OmegaConf.create({"zero": "deepspeed", "moment_dtype": "fp32", "betas": [0.9, 0.95],
                              "eps": 1e-8, "weight_decay": 0.1})
    grid = Grid(world_size=2, rank=0, pp=2, dp=1, ep=1, pp_rank=0, dp_rank=0, ep_rank=0)
    with pytest.raises(ValueError, match="optim.zero=deepspeed with parallel.pp=2"):
        build_optimizer(model, optim, grid)


def test_deepspeed_is_refused_with_expert_parallelism():
    """DeepSpeed's stage 1 would average different ranks' expert slots as one tensor."""
    import pytest
    from omegaconf import OmegaConf

    from twinpipe.parallel.grid import Grid
    from twinpipe.trainer.optim.optimizer import build_optimizer

    optim = OmegaConf.create({"zero": "deepspeed", "moment_dtype": "fp32", "betas": [0.9, 0.95],
                              "eps": 1e-8, "weight_decay": 0.1})
    grid = Grid(world_size=2, rank=0, pp=1, dp=2, ep=2, pp_rank=0, dp_rank=0, ep_rank=0)
    with pytest.raises(ValueError, match="optim.zero=deepspeed with parallel.ep=2"):
        build_optimizer(nn.Linear(3, 4), optim, grid)
