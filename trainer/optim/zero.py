"""ZeRO stage 1 AdamW of our own: optimizer state partitioned over the data-parallel ranks.

Driven from the loop the way DeepSpeed's pipeline engine drives its ZeRO optimizer, so it composes with
any step runner: the runner leaves gradients in `p.grad`; then

    opt.reduce_gradients()        # average gradients over the data-parallel group (all-reduce)
    norm = opt.grad_norm()        # global norm, the same on every rank (experts counted once)
    opt.step(lr, clip_coef)       # each rank updates its shard of the FP32 master weights with AdamW
                                  # on clip_coef x gradient, then the shards are all-gathered back
                                  # into the model's parameters
    opt.zero_grad()

Replicated parameters form one flat FP32 vector (a *bucket*), split into dp contiguous shards with
torch.chunk's rule (shard size ceil(N / dp), the last ones shorter), so a rank holds 3 x 4 x N / dp
bytes of state (master, exp_avg, exp_avg_sq) with fp32 moments, 8 x N / dp with `moment_dtype` bf16.
The bucket's flat fp32 gradient (4 x N bytes, all-reduced in place) is also the parameters' `p.grad`:
each fp32 parameter's gradient is a view of its segment, so the backward accumulates into the bucket
and the dense gradients exist once (after `reduce_gradients` they read the dp average).
Expert weights that expert parallelism already split over the ep group (`expert_param`) are not
partitioned again: they get a local `ExpertAdamW`, a torch optimizer whose per-parameter state EPLB
can move with the weights (twinpipe.parallel.experts.rebalance), with moments in the same
`moment_dtype`, and their gradients are reduced by the `reduce_experts` callback
(twinpipe.parallel.experts.grad_reduction.reduce_expert_grads). Both run one update, `adamw_`:
torch.optim.AdamW's arithmetic operation for operation (so one rank with fp32 moments reproduces it
exactly), computed in fp32 from the moments and storing them back in their dtype; an expert therefore
gets the same update from its bucket segment under ep = 1 as from its slot under ep > 1.

BF16 parameters (`param_dtype=torch.bfloat16`, the recipe's `optim.param_dtype=bf16`, DeepSeek-V3's
mixed precision): at construction the optimizer takes the FP32 master from the parameters' exact FP32
values, then stores each parameter as its BF16 rounding (`p.data`, so every module keeps its Parameter).
Gradients stay FP32 across micro-batches: each BF16 parameter's `main_grad` is an FP32 buffer (its
bucket segment; for an expert slot a buffer of its own), and a post-accumulate-grad hook adds the BF16
`p.grad` autograd produced into it and frees it, so a micro-batch's gradient is rounded to BF16 once
(as autocast's already is with FP32 parameters) and the sum over micro-batches is FP32. Code that
accumulates outside autograd (the zero-bubble deferred weight gradients, the pipeline's sum of stage
copies) writes `main_grad` itself when a parameter has one; what the EP overlap's backward leaves in
`p.grad` is folded in after each chunk (`weight_grad_store.fold_into_main_grads`), and at
`reduce_gradients`. The dense update runs on the bucket's FP32 master as before and `publish` rounds it into
the BF16 parameters; an expert slot's FP32 master is `ExpertAdamW` state "master" (same shape, so EPLB
moves it with the moments). From `reduce_gradients` to the end of `step` an expert parameter holds its
FP32 master as data and its FP32 `main_grad` as `p.grad` (`_experts_fp32`), so the expert-parallel
reduction, the norm and the update run exactly as with FP32 parameters; after the update (or at
`zero_grad` after a skipped step) it holds the BF16 rounding of the master again.

`expert_shard_group` (optim.shard_experts; the expert-data-parallel group: the dp / ep ranks holding
the same slots) partitions the expert slots' state too: each member keeps its contiguous 1/edp of
every slot (dim 1) of the moments and, with BF16 parameters, of the FP32 master (`ExpertAdamW`), so a
rank holds (2 x moment bytes + 4 with BF16 parameters) x expert elements / edp. The gradients are still
all-reduced whole (the global norm needs them; twinpipe.parallel.experts.grad_reduction), and a BF16
expert parameter is not swapped to FP32 (it has no whole master): the reduction and the norm read its
`main_grad`, and `ExpertAdamW.step` updates the chunk from the chunk of the gradient with `adamw_` and
all-gathers the updated chunks, rounded to the parameter's dtype, into the parameter, bit for bit the
unsharded update. In checkpoints a sharded state tensor is a DTensor `Shard(1)` of the parameter's
shape over the edp mesh, so the saved tensors are those of an unsharded run.

In checkpoints each shard is a DTensor `Shard(0)` of the bucket's full flat vector, so
torch.distributed.checkpoint re-splits it when a run resumes with a different dp size. With pipeline
parallelism each pipeline rank's bucket holds other parameters: `dense_key`
(`checkpoint_format.dense_bucket_key`) keeps the ranks' buckets apart in the checkpoint, and `segment_table()` says
where each parameter sits in them, so a resume under another pp, schedule or ep can rebuild its own
buckets parameter by parameter (`twinpipe.trainer.checkpoint.reshard`). `counted(name, param)` picks the
parameters this rank adds to the global norm (a pipeline copy held on two ranks counts on one); the
norm is then summed over `pp_group`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.parallel.pipeline.weight_grad_store import fold_into_main_grads
from twinpipe.trainer.checkpoint import format as fmt


@dataclass
class _Segment:
    """Parameter `param` occupies flat[start:start + numel] of its bucket."""

    name: str
    param: nn.Parameter
    start: int
    decay: bool


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           decay_mask: torch.Tensor, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
           step: int) -> None:
    """One AdamW update of the fp32 `param` in place: torch.optim.AdamW's single-tensor path, operation
    for operation, with the moments kept in their own dtype (fp32 or bf16; same shape as `param`): they
    are read into fp32, updated there with the fp32 `grad`, used for the step and stored back (rounded
    to bf16 with bf16 moments). `decay_mask` is 1 where weight decay applies and 0 where not, shaped
    like `param` or 0-dim: the decay factor `1 - lr * wd * mask` is then the same fp32 number for a
    bucket's elements and an expert slot's. `step` counts from 1."""
    beta1, beta2 = betas
    if weight_decay:
        param.mul_(1 - lr * weight_decay * decay_mask)
    m = exp_avg.float()                                                  # fp32 copy of bf16 moments
    v = exp_avg_sq.float()
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(m, denom, value=-lr / bias1)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """An expert parameter's FP32 gradient: its `main_grad` with BF16 parameters, else `p.grad`."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


class ExpertAdamW(torch.optim.Optimizer):
    """AdamW of the expert slots under expert parallelism: `adamw_` per parameter with moments in
    `moment_dtype`. A torch optimizer, so EPLB (twinpipe.parallel.experts.rebalance.move_slots) moves
    each parameter's `state` rows (exp_avg, exp_avg_sq: [S, ...] like the parameter) with the slots; `step` is a
    0-dim fp32 tensor per parameter, as torch.optim.AdamW keeps it. The state exists from the start,
    so a resume can load into it. A parameter without a gradient is skipped, as torch's does. With
    `master_weights` the state also holds "master", the FP32 copy of the parameter's values (taken here,
    before ZeroAdamW stores the parameter in BF16), which `step` updates while the parameter shows it
    (see the module docstring).

    `shard_group` (optim.shard_experts: the expert-data-parallel group, the ranks holding the same
    slots) partitions the state ZeRO-1 style: member k of n keeps, of every slot parameter [S, D, ...]
    whose D divides by n, the state of dim-1 rows [k D/n, (k+1) D/n) of each slot (`owned`): a
    contiguous 1/n of each slot, so EPLB moves a slot's chunk between the same members of two EP ranks
    (the moves are the same on every member). `step` updates the chunk with `adamw_` from the chunk
    of the full reduced gradient (elementwise, so bit for bit the unsharded update) and all-gathers
    the updated chunks into the parameter (`publish`). A parameter whose D does not divide keeps its
    state whole, as without the key."""

    def __init__(self, params: Iterable[Any], *, betas: tuple[float, float], eps: float,
                 moment_dtype: torch.dtype = torch.float32, master_weights: bool = False,
                 shard_group: Any = None):
        super().__init__(params, dict(lr=0.0, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self.shard_group = shard_group
        self.shard_size = dist.get_world_size(shard_group) if shard_group is not None else 1
        self.shard_rank = dist.get_rank(shard_group) if shard_group is not None else 0
        for group in self.param_groups:
            for p in group["params"]:
                mine = self.owned(p, p.detach())
                self.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(mine, dtype=moment_dtype),
                                 "exp_avg_sq": torch.zeros_like(mine, dtype=moment_dtype)}
                if master_weights:
                    self.state[p]["master"] = mine.to(torch.float32, copy=True).contiguous()

    def shard_range(self, param: torch.Tensor) -> Optional[tuple[int, int]]:
        """The dim-1 rows [lo, hi) of `param`'s slots whose state this rank keeps; None: all of it."""
        n = self.shard_size
        if n == 1 or param.dim() < 2 or param.shape[1] % n:
            return None
        chunk = param.shape[1] // n
        return self.shard_rank * chunk, (self.shard_rank + 1) * chunk

    def owned(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of `full` (a tensor shaped like `param`, e.g. its gradient): a view."""
        cut = self.shard_range(param)
        return full if cut is None else full[:, cut[0]:cut[1]]

    @torch.no_grad()
    def publish(self, param: torch.Tensor, chunk: torch.Tensor) -> None:
        """All-gather the members' updated `chunk`s (this rank's, FP32) into `param` (rounded to its
        dtype first: the same bits as rounding the gathered FP32 values)."""
        parts = [torch.empty_like(chunk, dtype=param.dtype) for _ in range(self.shard_size)]
        dist.all_gather(parts, chunk.to(param.dtype).contiguous(), group=self.shard_group)
        param.copy_(torch.cat(parts, dim=1))  # in place: the version moves (FP8 weight caches re-quantise)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> None:
        if closure is not None:
            raise ValueError("ExpertAdamW.step(closure=...): closures are not supported; compute the loss "
                             "and gradients first, then call step()")
        for group in self.param_groups:
            for p in group["params"]:
                grad = _grad(p)
                if grad is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                # decayed and exempt parameters are in separate groups (the exempt with weight_decay 0)
                mask = torch.ones((), dtype=torch.float32, device=p.device)
                sharded = self.shard_range(p) is not None
                if sharded:  # this rank's chunk: its FP32 master, or the FP32 parameter's values
                    param = st["master"] if "master" in st else self.owned(p, p.detach()).contiguous()
                    grad = self.owned(p, grad).contiguous()
                elif "master" in st and p.dtype != torch.float32:  # BF16, not showing its master
                    param = st["master"]
                else:
                    param = p
                adamw_(param, grad, st["exp_avg"], st["exp_avg_sq"], mask, lr=group["lr"],
                       betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                       step=int(st["step"]))
                if sharded:
                    self.publish(p, param)
                elif param is not p:
                    p.copy_(param)


def _into_main_grad(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook of a BF16 parameter: its gradient into the FP32 `main_grad`, then freed
    (autograd also calls it with no gradient when a zero-bubble schedule deferred the weight gradient)."""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
        param.grad = None


def _to_low_precision(param: nn.Parameter, dtype: torch.dtype, main_grad: torch.Tensor) -> None:
    """Store `param` in `dtype` (its rounding) with `main_grad` as its FP32 gradient (see the module
    docstring). A gradient already there is kept in `main_grad`."""
    if param.grad is not None and param.grad is not main_grad:
        main_grad.add_(param.grad)
    param.grad = None
    param.data = param.data.to(dtype)
    param.main_grad = main_grad
    param.register_post_accumulate_grad_hook(_into_main_grad)


class _Bucket:
    def __init__(self, key: str, named: list[tuple[str, nn.Parameter]], no_decay: Callable[[str, nn.Parameter], bool],
                 group: Any, mesh: Any, moment_dtype: torch.dtype, param_dtype: torch.dtype = torch.float32):
        self.key, self.group, self.mesh = key, group, mesh
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.segments, start = [], 0
        for name, p in named:
            self.segments.append(_Segment(name, p, start, not no_decay(name, p)))
            start += p.numel()
        self.numel = start
        self.norm_ranges: list[tuple[int, int]] = []  # flat ranges counted in the global norm
        self.chunk = math.ceil(self.numel / self.size) if self.numel else 0
        self.lo = min(self.rank * self.chunk, self.numel)
        self.hi = min(self.lo + self.chunk, self.numel)
        device = named[0][1].device if named else torch.device("cpu")
        self.grad = torch.zeros(self.numel, dtype=torch.float32, device=device)  # [N]
        self.master = self._flat_params()[self.lo:self.hi].clone()  # [shard] fp32 master weights
        # an fp32 parameter's gradient is its segment of self.grad (`gather_grads`): backward accumulates
        # into the bucket, so there is no second fp32 copy of the dense gradients (None: copied in).
        # With a BF16 param_dtype every parameter is stored in BF16 and its segment is its `main_grad`.
        self.main_grads = param_dtype != torch.float32
        self.grad_views = [self.grad[s.start:s.start + s.param.numel()].view_as(s.param)
                           if (self.main_grads or s.param.dtype == torch.float32) and s.param.device == device
                           else None for s in self.segments]
        if self.main_grads:
            for s, view in zip(self.segments, self.grad_views):
                _to_low_precision(s.param, param_dtype, view)
        else:
            self.gather_grads()  # attaches the views (a gradient already there carried over)
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
        """Every parameter's gradient into its segment of self.grad (None: zeros), and each fp32
        parameter's `p.grad` pointed at its segment (`grad_views`). Autograd then adds into the segment
        in place (AccumulateGrad outside grad mode: `p.grad += new`, as into a gradient of its own;
        0 + g == g), bit for bit the gradients a separate `p.grad` would hold. A gradient already in its
        segment stays; one elsewhere (a parameter without a view, or `p.grad` replaced, e.g. by the
        pipeline's sum over a shared parameter's copies) is copied in. With BF16 parameters the segments
        are their `main_grad`s, and a BF16 `p.grad` accumulated outside autograd is added in."""
        if self.main_grads:
            fold_into_main_grads([s.param for s in self.segments])
            return
        for s, view in zip(self.segments, self.grad_views):
            g = s.param.grad
            if view is not None and g is view:
                continue
            flat = self.grad[s.start:s.start + s.param.numel()]
            if g is None:
                flat.zero_()
            else:
                flat.copy_(g.reshape(-1))
            if view is not None:
                s.param.grad = view

    def zero_grads(self) -> None:
        """Gradients to zeros in the bucket (the views stay `p.grad`); parameters without a view, and
        BF16 parameters (their `main_grad` is the view): None."""
        self.grad.zero_()
        for s, view in zip(self.segments, self.grad_views):
            s.param.grad = None if self.main_grads else view

    def reduce(self) -> None:
        self.gather_grads()
        if self.size > 1:
            dist.all_reduce(self.grad, group=self.group)
            self.grad.div_(self.size)

    def adamw(self, lr: float, betas: tuple[float, float], eps: float, wd: float, step: int,
              clip_coef: float) -> None:
        """AdamW (`adamw_`) on this rank's shard."""
        g = self.grad[self.lo:self.hi]
        if clip_coef != 1.0:
            g = g * clip_coef
        adamw_(self.master, g, self.exp_avg, self.exp_avg_sq, self.decay_mask, lr=lr, betas=betas, eps=eps,
               weight_decay=wd, step=step)

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
        return dict(zip(fmt.BUCKET_TENSORS, map(self._wrap, (self.master, self.exp_avg, self.exp_avg_sq))))


class ZeroAdamW:
    """AdamW with ZeRO-1 partitioning; see the module docstring for the call order."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], *, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1,
                 no_decay: Callable[[str, nn.Parameter], bool] = lambda n, p: p.ndim < 2,
                 dp_group: Any = None, dp_mesh: Any = None,
                 expert_param: Callable[[str, nn.Parameter], bool] = lambda n, p: False,
                 reduce_experts: Optional[Callable[[], None]] = None,
                 expert_grad_sq: Optional[Callable[[], torch.Tensor]] = None, ep_group: Any = None,
                 ep_rank: int = 0, pp_group: Any = None, moment_dtype: torch.dtype = torch.float32,
                 counted: Callable[[str, nn.Parameter], bool] = lambda n, p: True, dense_key: str = fmt.dense_bucket_key(0, 1),
                 param_dtype: torch.dtype = torch.float32, expert_shard_group: Any = None,
                 expert_shard_mesh: Any = None):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        dense = [(n, p) for n, p in named if not expert_param(n, p)]
        experts = [(n, p) for n, p in named if expert_param(n, p)]
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.ep_group, self.pp_group, self.reduce_experts = ep_group, pp_group, reduce_experts
        self.expert_grad_sq = expert_grad_sq  # this rank's share of the experts' squared grad norm
        self.buckets = [_Bucket(dense_key, dense, no_decay, dp_group, dp_mesh, moment_dtype, param_dtype)]
        for b in self.buckets:
            for seg in b.segments:  # contiguous counted parameters merge into one range
                if counted(seg.name, seg.param):
                    lo, hi = seg.start, seg.start + seg.param.numel()
                    if b.norm_ranges and b.norm_ranges[-1][1] == lo:
                        lo = b.norm_ranges.pop()[0]
                    b.norm_ranges.append((lo, hi))
        self.expert_names = {p: n for n, p in experts}
        self.expert_counted = [p for n, p in experts if counted(n, p)]
        self.expert_key = fmt.expert_optim_key(ep_rank)
        self.expert_mesh = expert_shard_mesh  # DeviceMesh over expert_shard_group: state saved as DTensor Shard(1)
        self.expert_opt = None
        if experts:
            groups = [{"params": [p for n, p in experts if not no_decay(n, p)], "weight_decay": weight_decay},
                      {"params": [p for n, p in experts if no_decay(n, p)], "weight_decay": 0.0}]
            self.expert_opt = ExpertAdamW([g for g in groups if g["params"]], betas=self.betas, eps=eps,
                                          moment_dtype=moment_dtype, master_weights=param_dtype != torch.float32,
                                          shard_group=expert_shard_group)
            if param_dtype != torch.float32:
                for p in self.expert_names:
                    _to_low_precision(p, param_dtype, torch.zeros_like(p, dtype=torch.float32))
        self.low_precision: dict[nn.Parameter, torch.Tensor] = {}  # expert param -> its BF16 data while FP32
        self.step_count = 0

    def _experts_fp32(self) -> None:
        """BF16 expert parameters show their FP32 master and `main_grad` (the module docstring)."""
        if self.low_precision or self.expert_opt is None:
            return
        fold_into_main_grads(list(self.expert_names))
        if self.expert_opt.shard_group is not None:  # sharded: no full FP32 master; `main_grad` is read
            return
        for p in self.expert_names:
            if not hasattr(p, "main_grad"):
                return
            self.low_precision[p] = p.data
            p.data = self.expert_opt.state[p]["master"]
            p.grad = p.main_grad

    def _experts_low_precision(self) -> None:
        """Back to BF16 expert parameters, each the rounding of its (updated) master; gradients cleared."""
        for p, data in self.low_precision.items():
            master, p.data = p.data, data
            with torch.no_grad():  # in place on p: its version counter moves, so FP8 weight caches re-quantise
                p.copy_(master)
            p.grad = None
        self.low_precision = {}

    def zero_grad(self) -> None:
        self._experts_low_precision()  # after a skipped step
        for b in self.buckets:  # dense gradients: zeros in the bucket, which `p.grad` views
            b.zero_grads()
        for p in self.expert_names:
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad.zero_()

    def reduce_gradients(self) -> None:
        for b in self.buckets:
            b.reduce()
        self._experts_fp32()
        if self.expert_opt is not None and self.reduce_experts is not None:
            self.reduce_experts()

    def grad_norm(self) -> float:
        """L2 norm of the whole model's (reduced) gradient, identical on every rank."""
        return self.grad_norm_tensor().item()

    def grad_norm_tensor(self) -> torch.Tensor:
        """`grad_norm` as a 0-d float64 tensor on the gradients' device, read back by no one here (the
        step reads it with its other values in one transfer)."""
        grads = [b.grad for b in self.buckets] + [g for g in map(_grad, self.expert_names) if g is not None]
        device = grads[0].device if grads else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in self.buckets:
            for lo, hi in b.norm_ranges:
                total += b.grad[lo:hi].double().pow(2).sum()
        if self.expert_names:
            if self.expert_grad_sq is not None:
                sq = self.expert_grad_sq()
            else:
                sq = sum(_grad(p).double().pow(2).sum() for p in self.expert_counted if _grad(p) is not None)
            sq = torch.as_tensor(sq, dtype=torch.float64).to(device)
            if self.ep_group is not None:
                dist.all_reduce(sq, group=self.ep_group)  # each ep rank holds other experts
            total += sq
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.all_reduce(total, group=self.pp_group)  # each stage holds other layers
        return total.sqrt()

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        self.step_count += 1
        for b in self.buckets:
            b.adamw(lr, self.betas, self.eps, self.weight_decay, self.step_count, clip_coef)
            b.publish()
        if self.expert_opt is not None:
            for p in self.expert_names:
                grad = _grad(p)
                if grad is not None and clip_coef != 1.0:
                    grad.mul_(clip_coef)
            for group in self.expert_opt.param_groups:
                group["lr"] = lr
            self.expert_opt.step()
            self._experts_low_precision()

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank (FP32 master shard + both moments; local experts'
        moments), each tensor at its dtype's size (bf16 moments: 2 bytes)."""
        total = sum(b.state_bytes() for b in self.buckets)
        if self.expert_opt is not None:
            total += sum(t.numel() * t.element_size() for st in self.expert_opt.state.values()
                         for t in st.values() if torch.is_tensor(t) and t.dim())
        return total

    def segment_table(self) -> dict[str, list[list[Any]]]:
        """Where each parameter sits in this rank's buckets: bucket key -> [[name, offset, numel], ...]
        (saved in meta.json, so a resume under another layout finds every parameter's state)."""
        return {b.key: [[s.name, s.start, s.param.numel()] for s in b.segments] for b in self.buckets}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {fmt.OPTIM_STEP: self.step_count}
        for b in self.buckets:
            out[b.key] = b.state_dict()
        if self.expert_opt is not None:  # a key per ep rank: the ranks hold different experts
            out[self.expert_key] = {self.expert_names[p]: {k: self._wrap_expert(p, t) for k, t in st.items()}
                                    for p, st in self.expert_opt.state.items()}
        return out

    def _wrap_expert(self, param: nn.Parameter, state: torch.Tensor) -> torch.Tensor:
        """A sharded expert state tensor as a DTensor Shard(1) of the parameter's shape over the
        expert-data-parallel mesh (the checkpoint holds the whole tensor, as without sharding, so a
        resume under another dp, or without optim.shard_experts, reads it); anything else as it is."""
        if self.expert_mesh is None or not state.dim() or self.expert_opt.shard_range(param) is None:
            return state
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(state, self.expert_mesh, [Shard(1)], run_check=False,
                                  shape=param.shape, stride=param.new_empty(param.shape, device="meta").stride())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counterpart of state_dict after torch.distributed.checkpoint filled it in place."""
        self.step_count = int(state[fmt.OPTIM_STEP])
        for b in self.buckets:
            b.publish()  # master shards were loaded in place; make the parameters agree
        if self.expert_opt is not None:
            by_name = {n: p for p, n in self.expert_names.items()}
            for name, st in state[self.expert_key].items():
                p = by_name[name]
                st = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in st.items()}
                self.expert_opt.state[p].update(st)
                if "master" in st and self.expert_opt.shard_range(p) is not None:  # the gathered chunks
                    self.expert_opt.publish(p, st["master"])
                elif "master" in st:  # BF16 parameters: the rounding of the loaded master
                    p.detach().copy_(st["master"])
