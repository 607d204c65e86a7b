"""The checkpoint format: every file name and state key of `run.dir/checkpoints/step_N/`, in one place.

    step_N/                         (written as .tmp-step_N, renamed when whole)
      .metadata, __R_0.distcp       torch.distributed.checkpoint of the training state:
        "model"                       the model state dict under the full model's names (each pipeline
                                      rank saves what it holds; router biases and each EP layer's
                                      placement `...experts.phy2log` are buffers in it)
        "model_experts_ep{r}_of{ep}"  EP rank r's physical expert slots (`...experts.local.*`)
        "ema"                         with train.ema_decay > 0: the EMA of this rank's parameters (fp32)
        "ema_experts_ep{r}_of{ep}"    ... and of EP rank r's expert slots (as "model_experts_...")
        "optim"                       the optimizer: "step"; ZeRO-1 buckets "dense" (pp = 1) or
                                      "dense_pp{r}_of{pp}" (flat DTensors sharded over dp, with
                                      "exp_avg", "exp_avg_sq"); "experts_ep{r}" (per-slot AdamW
                                      state); DeepSpeed's "deepspeed_pp{r}_dp{d}_of{dp}"
      rank_{R}.pt                   per-rank state {"loader": data position, "rng": RNG states}
      meta.json                     {"step", "tokens", the layout ("pp", "dp", "ep", "schedule",
                                     "expert_slots", "zero"), "segments": bucket -> [[param, offset, numel]],
                                     "tokenizer_sha256": tokenizer_match.fingerprint of tokenizer.json}
      config.yaml                   the resolved recipe
      tokenizer.json                the run's tokenizer
      SHA256SUMS                    SHA-256 of every file above (`sha256sum -c` reads it)
      COMPLETE                      written last

Readers and writers (`checkpoint.py`, `reshard.py`, `zero.py`, `deepspeed_zero.py`, the loops, the
inference loader) take every name from here; a change of format is a change of this file.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# files
COMPLETE = "COMPLETE"
META = "meta.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
SUMS = "SHA256SUMS"
CHECKPOINTS = "checkpoints"  # under run.dir
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"


def step_dir(step: int) -> str:
    return f"step_{step}"


def rank_state_file(rank: int) -> str:
    return f"rank_{rank}.pt"


# top-level keys of the DCP state
MODEL = "model"
OPTIM = "optim"
EMA = "ema"  # the CPU EMA of the weights (train.ema_decay > 0; trainer/ema.py): parameter name -> fp32
EXPERT_WEIGHTS = re.compile(r"^model_experts_ep(\d+)_of(\d+)$")


def expert_weights_key(ep_rank: int, ep: int) -> str:
    """The key of EP rank `ep_rank`'s expert slots (out of `ep` ranks)."""
    return f"model_experts_ep{ep_rank}_of{ep}"


EMA_EXPERTS = re.compile(r"^ema_experts_ep(\d+)_of(\d+)$")


def ema_experts_key(ep_rank: int, ep: int) -> str:
    """The key of the EMA of EP rank `ep_rank`'s expert slots."""
    return f"ema_experts_ep{ep_rank}_of{ep}"


# keys inside "optim"
OPTIM_STEP = "step"
MOMENTS = ("exp_avg", "exp_avg_sq")
BUCKET_TENSORS = ("master", *MOMENTS)  # a ZeRO-1 bucket's flat fp32 master shard and moments


def dense_bucket_key(pp_rank: int, pp: int) -> str:
    """The ZeRO-1 bucket of a pipeline rank's dense parameters (each rank holds other parameters)."""
    return f"dense_pp{pp_rank}_of{pp}" if pp > 1 else "dense"


def expert_optim_key(ep_rank: int) -> str:
    return f"experts_ep{ep_rank}"


def deepspeed_key(pp_rank: int, dp_rank: int, dp: int) -> str:
    return f"deepspeed_pp{pp_rank}_dp{dp_rank}_of{dp}"


# rank_{R}.pt and meta.json
LOADER = "loader"
RNG = "rng"
STEP = "step"
TOKENS = "tokens"
SEGMENTS = "segments"
TOKENIZER_SHA = "tokenizer_sha256"  # the saved tokenizer's fingerprint (trainer/checkpoint/tokenizer_match.py)
LAYOUT = ("pp", "dp", "ep", "schedule", "expert_slots", "zero")


def model_state(model: nn.Module, ep_rank: int, ep: int) -> dict[str, dict[str, torch.Tensor]]:
    """The model's part of the DCP state, what this rank holds under the full model's names (pipeline
    ranks hold their stages; DualPipe's copies are identical and saved once). Under expert parallelism
    each ep rank's slots go under a key of their own (the ranks hold different experts under the same
    names; each layer's placement `phy2log`, the same on every EP rank, stays under "model"), so the
    inference loader rebuilds the logical experts from them."""
    state = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    return _split_experts(state, model, MODEL, expert_weights_key, ep_rank, ep)


def ema_state(average: dict[str, torch.Tensor], model: nn.Module, ep_rank: int, ep: int) -> dict[str, dict]:
    """The EMA's part of the DCP state (`average`: parameter name -> fp32, trainer/ema.py), split
    like `model_state`: expert slots under this EP rank's own key."""
    return _split_experts(average, model, EMA, ema_experts_key, ep_rank, ep)


def _split_experts(state: dict[str, torch.Tensor], model: nn.Module, top: str, experts_key: Any,
                   ep_rank: int, ep: int) -> dict[str, dict[str, torch.Tensor]]:
    if ep == 1:
        return {top: state}
    from twinpipe.parallel.experts.layer import is_expert_param

    expert = {n for n, p in model.named_parameters() if is_expert_param(p)}
    return {top: {k: v for k, v in state.items() if k not in expert},
            experts_key(ep_rank, ep): {k: v for k, v in state.items() if k in expert}}


def training_state(model: nn.Module, optimizer: Any, ep_rank: int, ep: int) -> dict[str, Any]:
    """The whole DCP state of a rank: the model's part and the optimizer's."""
    return {**model_state(model, ep_rank, ep), OPTIM: optimizer.state_dict()}
