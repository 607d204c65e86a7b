"""Start-up checks of what would otherwise fail at the first step (or later), from the recipe alone.

`config.validate` checks each key and the simple relations between keys; `check(cfg)` runs once at
the start of `loop.train`, before any process group or model exists, and checks what needs the model
config or the schedules' rules:

- micro-batches per pipeline rank (global batch / (micro_batch x dp), for every batch size the
  optim.ramp_start ramp will use) against what parallel.schedule needs: DualPipe an even number
  >= 2 x pp (its two directions take half each), DualPipeV >= 2 x pp, 1F1B >= 1
  (parallel/pipeline/dualpipe.py `_chunks_per_direction`, one_f_one_b.py),
- model layers against pipeline stages (DualPipeV makes 2 x pp stages, the others pp),
- train.seq_len against the model's context (max_position_embeddings) and its MTP depth,
- experts against parallel.ep: a MoE layer to spread, n_routed_experts and the slot count
  (eplb.replicas, or one per expert) divisible by ep, at least one slot per expert,
- fp8.backend=cublas on a machine where blockwise `torch._scaled_mm` does not run.

All problems found are raised together as one ValueError line, `<key>=<value> ...: <what is
allowed>; <next problem>`; twinpipe-train prints it from rank 0 and every rank exits 1.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig

# parallel.schedule -> (micro-batches per rank needed, as a multiple of parallel.pp; must be even)
SCHEDULE_NEEDS = {"dualpipe": (2, True), "dualpipev": (2, False), "1f1b": (0, False)}


def check(cfg: DictConfig) -> None:
    """Raise ValueError listing every problem `problems(cfg)` finds."""
    found = problems(cfg)
    if found:
        raise ValueError("; ".join(found))


def problems(cfg: DictConfig) -> list[str]:
    """One message per violated constraint (empty: the recipe can start)."""
    from twinpipe.trainer.build import model_config

    mcfg = model_config(cfg.model)
    found = [*pipeline_problems(cfg, mcfg.num_hidden_layers), *context_problems(cfg, mcfg),
             *expert_problems(cfg, mcfg)]
    if cfg.fp8.backend == "cublas":
        from twinpipe.fp8.cublas import cublas_unavailable_reason

        reason = cublas_unavailable_reason(int(os.environ.get("LOCAL_RANK", "0")))
        if reason is not None:
            found.append(f"fp8.backend=cublas: {reason}; allowed here: off, emulate, triton, auto")
    return found


def batch_sizes(cfg: DictConfig) -> list[tuple[int, int]]:
    """(first step, global batch) of every batch size the run uses, in order: the optim.ramp_start
    ramp as the loop computes it (`schedule.batch_size_at`), then train.global_batch."""
    from twinpipe.trainer.optim.schedule import batch_size_at

    t = cfg.train
    multiple = t.micro_batch * cfg.parallel.dp
    sizes: list[tuple[int, int]] = []
    tokens, step = 0.0, 1
    while step <= t.steps:
        batch = batch_size_at(cfg.optim, t.global_batch, tokens, multiple)
        if not sizes or sizes[-1][1] != batch:
            sizes.append((step, batch))
        if batch == t.global_batch and tokens >= cfg.optim.ramp_tokens:
            break  # the ramp is over (or there is none): global_batch from here on
        tokens += batch * t.seq_len
        step += 1
    return sizes


def pipeline_problems(cfg: DictConfig, num_layers: int) -> list[str]:
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return []
    found = []
    factor, even = SCHEDULE_NEEDS[p.schedule]
    need = max(factor * p.pp, 1)
    for step, batch in batch_sizes(cfg):
        chunks = batch // (t.micro_batch * p.dp)
        if chunks >= need and not (even and chunks % 2):
            continue
        where = (f"train.global_batch={batch}" if batch == t.global_batch else
                 f"at step {step} the batch ramp (optim.ramp_start={cfg.optim.ramp_start}) gives {batch}")
        rule = f"{'an even number ' if even else ''}>= {factor} x parallel.pp = {need}"
        found.append(f"parallel.schedule={p.schedule} with parallel.pp={p.pp} needs {rule} micro-batches per "
                     f"rank, but {where} / (train.micro_batch={t.micro_batch} x parallel.dp={p.dp}) = {chunks}: "
                     "raise the batch or lower train.micro_batch")
        break
    stages = 2 * p.pp if p.schedule == "dualpipev" else p.pp
    if num_layers < stages:
        found.append(f"model.num_hidden_layers={num_layers} < {stages} pipeline stages (parallel.schedule="
                     f"{p.schedule} with parallel.pp={p.pp}): every stage needs at least one block")
    return found


def context_problems(cfg: DictConfig, mcfg: Any) -> list[str]:
    seq, found = cfg.train.seq_len, []
    if seq > mcfg.max_position_embeddings:
        found.append(f"train.seq_len={seq} > model.max_position_embeddings={mcfg.max_position_embeddings} "
                     "(the model's context): lower train.seq_len or raise model.max_position_embeddings")
    depth = mcfg.num_nextn_predict_layers
    if depth and seq <= depth:
        found.append(f"train.seq_len={seq}: MTP depth model.num_nextn_predict_layers={depth} needs "
                     f"train.seq_len > {depth}")
    return found


def expert_problems(cfg: DictConfig, mcfg: Any) -> list[str]:
    ep, experts = cfg.parallel.ep, mcfg.n_routed_experts
    if ep == 1:
        return []
    if mcfg.first_k_dense_replace >= mcfg.num_hidden_layers:
        return [f"parallel.ep={ep}: the model has no MoE layer to spread (model.first_k_dense_replace="
                f"{mcfg.first_k_dense_replace} >= model.num_hidden_layers={mcfg.num_hidden_layers})"]
    found = []
    if experts % ep:
        found.append(f"model.n_routed_experts={experts} is not divisible by parallel.ep={ep}")
    slots = cfg.eplb.replicas or experts
    if slots < experts:
        found.append(f"eplb.replicas={slots} < model.n_routed_experts={experts}: every expert needs a slot")
    elif slots % ep:
        found.append(f"eplb.replicas={slots} is not a multiple of parallel.ep={ep} (each expert-parallel "
                     "rank holds the same number of slots)")
    return found
