"""The GRPO recipe's schema (`recipes/grpo.yaml`: the training recipe plus `init_from` and `grpo.*`) and
the checks types cannot say, each a ValueError naming the key, the value and what is allowed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig

from twinpipe.trainer.config import RecipeSchema, check_values


@dataclass
class GRPOSchema:
    # reward functions (trainer/grpo/rewards.py): a name or a list: exact_match | numeric_match | math_verify |
    # regex:<pattern> | module:function; reward_weights: one per function ([] = 1 each)
    reward: Any = "exact_match"
    reward_weights: List[float] = field(default_factory=list)
    group_size: int = 4  # samples per prompt; train.global_batch sequences = prompts x group_size
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    updates_per_rollout: int = 1  # mu: optimizer steps on each rollout (pi_old = the rollout's policy)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO: clip_high 0.28)
    clip_high: float = 0.2
    beta: float = 0.0  # weight of the k3 KL to the frozen reference (init_from); 0: no reference held
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    leave_one_out: bool = False  # baseline: mean of the group's other samples
    filter_zero_std: bool = False  # groups whose rewards are all equal leave the loss (DAPO)
    # DAPO's dynamic sampling: up to this many more draws of a batch of prompts while a group is zero-std;
    # group p of the batch is replaced by group p of the first later draw whose rewards differ; 0 = off
    resample_max: int = 0
    routing_replay: bool = False  # training routes each token to the rollout's experts
    speculative: bool = False  # rollouts drafted by the MTP layer, exact by rejection (model/speculative.py)
    # continuous batching: at most this many sequences decoded at once per replica, a finished one's row
    # taken by the next waiting sequence (same tokens as 0, the static batch: noise keyed per sequence)
    rollout_slots: int = 0


@dataclass
class GRPORecipeSchema(RecipeSchema):
    init_from: Optional[str] = None  # policy and reference start: a twinpipe checkpoint / run dir or HF folder
    grpo: GRPOSchema = field(default_factory=GRPOSchema)


CHOICES = {"grpo.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
           "grpo.scale_rewards": ("group", "batch", "none")}
POSITIVE = ("grpo.max_new_tokens", "grpo.temperature", "grpo.top_p", "grpo.updates_per_rollout")
NON_NEGATIVE = ("grpo.clip_low", "grpo.clip_high", "grpo.beta", "grpo.resample_max", "grpo.rollout_slots")


def validate_grpo(cfg: DictConfig) -> None:
    """The GRPO recipe's own keys (called by `config.validate` for a recipe with a `grpo` section)."""
    check_values(cfg, CHOICES, POSITIVE, NON_NEGATIVE)
    g, t, p = cfg.grpo, cfg.train, cfg.parallel
    if not cfg.data.paths:
        raise ValueError("data.paths=[]: the grpo recipe needs prompt records, e.g. 'data.paths=[prompts.jsonl]'")
    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise ValueError(f"init_from={cfg.init_from}: no such checkpoint or folder; allowed: null, a twinpipe "
                         "checkpoint / run dir, or an HF DeepSeek-V3 folder")
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size={g.group_size}: group-relative advantages need >= 2 samples per prompt")
    if t.global_batch % (g.group_size * p.dp):
        raise ValueError(f"train.global_batch={t.global_batch}: must be a multiple of grpo.group_size x "
                         f"parallel.dp = {g.group_size} x {p.dp} (each dp rank rolls out whole groups)")
    if g.max_new_tokens >= t.seq_len:
        raise ValueError(f"grpo.max_new_tokens={g.max_new_tokens}: must be < train.seq_len={t.seq_len} "
                         "(rows hold prompt + completion)")
    if g.top_p > 1:
        raise ValueError(f"grpo.top_p={g.top_p}: must be in (0, 1]")
    if g.speculative:
        if p.pp > 1 or p.ep > 1 or g.routing_replay:
            raise ValueError(f"grpo.speculative=true with parallel.pp={p.pp}, parallel.ep={p.ep}, "
                             f"grpo.routing_replay={g.routing_replay}: MTP-drafted rollouts run with pp=1, ep=1 "
                             "and no routing replay (dp allowed)")
        if cfg.model.get("num_nextn_predict_layers") == 0:  # None: the preset's (speculative_generate checks)
            raise ValueError("grpo.speculative=true with model.num_nextn_predict_layers=0: the MTP layer is "
                             "the drafter; use a model with >= 1")
    if g.rollout_slots and (g.routing_replay or g.speculative):
        raise ValueError(f"grpo.rollout_slots={g.rollout_slots} with grpo.routing_replay={g.routing_replay}, "
                         f"grpo.speculative={g.speculative}: continuous batching moves sequences between batch "
                         "rows, which the route recorder and the MTP drafter do not follow; use rollout_slots=0")
    if cfg.optim.ramp_start:
        raise ValueError(f"optim.ramp_start={cfg.optim.ramp_start}: GRPO rollouts have a fixed batch; use 0")
