"""`init_from`: start a run's weights from a twinpipe checkpoint or an HF DeepSeek-V3 folder.

`init_from` may be a `checkpoints/step_N` folder or a run dir (its newest complete checkpoint; any saved
layout: pipeline ranks, expert shards and EPLB slots are merged by `checkpoint.load_model_for_inference`),
or an HF folder (config.json + safetensors, BF16 or FP8 with `weight_scale_inv`, dequantised on load).
The weights go into the freshly built full model on the host, before `parallelize` places stages,
experts and FP8 layers, so every layout starts from the same values. The optimizer and LR schedule
start fresh; `resume` (a checkpoint of this run) takes precedence over `init_from`.

The recipe's architecture must be the checkpoint's: a field that shapes parameters or the forward
(`ARCHITECTURE_FREE` excepted) that differs is refused naming `model.<field>` and both values. The
tokenizer comes from the same folder (`tokenizer_path`).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Training-time settings that may differ from the checkpoint's without changing what it computes.
ARCHITECTURE_FREE = frozenset({"aux_loss_alpha", "initializer_range", "max_position_embeddings",
                               "bos_token_id", "eos_token_id", "extra"})


def check_architecture(recipe: Any, saved: Any, path: str) -> None:
    """Raise ValueError naming the first `model.<field>` where the recipe's ModelConfig differs."""
    for f in fields(recipe):
        if f.name in ARCHITECTURE_FREE:
            continue
        mine, theirs = getattr(recipe, f.name), getattr(saved, f.name)
        if mine != theirs:
            raise ValueError(f"init_from={path}: model.{f.name}={mine!r} in the recipe but {theirs!r} in "
                             f"the checkpoint; set model.{f.name}={theirs!r} (or model=... of its preset)")


def tokenizer_path(path: str) -> Path:
    """Where `init_from`'s tokenizer is: the HF folder itself, or the checkpoint's tokenizer.json."""
    from twinpipe.trainer.checkpoint import COMPLETE, resolve_resume

    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / COMPLETE).is_file():
        return folder
    ckpt = resolve_resume(str(folder), folder, "init_from")
    if ckpt is None:
        raise FileNotFoundError(f"init_from={path}: neither a twinpipe checkpoint nor an HF folder with "
                                "config.json")
    return ckpt / "tokenizer.json"


def load_initial_weights(model: torch.nn.Module, path: str) -> None:
    """Copy `init_from`'s weights (fp32) into `model`, a full `Transformer` not yet parallelized."""
    from twinpipe.trainer.checkpoint import load_model_for_inference

    saved, _ = load_model_for_inference(path, torch.float32, key="init_from")
    check_architecture(model.config, saved.config, path)
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from={path}: its weights do not fit the recipe's model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    log.info("weights from init_from=%s", path)
