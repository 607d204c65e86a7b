"""`parallelize(model, grid, ...)`: every parallelism and precision transform of a run, in one place
and one order, applied from outside the model (the model holds no process-group code):

1. pipeline placement: with pp > 1 every module this rank's stages do not run goes to meta
   (`pipeline.stages.keep_local_stages`, as `pipeline.placement.StagePlacement` declares);
2. expert parallelism: each MoE layer this rank holds keeps only this ep rank's expert slots
   (`experts.layer.apply_expert_parallel`, EPLB replicas when `num_replicas` > experts), dispatching
   with all-to-all over the ep group;
3. the FP8 swap (`twinpipe.fp8.convert_model`): Linear layers and experts (the local slots included)
   become FP8 subclasses with the same parameters, their weight caches keeping each FP8 weight's
   transpose through the step unless `fp8_cache_transposed` is False (`fp8.weight_cache.cache_transposes`);
4. zero-bubble weight-gradient split under DualPipe / DualPipeV (`pipeline.zero_bubble`): the layers'
   weight gradients wait for the schedule's W chunks;
5. selective recomputation (`recompute`, `train.recompute`).

A model built on the meta device (`torch.device("meta")`, as the trainer builds it) is *materialised*
between 2 and 3: only this rank's modules and expert slots get memory on `device`, each parameter
initialised from (seed, its name in the full model[, its logical expert]) by
`twinpipe.model.init.init_by_name`, so any layout holds exactly the weights of the one-process run and
a rank's memory is proportional to what it owns. A model built on the host (`seed=None`) keeps its
weights: non-local modules go to meta and the rest moves to `device` before the expert slots are cut.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from twinpipe.parallel.grid import Grid

log = logging.getLogger(__name__)

TOP_LEVEL = ("embed_tokens", "layers", "norm", "lm_head", "mtp")


def parallelize(model: nn.Module, grid: Grid, device: torch.device, schedule: str = "1f1b",
                fp8_backend: str = "off", num_replicas: int | None = None, seed: int | None = None,
                std: float | None = None, recompute: Any = "none", materialize_meta: bool = True,
                fill: Callable[..., None] | None = None, layer_split: list[int] | None = None,
                fp8_cache_transposed: bool = True) -> nn.Module:
    """Apply the transforms above to `model`; returns it (the same object, changed in
    place, unless the FP8 swap had to replace it). `seed` (with `std`, default the config's
    initializer_range) initialises a model built on meta; without it the model must hold its weights.
    `fill(tensor, name, expert_rows, buffer)` gives a meta model's local tensors their values instead
    (`trainer/checkpoint/init_from.py`: read from a checkpoint, each rank only what it holds).
    `materialize_meta=False` leaves a meta model on meta (this rank's stages and expert slots cut, the
    placement tables on `device`): `twinpipe-plan` counts what a rank would hold without allocating it.
    `layer_split` (parallel.layer_split): blocks per pipeline stage, None for the even split."""
    on_meta = all(p.is_meta for p in model.parameters())
    if on_meta and seed is None and fill is None and materialize_meta:
        raise ValueError("parallelize: the model was built on meta; pass seed= to initialise this rank's part")
    local = local_modules(model, grid, schedule, layer_split)
    if grid.pp > 1:
        from twinpipe.parallel.pipeline.stages import keep_local_stages, record_layer_split

        dropped = keep_local_stages(model, schedule, grid.pp, grid.pp_rank, layer_split)
        record_layer_split(model, layer_split)
        log.info("pipeline rank %d: %d modules of other stages left on meta", grid.pp_rank, len(dropped))
    if not on_meta:
        model._apply(lambda t: t if t.is_meta else t.to(device))  # Module.to refuses meta tensors
    if grid.ep > 1:
        from twinpipe.parallel.experts.layer import apply_expert_parallel

        apply_expert_parallel(model, grid.ep_group, num_replicas=num_replicas, device=device,
                              holds=lambda name: is_under(name, local))
    if on_meta and materialize_meta:
        std = model.config.initializer_range if std is None else std
        materialize(model, local, device, fill or init_fill(seed, std))
    if fp8_backend != "off":
        from twinpipe.fp8 import convert_model

        model = convert_model(model, fp8_backend)
        if not fp8_cache_transposed:
            from twinpipe.fp8.weight_cache import cache_transposes

            cache_transposes(model, False)
        log.info("fp8: linear layers and experts converted (backend %s)", fp8_backend)
    if grid.pp > 1 and schedule in ("dualpipe", "dualpipev"):
        from twinpipe.parallel.pipeline.zero_bubble import split_weight_gradients

        split_weight_gradients(model)
    if recompute != "none":
        from twinpipe.parallel.recompute import apply_recompute

        apply_recompute(model, recompute)
    return model


def local_modules(model: nn.Module, grid: Grid, schedule: str, layer_split: list[int] | None = None) -> set[str]:
    """Names of the modules this rank holds (its stages' with pp > 1, every top-level one otherwise)."""
    if grid.pp == 1:
        return {name for name, _ in model.named_children()}
    from twinpipe.parallel.pipeline.stages import local_module_names

    return local_module_names(model, schedule, grid.pp, grid.pp_rank, layer_split)


def is_under(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def init_fill(seed: int, std: float) -> Callable[..., None]:
    """The `fill` of a run from scratch: `init_by_name` for parameters, zeros for the router bias."""
    from twinpipe.model.init import init_by_name

    def fill(tensor: torch.Tensor, name: str, rows: list[int] | None, buffer: bool) -> None:
        if not buffer:
            init_by_name(tensor, name, seed, std, expert_rows=rows)
        elif name.endswith(".e_score_correction_bias"):
            tensor.zero_()
        else:
            raise ValueError(f"materialize: no initial value known for buffer {name}")
    return fill


@torch.no_grad()
def materialize(model: nn.Module, local: set[str], device: torch.device, fill: Callable[..., None]) -> None:
    """Give the meta parameters and buffers of the modules under `local` memory on `device` and their
    values from `fill(tensor, name in the full model, expert_rows, buffer)` (`init_fill`: initial
    values); stacked expert weights with the logical expert of each row (a layer's slot -> expert
    table under expert parallelism). Parameter attributes (e.g. the expert-slot marker) carry over."""
    from twinpipe.model.init import is_stacked_experts

    slot_rows = _expert_slot_rows(model)
    for module_name, module in model.named_modules():
        if not is_under(module_name, local):
            continue
        rows = slot_rows.get(module_name)
        if rows is None and is_stacked_experts(module):
            rows = list(range(module.gate_proj.shape[0]))
        logical = module_name.replace(".experts.local", ".experts")  # the slots' names in the full model
        for pname, old in list(module._parameters.items()):
            if old is None or not old.is_meta:
                continue
            new = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                               requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)
            fill(new, f"{logical}.{pname}", rows, False)
            module._parameters[pname] = new
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                new = torch.empty(buf.shape, dtype=buf.dtype, device=device)
                fill(new, f"{logical}.{bname}", None, True)
                module._buffers[bname] = new


def _expert_slot_rows(model: nn.Module) -> dict[str, list[int]]:
    """`<layer>.experts.local` -> the logical expert of each of this rank's slots."""
    from twinpipe.parallel.experts.layer import ExpertParallelExperts

    return {f"{name}.local": m.local_logical_ids().tolist() for name, m in model.named_modules()
            if isinstance(m, ExpertParallelExperts)}
