"""GRPO: `twinpipe-train --config-name grpo data.paths=[prompts.jsonl] init_from=PATH grpo.reward=...`.

The pretraining loop (`loop.train`, the same `TrainStep`, checkpoints, resume, metrics) with what RL
changes: the batch source rolls out with the current policy (`trainer/grpo/rollout.py`), the loss is the
clipped-ratio objective (`trainer/grpo/loss.py`), the policy and the frozen reference (beta > 0; built
in the policy's parallel layout, re-read from `init_from` at every start, never checkpointed) start
from `init_from`, and each step's record gets the rollout's metrics, `logprob_diff_max` and the
step's `rollout_s` / `update_s`. With `grpo.routing_replay` the training forwards replay the
rollout's routes (`trainer/grpo/routing_replay.py`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from twinpipe.trainer.grpo.loss import GRPOLoss


class GRPORun:
    """What ties the batch source to the per-step metrics (both seams of `loop.train`)."""

    def __init__(self, cfg: DictConfig):
        g = cfg.grpo
        self.loss = GRPOLoss(g.clip_low, g.clip_high, g.beta, g.loss_agg, g.temperature, g.max_new_tokens,
                             cfg.loss.ce_chunk_mib)
        self.source: Any = None
        self.replay: Any = None

    def batch_source(self, cfg: DictConfig, tokenizer: Any, dp_rank: int, dp_size: int, model: Any = None,
                     grid: Any = None) -> Any:
        from twinpipe.trainer.build import build_model
        from twinpipe.trainer.grpo.rollout import RolloutSource
        from twinpipe.trainer.grpo.routing_replay import RouteReplay

        ref = None
        if cfg.grpo.beta > 0:
            device = next(p for p in model.parameters() if not p.is_meta).device
            ref = build_model(cfg, device, grid).eval().requires_grad_(False)
        if cfg.grpo.routing_replay:
            self.replay = RouteReplay(model)
        self.source = RolloutSource(cfg, tokenizer, grid, model, ref, self.replay)
        return self.source

    def evaluator(self, cfg: DictConfig, tokenizer: Any, model: Any, grid: Any, device: torch.device) -> Any:
        def step_metrics(step: int) -> dict[str, float]:
            diff = torch.tensor([self.loss.take_diff_max()], device=device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            metrics = dict(self.source.metrics)
            if not self.source.fresh:
                metrics["rollout_s"] = 0.0
            else:
                metrics["logprob_diff_max"] = float(diff)
            metrics["update_s"] = time.perf_counter() - self.source.handed_at
            if self.replay is not None:  # the share of replayed (token, layer)s whose live route differed
                counts = torch.tensor(self.replay.take_flips(), dtype=torch.float64, device=device)
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(counts)
                metrics["routing_replay_flips"] = float(counts[0] / counts[1].clamp(min=1))
            return metrics

        return step_metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train a validated GRPO recipe (resolved, `config.validate`d); returns `loop.train`'s summary."""
    from twinpipe.trainer.checkpoint.init_from import tokenizer_path
    from twinpipe.trainer.loop import train

    if cfg.init_from is not None and cfg.data.tokenizer == "default":
        cfg.data.tokenizer = str(tokenizer_path(cfg.init_from))
    grpo = GRPORun(cfg)
    try:
        return train(cfg, loss_fn=grpo.loss, batch_source=grpo.batch_source, evaluator=grpo.evaluator)
    finally:
        if grpo.replay is not None:
            grpo.replay.remove()
