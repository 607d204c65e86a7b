"""optim.shard_experts: the expert slots' AdamW state partitioned over the expert-data-parallel group.

Each member of an edp group (the dp / ep ranks holding the same slots) keeps the moments (and, with
optim.param_dtype=bf16, the FP32 master) of its contiguous 1/edp of every slot (dim 1), updates it
with `adamw_` from its chunk of the whole reduced gradient and all-gathers the chunks back into the
slots (`zero.ExpertAdamW`). AdamW is elementwise and the gradient reduction is unchanged, so a run with
the key is the run without it bit for bit: compared with torch.equal, never a tolerance.

- unit level (2 gloo ranks as the edp group): ZeroAdamW with and without the key from the same
  gradients, fp32 and BF16 parameters (bf16 moments): parameters and norms equal, each state tensor
  this rank's chunk of the unsharded one, a dim 1 that does not divide and a 1-D slot parameter kept
  whole;
- trainer level, dp=4 x ep=2 (edp 2), 3 steps with an EPLB re-plan after step 2 (which moves each
  member's chunks): losses and gradient norms as logged, each step's reduced gradients (dense bucket and
  every expert slot) and the final weights equal with and without the key; fp32 parameters without
  EPLB replicas (the edp all-reduce), and BF16 parameters with bf16 moments and 12 slots for 8 experts
  (the dp-group reduction of replicas);
- the expert state bytes per rank are half the unsharded run's (measured from the state tensors and
  from the run's `optimizer_state_bytes`);
- resume from step 2's checkpoint to step 3: the weights of the run that did not stop (bf16 case); the saved
  state is the whole tensors (DTensor Shard(1) over the edp mesh), so (fp32 case) a sharded checkpoint
  resumes without the key and an unsharded one with it (DCP re-splits them), and under another
  layout (12 EPLB slots: `reshard.load_resharded` reading the Shard(1) chunks by ranges, each member
  keeping its chunk) a sharded checkpoint resumed with the key is the unsharded one resumed without.
"""

from __future__ import annotations

import pytest
import torch

from twinpipe.parallel.local import run_local
from twinpipe.trainer.metrics import read_metrics
from trainer_recipe import make_cfg

def _unit_rank(rank, world, param_dtype):
    """ZeroAdamW with the expert slots' state sharded over the world (as over an edp group; the
    gradients given are the reduced ones) and without, from the same parameters and gradients: the
    parameters and gradient norms of 3 steps (clipped), and each sharded state tensor against this
    rank's chunk of the unsharded one; a parameter whose dim 1 does not divide, or 1-D, keeps its state
    whole (with BF16 parameters updated on its FP32 master, not shown as the parameter's data)."""
    import torch.distributed as dist
    from torch import nn

    from twinpipe.trainer.optim.optimizer import no_decay
    from twinpipe.trainer.optim.zero import ZeroAdamW

    runs, norms = [], []
    for group in (None, dist.group.WORLD):
        g = torch.Generator().manual_seed(0)
        named = [("experts.gate_proj", nn.Parameter(torch.randn(4, 6, 5, generator=g))),  # dim 1 divides: sharded
                 ("experts.odd", nn.Parameter(torch.randn(4, 5, 6, generator=g))),        # 5 rows: kept whole
                 ("experts.scale", nn.Parameter(torch.randn(4, generator=g))),            # 1-D, no decay: whole
                 ("norm.weight", nn.Parameter(torch.randn(7, generator=g)))]              # the dense bucket
        opt = ZeroAdamW(named, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, no_decay=no_decay,
                        expert_param=lambda n, p: n.startswith("experts."), param_dtype=param_dtype,
                        moment_dtype=torch.bfloat16, expert_shard_group=group)
        for step in range(3):
            gen = torch.Generator().manual_seed(100 + step)
            for _, p in named:
                grad = torch.randn(p.shape, generator=gen)
                if hasattr(p, "main_grad"):
                    p.main_grad.copy_(grad)
                else:
                    p.grad = grad
            opt.reduce_gradients()
            norms.append(opt.grad_norm())  # read from the FP32 gradients, with and without the key
            opt.step(1e-2, 0.7)
            opt.zero_grad()
        runs.append((opt, {n: p.detach().clone() for n, p in named}))
    (whole, w0), (sharded, w1) = runs
    assert norms[:3] == norms[3:]
    for name in w0:
        assert w0[name].dtype == param_dtype and torch.equal(w0[name], w1[name]), (rank, name)
    shapes = {}
    for (p0, st0), (p1, st1) in zip(whole.expert_opt.state.items(), sharded.expert_opt.state.items()):
        assert st0.keys() == st1.keys() and float(st1["step"]) == 3
        for k in st0:
            if st0[k].dim():
                assert torch.equal(sharded.expert_opt.owned(p1, st0[k]), st1[k]), (rank, whole.expert_names[p0], k)
        shapes[sharded.expert_names[p1]] = tuple(st1["exp_avg"].shape)
    return shapes


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_expert_adamw_sharded_is_unsharded(param_dtype):
    for shapes in run_local(_unit_rank, 2, param_dtype):
        assert shapes == {"experts.gate_proj": (4, 3, 5), "experts.odd": (4, 5, 6), "experts.scale": (4,)}


LAYOUT = ["parallel.dp=4", "parallel.ep=2", "eplb.every=2", "checkpoint.every=2"]
FP32 = []
BF16 = ["train.dtype=bf16", "optim.param_dtype=bf16", "optim.moment_dtype=bf16", "eplb.replicas=12"]


def _fp32_grad(p: torch.Tensor) -> torch.Tensor:
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def _rank(rank, world, data_dir, run_dir, overrides, steps, resume):
    """One rank of a dp=4 x ep=2 run: (weights, per-step gradients, expert state bytes, summary bytes)."""
    from twinpipe.trainer import loop

    seen: dict = {"grads": []}
    build = loop.build_optimizer

    def build_and_keep(model, *args, **kwargs):
        opt = build(model, *args, **kwargs)
        seen["opt"], seen["model"] = opt, model
        step = opt.step

        def step_and_keep(lr, clip_coef=1.0):  # the reduced gradients the update reads
            grads = {n: _fp32_grad(p).clone() for p, n in opt.expert_names.items()}
            grads["dense bucket"] = opt.buckets[0].grad.clone()
            seen["grads"].append(grads)
            step(lr, clip_coef)

        opt.step = step_and_keep
        return opt

    loop.build_optimizer = build_and_keep
    summary = loop.train(make_cfg(data_dir, run_dir, *LAYOUT, *overrides, f"train.steps={steps}",
                                  f"resume={resume}"))
    opt, model = seen["opt"], seen["model"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expert_bytes = sum(t.numel() * t.element_size() for st in opt.expert_opt.state.values()
                       for t in st.values() if t.dim())
    return weights, seen["grads"], expert_bytes, summary["optimizer_state_bytes"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_expert_state_is_the_unsharded_run(data_dir, tmp_path, precision):
    overrides = FP32 if precision == "fp32" else BF16
    whole = run_local(_rank, 4, data_dir, tmp_path / "whole", overrides, 3, "never")
    sharded = run_local(_rank, 4, data_dir, tmp_path / "sharded", [*overrides, "optim.shard_experts=true"],
                        3, "never")
    ref, got = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "sharded")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[1]["eplb/slots_rewritten"] > 0  # the re-plan after step 2 moved slots (and their chunks)
    for a, b in zip(ref, got):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    for rank, ((w0, g0, e0, s0), (w1, g1, e1, s1)) in enumerate(zip(whole, sharded)):
        assert len(g0) == len(g1) == 3
        for step, (a, b) in enumerate(zip(g0, g1), 1):
            assert a.keys() == b.keys()
            for name in a:
                assert torch.equal(a[name], b[name]), (rank, step, name)
        for name in w0:
            assert w0[name].dtype == w1[name].dtype
            assert torch.equal(w0[name], w1[name]), (rank, name)
        assert e1 * 2 == e0, (rank, e0, e1)  # every tiny expert dim divides by edp = 2
        assert s0 - s1 == e0 - e1  # the dense bucket's ZeRO-1 shard is unchanged

    # resume from step 2's checkpoint to step 3 in a new run dir: the weights of the run that did not stop
    def resumed(source, name, *more):
        out = run_local(_rank, 4, data_dir, tmp_path / name, [*overrides, *more], 3,
                        str(tmp_path / source / "checkpoints" / "step_2"))
        assert [r["step"] for r in read_metrics(tmp_path / name)] == [3]
        return out

    def same_weights(a, b, what):
        for rank, ((w0, *_), (w1, *_)) in enumerate(zip(a, b)):
            for name in w0:
                assert torch.equal(w0[name], w1[name]), (rank, name, what)

    if precision == "bf16":  # the same layout and key (the fp32 case resumes across them)
        same_weights(sharded, resumed("sharded", "again", "optim.shard_experts=true"), "resumed")
        return
    # the checkpoint holds whole tensors (DTensor Shard(1)): it resumes without the key, and an
    # unsharded one with it (DCP re-splits them)
    same_weights(sharded, resumed("sharded", "unkeyed"), "sharded checkpoint resumed without the key")
    same_weights(sharded, resumed("whole", "keyed", "optim.shard_experts=true"), "unsharded checkpoint, key on")
    # another slot count (12 slots for 8 experts: `reshard.load_resharded`, which reads the saved Shard(1)
    # chunks by ranges and keeps this member's chunk): the run resumed without the key from the unsharded
    # checkpoint
    same_weights(resumed("whole", "slots_reference", "eplb.replicas=12"),
                 resumed("sharded", "slots_sharded", "eplb.replicas=12", "optim.shard_experts=true"),
                 "resumed with 12 slots")
