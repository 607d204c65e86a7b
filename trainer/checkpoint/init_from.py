"""`init_from`: start a run's weights from a twinpipe checkpoint or an HF DeepSeek-V3 folder.

`init_from` may be a `checkpoints/step_N` folder or a run dir (its newest complete checkpoint, saved
under any layout), or an HF folder (config.json + safetensors, BF16 or FP8 with `weight_scale_inv`,
dequantised on read). Each rank reads only what it holds (`local_fill`, the `fill` of
`parallel.parallelize`: the model is built on meta and this rank's stages and expert slots are filled
tensor by tensor): from an HF folder through the memory-mapped safetensors, an expert slot from its
logical expert's own tensor (EPLB replicas read it again); from a twinpipe checkpoint with
ranged reads, one tensor, or one expert row of a stacked expert weight, at a time (`ranged.ModelTensors`:
an expert saved under expert parallelism from its first slot). Every layout starts
from the same values. The optimizer and LR schedule start fresh; `resume` (a checkpoint of this run)
takes precedence over `init_from`.

The recipe's architecture must be the checkpoint's: a field that shapes parameters or the forward
(`ARCHITECTURE_FREE` excepted) that differs is refused naming `model.<field>` and both values. The
tokenizer comes from the same folder (`tokenizer_path`).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

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
    from twinpipe.trainer.checkpoint.io import COMPLETE, resolve_resume

    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / COMPLETE).is_file():
        return folder
    ckpt = resolve_resume(str(folder), folder, "init_from")
    if ckpt is None:
        raise FileNotFoundError(f"init_from={path}: neither a twinpipe checkpoint nor an HF folder with "
                                "config.json")
    return ckpt / "tokenizer.json"


def local_fill(path: str, recipe: Any) -> Callable[..., None]:
    """The `fill(tensor, name, expert_rows, buffer)` that reads `init_from`'s value of each tensor a rank
    holds (`name`: its name in the full model; `expert_rows`: the logical expert of each row of a
    stacked expert weight). Refuses a checkpoint whose architecture is not the recipe's `ModelConfig`."""
    from twinpipe.trainer.checkpoint.io import COMPLETE

    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / COMPLETE).is_file():
        return _hf_fill(folder, recipe)
    return _checkpoint_fill(path, recipe)


def _hf_fill(folder: Path, recipe: Any) -> Callable[..., None]:
    from twinpipe.model.config import ModelConfig
    from twinpipe.model.hf import _read_config, ours_to_hf
    from twinpipe.model.safetensors_io import CheckpointReader

    hf_cfg = _read_config(folder)
    check_architecture(recipe, ModelConfig.from_hf_dict(hf_cfg), str(folder))
    reader = CheckpointReader(folder)  # shard files memory-mapped on first use, kept open for the run

    @torch.no_grad()
    def fill(tensor: torch.Tensor, name: str, rows: list[int] | None, buffer: bool) -> None:
        hf = ours_to_hf(name, recipe.num_hidden_layers, recipe.n_routed_experts)  # [(HF name, expert)]
        if rows is None:
            tensor.copy_(reader.get_weight(hf[0][0], tensor.dtype))
            return
        for i, expert in enumerate(rows):  # [S, ...]: slot i holds logical expert rows[i]
            tensor[i].copy_(reader.get_weight(hf[expert][0], tensor.dtype))
    log.info("init_from=%s: each rank reads its own tensors from the HF folder", folder)
    return fill


def _checkpoint_fill(path: str, recipe: Any) -> Callable[..., None]:
    from omegaconf import OmegaConf

    from twinpipe.trainer.build import model_config
    from twinpipe.trainer.checkpoint import format as fmt
    from twinpipe.trainer.checkpoint.io import resolve_resume
    from twinpipe.trainer.checkpoint.ranged import ModelTensors

    ckpt = resolve_resume(path, Path(path), "init_from")
    if ckpt is None:
        raise FileNotFoundError(f"init_from={path}: neither a twinpipe checkpoint nor an HF folder with config.json")
    check_architecture(recipe, model_config(OmegaConf.load(ckpt / fmt.CONFIG).model), path)
    tensors = ModelTensors(ckpt, recipe.n_routed_experts)

    @torch.no_grad()
    def fill(tensor: torch.Tensor, name: str, rows: list[int] | None, buffer: bool) -> None:
        if rows is None:
            tensor.copy_(tensors.read(name))
            return
        for i, expert in enumerate(rows):  # [S, ...]: slot i holds logical expert rows[i]
            tensor[i].copy_(tensors.read(name, expert))
    log.info("init_from=%s: each rank reads its own tensors from %s", path, ckpt)
    return fill
