"""ZeRO stage 1 AdamW of our own: optimizer state partitioned over the data-parallel ranks.

Driven from the loop the way DeepSpeed's pipeline engine drives its ZeRO optimizer, so it composes with
any step runner: the runner leaves gradients in `p.grad`; then

    opt.reduce_gradients()        # average gradients over the data-parallel group (all-reduce)
    norm = opt.clip_grad_norm(c)  # global norm (over dp-, ep- and pp-split parameters), scale grads
    opt.step(lr)                  # each rank updates its shard of the FP32 master weights with AdamW,
                                  # then the shards are all-gathered back into the model's parameters
    opt.zero_grad()

Parameters live in *buckets*: one flat FP32 vector per bucket, split into `group size` contiguous
shards with torch.chunk's rule (shard size ceil(N / n), the last ones shorter), so the state a rank
holds is 3 x 4 x N / n bytes (master, exp_avg, exp_avg_sq). Replicated parameters form the bucket of
the dp group; expert weights that expert parallelism split over the ep group (`expert_param`) form a
bucket reduced over the ranks holding the same experts (`edp_group`). The arithmetic is
torch.optim.AdamW's, operation for operation, so one rank reproduces it exactly.

In checkpoints each shard is a DTensor `Shard(0)` of the bucket's full flat vector, so
torch.distributed.checkpoint re-splits it when a run resumes with a different dp size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Segment:
    """Parameter `param` occupies flat[start:start + numel] of its bucket."""

    name: str
    param: nn.Parameter
    start: int
    decay: bool


class _Bucket:
    def __init__(self, key: str, named: list[tuple[str, nn.Parameter]], no_decay: Callable[[str, nn.Parameter], bool],
                 group: Any, mesh: Any, moment_dtype: torch.dtype):
        self.key, self.group, self.mesh = key, group, mesh
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.segments, start = [], 0
        for name, p in named:
            self.segments.append(_Segment(name, p, start, not no_decay(name, p)))
            start += p.numel()
        self.numel = start
        self.chunk = math.ceil(self.numel / self.size) if self.numel else 0
        self.lo = min(self.rank * self.chunk, self.numel)
        self.hi = min(self.lo + self.chunk, self.numel)
        device = named[0][1].device if named else torch.device("cpu")
        self.grad = torch.zeros(self.numel, dtype=torch.float32, device=device)  # [N]
        self.master = self._flat_params()[self.lo:self.hi].clone()  # [shard] fp32 master weights
        self.exp_avg = torch.zeros_like(self.master, dtype=moment_dtype)
        self.exp_avg_sq = torch.zeros_like(self.master, dtype=moment_dtype)
        # weight-decay factor per shard element: 1 where decayed, 0 for exempt parameters
        self.decay_mask = torch.zeros_like(self.master)
        for s in self.segments:
            a, b = max(s.start, self.lo), min(s.start + s.param.numel(), self.hi)
            if s.decay and a < b:
                self.decay_mask[a - self.lo:b - self.lo] = 1.0

    def _flat_params(self) -> torch.Tensor:
        if not self.segments:
            return torch.zeros(0)
        return torch.cat([s.param.detach().reshape(-1).float() for s in self.segments])

    def gather_grads(self) -> None:
        for s in self.segments:
            g = s.param.grad
            view = self.grad[s.start:s.start + s.param.numel()]
            if g is None:
                view.zero_()
            else:
                view.copy_(g.reshape(-1))

    def reduce(self) -> None:
        self.gather_grads()
        if self.size > 1:
            dist.all_reduce(self.grad, group=self.group)
            self.grad.div_(self.size)

    def adamw(self, lr: float, betas: tuple[float, float], eps: float, wd: float, step: int,
              clip_coef: float) -> None:
        """torch.optim.AdamW (single-tensor path) on this rank's shard."""
        beta1, beta2 = betas
        g = self.grad[self.lo:self.hi]
        if clip_coef != 1.0:
            g = g * clip_coef
        p = self.master
        if wd:
            p.mul_(1 - lr * wd * self.decay_mask)
        m = self.exp_avg.float()
        v = self.exp_avg_sq.float()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** step
        bias2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias1)
        self.exp_avg.copy_(m)
        self.exp_avg_sq.copy_(v)

    def publish(self) -> None:
        """All-gather the updated shards into every rank's parameters."""
        if self.size > 1:
            padded = torch.zeros(self.chunk, dtype=torch.float32, device=self.master.device)
            padded[:self.hi - self.lo] = self.master
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            dist.all_gather(parts, padded, group=self.group)
            flat = torch.cat(parts)[:self.numel]
        else:
            flat = self.master
        with torch.no_grad():
            for s in self.segments:
                s.param.copy_(flat[s.start:s.start + s.param.numel()].view_as(s.param))

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq))

    def _wrap(self, local: torch.Tensor) -> torch.Tensor:
        if self.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([self.numel]), stride=(1,))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"master": self._wrap(self.master), "exp_avg": self._wrap(self.exp_avg),
                "exp_avg_sq": self._wrap(self.exp_avg_sq)}


class ZeroAdamW:
    """AdamW with ZeRO-1 partitioning; see the module docstring for the call order."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], *, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1,
                 no_decay: Callable[[str, nn.Parameter], bool] = lambda n, p: p.ndim < 2,
                 dp_group: Any = None, dp_mesh: Any = None,
                 expert_param: Callable[[str, nn.Parameter], bool] = lambda n, p: False,
                 edp_group: Any = None, edp_mesh: Any = None, ep_group: Any = None, ep_rank: int = 0,
                 pp_group: Any = None, moment_dtype: torch.dtype = torch.float32):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        dense = [(n, p) for n, p in named if not expert_param(n, p)]
        experts = [(n, p) for n, p in named if expert_param(n, p)]
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.ep_group, self.pp_group = ep_group, pp_group
        self.buckets = [_Bucket("dense", dense, no_decay, dp_group, dp_mesh, moment_dtype)]
        if experts:
            self.buckets.append(_Bucket(f"experts_ep{ep_rank}", experts, no_decay, edp_group, edp_mesh,
                                        moment_dtype))
        self.step_count = 0

    def zero_grad(self) -> None:
        for b in self.buckets:
            for s in b.segments:
                s.param.grad = None

    def reduce_gradients(self) -> None:
        for b in self.buckets:
            b.reduce()

    def grad_norm(self) -> float:
        """L2 norm of the whole model's (reduced) gradient, identical on every rank."""
        total = torch.zeros((), dtype=torch.float64)
        for b in self.buckets:
            sq = b.grad.double().pow(2).sum().cpu()
            if b.key != "dense" and self.ep_group is not None:
                dist.all_reduce(sq, group=self.ep_group)  # each ep rank holds other experts
            total += sq
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.all_reduce(total, group=self.pp_group)  # each stage holds other layers
        return float(total.sqrt())

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        self.step_count += 1
        for b in self.buckets:
            b.adamw(lr, self.betas, self.eps, self.weight_decay, self.step_count, clip_coef)
            b.publish()

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (FP32 master shard + both moments)."""
        return sum(b.state_bytes() for b in self.buckets)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step_count}
        for b in self.buckets:
            out[b.key] = b.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counterpart of state_dict after torch.distributed.checkpoint filled it in place."""
        self.step_count = int(state["step"])
        for b in self.buckets:
            b.publish()  # master shards were loaded in place; make the parameters agree
