"""From a validated recipe to the objects a run needs: model config, model, tokenizer, data loader."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def model_config(model: DictConfig) -> Any:
    """`ModelConfig.preset(model.preset, **non-null fields, **model.extra)`; errors name `model.<key>`."""
    from twinpipe.model.config import ModelConfig

    fields = OmegaConf.to_container(model, resolve=True)
    preset = fields.pop("preset")
    extra = fields.pop("extra") or {}
    fields.pop("freeze_router", None)  # a training option (trainer/sft/recipe.py), not an architecture field
    overrides = {k: v for k, v in fields.items() if v is not None}
    overrides.update(extra)
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model.extra has keys {unknown} that are not ModelConfig fields; allowed: "
                         f"{', '.join(sorted(known))}")
    return ModelConfig.preset(preset, **overrides)


def build_tokenizer(cfg: DictConfig, vocab_size: int) -> Any:
    """The run's tokenizer: the cached BPE of the embedded corpus, or a file/folder (data.tokenizer)."""
    from pathlib import Path

    from twinpipe.data.tokenizer import default_tokenizer, load_tokenizer

    if cfg.data.tokenizer == "default":  # the SFT recipe's also reserves DeepSeek-V3's chat tokens
        return default_tokenizer(vocab_size, cfg.data.cache_dir, chat="sft" in cfg or "grpo" in cfg)
    path = Path(cfg.data.tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer}: no such file or folder; allowed: "
                                "'default' or a tokenizer.json / HF tokenizer folder")
    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer} has {tok.vocab_size} tokens but "
                         f"model.vocab_size={vocab_size}: the embedding must cover the tokenizer")
    return tok


def build_loader(cfg: DictConfig, tokenizer: Any, dp_rank: int, dp_size: int) -> Any:
    """The resumable data-parallel loader over the packed training split of the recipe's `data` section
    (`twinpipe.data.build.train_loader`: data.source, paths, packing, reset_position_ids, streaming...);
    a batch source: its `next_step()` gives this rank's micro-batches of one global batch."""
    from twinpipe.data.build import train_loader

    return train_loader(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch,
                        dp_rank, dp_size, cfg.train.seed)


def build_model(cfg: DictConfig, device: torch.device, grid: Any = None) -> Any:
    """This rank's part of the model on `device` (fp32 weights: master weights are fp32, bf16 runs under
    autocast), parallelised (`twinpipe.parallel.parallelize`: pipeline placement, expert parallelism
    with EPLB slots, FP8 swap, recomputation).

    From scratch the model is built on meta and `parallelize` materialises only this rank's stages and
    expert slots, each parameter drawn from (train.seed, its name[, its expert]) (`model/init.py`): any
    layout holds exactly the one-process weights and a rank's memory is what it owns. With `init_from`
    the same, each rank reading its tensors from the checkpoint (`init_from.local_fill`)."""
    from twinpipe.model.transformer import Transformer
    from twinpipe.parallel.grid import Grid
    from twinpipe.parallel.parallelize import parallelize

    mcfg = model_config(cfg.model)
    fill = None
    if cfg.get("init_from"):  # SFT / GRPO: start from a checkpoint or an HF folder (trainer/checkpoint/init_from.py)
        from twinpipe.trainer.checkpoint.init_from import local_fill

        fill = local_fill(cfg.init_from, mcfg)
    with torch.device("meta"):
        model = Transformer(mcfg)
    if cfg.model.get("freeze_router"):  # the gate weights (MTP's too) get no gradient, no optimizer state
        from twinpipe.model.gate import Gate

        for module in model.modules():
            if isinstance(module, Gate):
                module.weight.requires_grad_(False)
    grid = grid if grid is not None else Grid.single()
    return parallelize(model, grid, device, cfg.parallel.schedule, cfg.fp8.backend,
                       num_replicas=cfg.eplb.replicas or None, recompute=cfg.train.recompute, seed=cfg.train.seed,
                       std=cfg.train.init_std, fill=fill, layer_split=cfg.parallel.get("layer_split"),
                       fp8_cache_transposed=cfg.fp8.get("cache_transposed", True))
