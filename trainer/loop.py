"""The pretraining loop: its cadence around one `TrainStep` per global batch, read top to bottom.

    build: grid -> model (this rank's part, parallelised) -> optimizer -> step runner -> TrainStep
           -> tokenizer -> batch source (which may be given the model) -> resume
    loop:  batch size and LR for this step -> micro-batches (batch source) -> TrainStep (step.py:
           forward + backward, gradient reduction, clip, AdamW, router bias, EPLB) -> metrics
           -> checkpoint (every N steps, at the end, on SIGTERM/SIGUSR1)

A resume under the saved layout (dp may differ) is one DCP load (`_load_same_layout`); under another
parallel.pp, parallel.schedule or parallel.ep `trainer/checkpoint/reshard.py` rebuilds each rank's state.

`train(cfg)` needs a resolved, validated recipe (`trainer/train.py` makes one from Hydra) and joins
the process group torchrun/srun/run_local describe, if any.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from twinpipe.parallel.grid import build_grid, collective_timeout_s, init_distributed
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.checkpoint import format as fmt
from twinpipe.trainer import preflight
from twinpipe.trainer.checkpoint import reshard
from twinpipe.trainer.checkpoint import tokenizer_match
from twinpipe.trainer.checkpoint.writer import CheckpointWriter
from twinpipe.trainer.build import build_loader, build_model, build_tokenizer, model_config
from twinpipe.trainer.ema import CPUEMA
from twinpipe.trainer.flops import flops_per_token, peak_flops
from twinpipe.trainer.loss import PretrainLoss
from twinpipe.trainer.metrics import MetricsWriter
from twinpipe.trainer.optim.optimizer import build_optimizer
from twinpipe.trainer.runner import select_runner
from twinpipe.trainer.step import TrainStep
from twinpipe.trainer.optim.schedule import batch_size_at, gamma_at, lr_at, mtp_lambda_at
from twinpipe.trainer.watchdog import Watchdog

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption): checkpoint after the current step, exit 0. The
    step agrees on it over the ranks (`TrainStep(stop=...)`), so a signal that comes after the step
    reduced its gradients stops the run after the next step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("signal %d: will checkpoint after this step and exit", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _load_same_layout(start: Path, model: torch.nn.Module, optimizer: Any, grid: Any) -> tuple[dict, dict]:
    """The fast path: the checkpoint's keys are this run's (dp may differ); one DCP load."""
    state = fmt.training_state(model, optimizer, grid.ep_rank, grid.ep)
    meta, rank_state = ckpt.load_checkpoint(start, state)
    loaded = {k: v for key, part in state.items() if key != fmt.OPTIM for k, v in part.items()}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    on_meta = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    if unexpected or not set(missing) <= on_meta:  # only other stages' modules may be missing
        raise ValueError(f"{start}: state names do not match this rank's model: unexpected "
                         f"{unexpected[:5]}, missing {missing[:5]}")
    optimizer.load_state_dict(state[fmt.OPTIM])
    return meta, rank_state


def make_batch_source(batch_source: Any, cfg: DictConfig, tokenizer: Any, grid: Any, model: Any) -> Any:
    """`batch_source(cfg, tokenizer, dp_rank, dp_size)`, with `model=` and `grid=` when it takes them (a
    rollout source needs the policy and the process grid)."""
    factory = batch_source or build_loader
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in (("model", model), ("grid", grid)) if k in params or takes_all}
    return factory(cfg, tokenizer, grid.dp_rank, grid.dp, **extra)


def train(cfg: DictConfig, loss_fn: Any = None, batch_source: Any = None, evaluator: Any = None) -> dict[str, Any]:
    """Run (or resume) the recipe; return a summary (step, tokens, last metrics, run_dir, this rank's
    optimizer-state bytes, parameter count and bytes, and the trained `model`: with pp > 1 this rank's
    part, the other stages' modules on meta).

    Seams for other recipes (SFT, GRPO): `loss_fn(output, batch) -> (loss, metrics)` (default: the
    pretraining loss, whose `mtp_lambda` the loop schedules when it has one; see loss.py for the
    global normalisation), and `batch_source`, a callable `(cfg, tokenizer, dp_rank, dp_size[, model])
    -> source` whose source has `next_step()` (this rank's micro-batches: dicts of tensors with any
    keys, at least `input_ids`), a settable `global_batch`, `state_dict()` and `load_state_dict()`
    (default: the packed corpus of data.source). The model is built first, so the source may use it.
    `evaluator(cfg, tokenizer, model, grid, device) -> evaluate`, where `evaluate(step) -> metrics` runs
    after each step (SFT's held-out loss and exact match; {} between evaluations), adds to that step's
    record (which is then logged whatever logging.every says); by default, with eval.every > 0, the
    held-out loss and MTP acceptance rate of `trainer/evaluator.py`."""
    preflight.check(cfg)  # what would otherwise fail at the first step: one line, before any rank waits
    if cfg.train.threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.train.threads)
    init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    # a rank that goes silent ends the job within parallel.timeout_s, named (trainer/watchdog.py)
    watchdog = Watchdog.for_process_group(collective_timeout_s(cfg.parallel.backend, cfg.parallel.timeout_s))
    grid = build_grid(cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.ep)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    run_dir = Path(cfg.run.dir)
    mcfg = model_config(cfg.model)

    model = build_model(cfg, device, grid)  # this rank's part: stages, FP8, expert slots
    optimizer = build_optimizer(model, cfg.optim, grid, cfg.train.grad_clip, cfg.parallel.schedule)
    loss_fn = loss_fn if loss_fn is not None else PretrainLoss(cfg.loss.mtp_lambda, mcfg.num_nextn_predict_layers,
                                                                   cfg.loss.ce_chunk_mib)
    rebalancer = None
    if cfg.eplb.every:
        from twinpipe.parallel.experts.rebalance import ExpertRebalancer

        rebalancer = ExpertRebalancer(model)
    train_step = TrainStep(model, optimizer, select_runner(cfg, model, grid, device), loss_fn, grid, device,
                           cfg.train.grad_clip, cfg.train.on_nonfinite, cfg.balance.center, rebalancer,
                           cfg.eplb.every)
    tokenizer = build_tokenizer(cfg, mcfg.vocab_size)
    loader = make_batch_source(batch_source, cfg, tokenizer, grid, model)
    if evaluator is None and cfg.eval.every:  # held-out loss and MTP acceptance (trainer/evaluator.py)
        from twinpipe.trainer.evaluator import evaluator
    evaluate = evaluator(cfg, tokenizer, model, grid, device) if evaluator is not None else None

    step, tokens = 0, 0.0
    layout = reshard.run_layout(cfg, grid, mcfg.n_routed_experts)
    segments = reshard.gather_segments(optimizer)  # where each parameter sits in the saved buckets
    start = ckpt.resolve_resume(cfg.resume, run_dir)
    # the tokenizer the checkpoint (resume) or the initial weights (init_from) were trained with
    tokenizer_sha = tokenizer_match.fingerprint(tokenizer)
    if start is not None or cfg.get("init_from"):
        key, value = ("resume", str(start)) if start is not None else ("init_from", cfg.init_from)
        tokenizer_match.check(key, value, tokenizer, cfg.data.tokenizer, cfg.data.accept_tokenizer)
    if start is not None:
        changes = reshard.layout_changes(start, ckpt.read_meta(start), layout)
        if changes:  # another pp / schedule / ep: rebuild the state parameter by parameter
            log.info("resuming %s under another layout (%s)", start, ", ".join(changes))
            meta, rank_state = reshard.load_resharded(start, model, optimizer, changes, cfg.model)
        else:
            meta, rank_state = _load_same_layout(start, model, optimizer, grid)
        loader.load_state_dict(rank_state[fmt.LOADER])
        ckpt.set_rng_state(rank_state[fmt.RNG])
        step, tokens = int(meta[fmt.STEP]), float(meta[fmt.TOKENS])
        train_step.steps_done = step
        log.info("resumed from %s at step %d (%.3g tokens)", start, step, tokens)
    elif grid.is_main:
        log.info("starting %s from scratch: %.2fM parameters", run_dir, mcfg.num_parameters() / 1e6)
    ema = CPUEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None  # trainer/ema.py
    if ema is not None and start is not None:
        ema.resume(start)
    if ema is not None:
        train_step.slot_followers = ema.slot_followers  # EPLB moves the slots' averages with their weights

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    writer = MetricsWriter(run_dir, cfg.train.steps, step, enabled=grid.is_main,
                           wandb_mode=cfg.logging.wandb, project=cfg.logging.project, run_name=str(run_dir),
                           config=OmegaConf.to_container(cfg, resolve=True), progress=cfg.logging.progress,
                           every_s=cfg.logging.every_s, start_tokens=tokens)
    fpt = flops_per_token(mcfg, cfg.train.seq_len)
    peak = peak_flops(cfg.logging.peak_tflops, fp8=cfg.fp8.backend != "off")
    stop = StopRequest()
    fault = os.environ.get(ckpt.FAULT_ENV, "")
    multiple = cfg.train.micro_batch * grid.dp
    last: dict[str, Any] = {}
    saved_at = step
    saver = CheckpointWriter(cfg.checkpoint.async_save)  # trainer/checkpoint/writer.py

    def save() -> None:
        rank_state = {fmt.LOADER: loader.state_dict(), fmt.RNG: ckpt.rng_state()}
        meta = {fmt.STEP: step, fmt.TOKENS: tokens, **layout, fmt.SEGMENTS: segments,
                tokenizer_match.KEY: tokenizer_sha}
        state = fmt.training_state(model, optimizer, grid.ep_rank, grid.ep)
        if ema is not None:
            state.update(fmt.ema_state(ema.state_dict(), model, grid.ep_rank, grid.ep))
        saver.save(run_dir, step, state, rank_state, meta, config_yaml, tokenizer if grid.is_main else None,
                   cfg.checkpoint.keep)

    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            batch = batch_size_at(cfg.optim, cfg.train.global_batch, tokens, multiple)
            loader.global_batch = batch
            micro_batches = loader.next_step()  # this rank's share of the global batch
            lr = lr_at(cfg.optim, step, tokens)
            if hasattr(loss_fn, "mtp_lambda"):
                loss_fn.mtp_lambda = mtp_lambda_at(cfg.loss, tokens)

            metrics = train_step(micro_batches, lr, gamma_at(cfg.balance, tokens), stop.requested)
            if ema is not None and not metrics["skipped"]:
                ema.update()  # copies the weights out; the average is folded in a background thread
            if metrics["skipped"]:
                log.warning("step %d: non-finite loss %s / grad norm %s, step skipped (weights unchanged)",
                            step + 1, metrics["loss"], metrics["grad_norm"])
            step += 1
            if watchdog is not None:
                watchdog.beat(step)
            tokens += batch * cfg.train.seq_len
            tokens_per_s = batch * cfg.train.seq_len / (time.perf_counter() - t0)
            last = {"step": step, **metrics, "lr": lr, "tokens_per_s": tokens_per_s, "tokens": tokens,
                    "global_batch": batch}
            if peak:
                last["mfu"] = tokens_per_s * fpt / (peak * grid.world_size)
            evaluated = evaluate(step) if evaluate is not None else {}
            last.update(evaluated)
            if step % cfg.logging.every == 0 or step == cfg.train.steps or evaluated:
                last.update(saver.report())  # the stall and write speed of the checkpoints since the last record
                writer.log(last)

            stopping = train_step.stop_agreed  # any rank signalled
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping:
                save()
                saved_at = step
            if fault == f"step:{step}":
                log.warning("%s=%s: killing this process now (crash test)", ckpt.FAULT_ENV, fault)
                os.kill(os.getpid(), 9)
            if stopping:
                log.warning("stopped by signal after step %d (checkpoint saved); exiting", step)
                break
        if cfg.checkpoint.at_end and saved_at != step:
            save()
    finally:
        saver.close()  # the write in flight finishes (checkpoint.async_save)
        if ema is not None:
            ema.close()
        if watchdog is not None:
            watchdog.close()
        stop.restore()
        train_step.close()
        writer.close()
    if grid.is_main and cfg.logging.plots and not stop.requested:
        from twinpipe.trainer.plots import make_plots

        make_plots(run_dir)
    writer.finish(step, tokens, stopped=stop.requested)  # summary.json and the closing line (rank 0)
    local = [p for p in model.parameters() if not p.is_meta]
    return {"step": step, "tokens": tokens, "last": last, "run_dir": str(run_dir),
            "optimizer_state_bytes": optimizer.state_bytes(), "num_params": sum(p.numel() for p in local),
            "param_bytes": sum(p.numel() * p.element_size() for p in local), "model": model}
