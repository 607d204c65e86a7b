"""Selective recomputation (`train.recompute`): activations of chosen modules are dropped after the
forward and recomputed in the backward (DeepSeek-V3 report §3.2.3 recomputes RMSNorm and the MLA
up-projections; Megatron's `recompute_modules`).

Applied from outside the model, last in `parallelize` (after the FP8 swap and expert parallelism, so
it wraps the classes those chose): each chosen module's class is swapped, in place, for a subclass
whose method runs under `torch.utils.checkpoint` (non-reentrant). Parameters, buffers and state-dict
names stay the same, and a copy of the module (`Experts.select`) keeps the wrapping. The recomputed
forward is the same arithmetic on the same inputs, so losses and gradients are bit-identical to no
recomputation (tests/parallel/test_recompute.py).

Options (any combination; `none` alone for nothing):
    norms    every RMSNorm (their fp32 intermediates are not kept)
    mla_up   the MLA up-projections with the attention core they feed (`MLA.attend`: the query path
             q_a -> norm -> q_b and q's RoPE, the key/value up-projection kv_b, SDPA). SDPA must keep
             the q, k, v it reads, so the up-projections' outputs are dropped only when the attention
             core is recomputed with them; only x and the latents (c_kv, k_pe) stay, not q per head.
    attention  the whole attention sublayer (`Block.attention`: its RMSNorm and MLA with the core and
             o_proj): only the block input stays. No collective runs in it, so it holds under expert
             parallelism; the recomputation repeats the attention's forward (40% of a MoE block's
             forward FLOPs at V3's shape and 4K tokens, 22% for mla_up), which a step bound by the
             all-to-all hides (`twinpipe-plan` counts it: `recompute_s`).
    router   the feed-forward's RMSNorm with the router's scoring (`Block.route`, MoE blocks): only the
             residual h stays, not the normed x the router's weight gradient reads (the routed and shared
             experts keep their own, under FP8 in FP8) nor the router's intermediates (what is read
             outside stays: the picks, the scores the sequence balance loss reads).
    moe      the SwiGLU feed-forwards: routed experts (`grouped_swiglu`, local to a rank, so no
             all-to-all is repeated under expert parallelism), shared experts and dense MLPs
    full     whole blocks (main and MTP): only each block's input stays. Under expert parallelism a
             block's recomputation would repeat its all-to-alls inside the backward, so the recipe
             check refuses `full` with parallel.ep > 1.

No region is recomputed inside another: a module that runs inside a chosen region (`norms`' latent
RMSNorms inside `mla_up`, everything inside `full`'s block or `attention`'s sublayer) is left as is,
since the enclosing region's rerun recomputes it already (a nested checkpoint would rerun it twice).

A forward rerun for recomputation is not a new forward: `recomputing()` is True meanwhile, and
per-forward bookkeeping (the trainer's expert-load tracker) skips it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from twinpipe.model.attention import MLA
from twinpipe.model.block import Block
from twinpipe.model.mlp import MLP
from twinpipe.model.moe import MoE
from twinpipe.model.norm import RMSNorm

log = logging.getLogger(__name__)

OPTIONS = ("none", "norms", "mla_up", "attention", "router", "moe", "full")
_state = {"recomputing": 0}


def recomputing() -> bool:
    """True while a checkpointed forward is being rerun in the backward."""
    return _state["recomputing"] > 0


@contextlib.contextmanager
def _rerun() -> Iterator[None]:
    _state["recomputing"] += 1
    try:
        yield
    finally:
        _state["recomputing"] -= 1


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recomputation context) for torch.utils.checkpoint's `context_fn`."""
    return contextlib.nullcontext(), _rerun()


def _is_experts(module: nn.Module) -> bool:
    """The routed experts' class (model's Experts, its FP8 subclass, an EP rank's local experts)."""
    return callable(getattr(module, "grouped_swiglu", None)) and callable(getattr(module, "select", None))


# option -> [(which modules, which method of theirs is recomputed)]
TARGETS: dict[str, list[tuple[Callable[[nn.Module], bool], str]]] = {
    "norms": [(lambda m: isinstance(m, RMSNorm), "forward")],
    "mla_up": [(lambda m: isinstance(m, MLA), "attend")],
    "attention": [(lambda m: isinstance(m, Block), "attention")],
    "router": [(lambda m: isinstance(m, Block) and isinstance(m.mlp, MoE), "route")],
    "moe": [(_is_experts, "grouped_swiglu"), (lambda m: isinstance(m, MLP), "forward")],
    "full": [(lambda m: isinstance(m, Block), "forward")],
}
# method -> the submodules (dotted paths; "" all of them) that run inside it, recomputed with it
INSIDE: dict[str, tuple[str, ...]] = {
    "attend": ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_b_proj"),
    "attention": ("input_layernorm", "self_attn"),
    "route": ("post_attention_layernorm", "mlp.gate"),
    "forward": ("",),
}


def parse_options(value: str | Iterable[str], key: str = "train.recompute") -> list[str]:
    """`none`, one option or a list of them -> the options (without `none`); a ValueError names `key`."""
    options = [value] if isinstance(value, str) else [str(v) for v in value]
    bad = [o for o in options if o not in OPTIONS]
    if bad:
        raise ValueError(f"{key}={value}: unknown option {bad[0]!r}; allowed: {', '.join(OPTIONS)} or a list "
                         "of them, e.g. [norms,mla_up]")
    if "none" in options and len(options) > 1:
        raise ValueError(f"{key}={value}: 'none' cannot be combined with other options")
    return [o for o in OPTIONS if o in options and o != "none"]  # canonical order, no repeats


@functools.lru_cache(maxsize=None)
def _recomputed_class(cls: type, methods: tuple[str, ...]) -> type:
    """A subclass of `cls` whose `methods` run under checkpoint when gradients are being recorded."""

    def wrap(original: Callable) -> Callable:
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            if not torch.is_grad_enabled():  # evaluation / generation: nothing to keep anyway
                return original(self, *args, **kwargs)
            return checkpoint(original, self, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
        return method

    body = {name: wrap(getattr(cls, name)) for name in methods}
    body["recomputed_methods"] = methods
    return type(f"Recomputed{cls.__name__}", (cls,), body)


def _inside(module: nn.Module, methods: set[str]) -> set[nn.Module]:
    """The submodules that run inside `module`'s recomputed `methods` (`INSIDE`)."""
    out: set[nn.Module] = set()
    for path in (p for m in methods for p in INSIDE.get(m, ())):
        sub: nn.Module | None = module
        for part in path.split(".") if path else ():
            sub = getattr(sub, part, None)
        if isinstance(sub, nn.Module):
            out.update(m for m in sub.modules() if m is not module)
    return out


def apply_recompute(model: nn.Module, options: str | Iterable[str]) -> dict[str, int]:
    """Swap, in place, the classes of the modules `options` name for recomputing subclasses; returns
    how many modules each option wrapped (a module inside another chosen region is not: the module
    docstring). Applying it twice wraps nothing twice."""
    chosen = parse_options(options)
    wanted: dict[nn.Module, dict[str, str]] = {}  # module -> {method: option}
    for option in chosen:
        for module in model.modules():
            for match, name in TARGETS[option]:
                if match(module):
                    wanted.setdefault(module, {}).setdefault(name, option)
    inside = set().union(*(_inside(m, set(methods)) for m, methods in wanted.items()))
    counts = {o: 0 for o in chosen}
    for module in [m for m in wanted if m in inside]:
        del wanted[module]
    for module, by_method in wanted.items():
        if "forward" in by_method:  # the whole module is recomputed: its other methods run inside
            by_method = {"forward": by_method["forward"]}
        for option in set(by_method.values()):
            counts[option] += 1
        methods = set(by_method)
        base = type(module)
        done = set(getattr(base, "recomputed_methods", ()))
        if methods <= done:
            continue
        if done:  # already wrapped for other methods: rebuild from the unwrapped class
            base = base.__mro__[1]
        module.__class__ = _recomputed_class(base, tuple(sorted(methods | done)))
    if chosen:
        log.info("recompute: %s", ", ".join(f"{o} ({n} modules)" for o, n in counts.items()))
    return counts
