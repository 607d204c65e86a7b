"""The very small recipe the trainer tests run (imported by the test modules)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from twinpipe.trainer import config as recipe_config

recipe_config.register()

# 2 layers (1 dense + 1 MoE) + 1 MTP block, 8 experts top-2, vocab 512, 32-token sequences: a step
# takes a fraction of a second on one core.
TINY = [
    "model=tiny", "model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2",
    "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.num_attention_heads=2",
    "train.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "train.threads=1",
    "optim.warmup_steps=2", "optim.constant=2", "optim.decay=10", "optim.lr=3e-3", "optim.min_lr=3e-4",
    "logging.wandb=disabled", "logging.progress=false", "logging.plots=false",
]



def make_cfg(data_dir: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """The pretrain recipe with the TINY overrides, composed as `twinpipe-train` would."""
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose("pretrain", overrides=[*TINY, f"data.tokenizer={data_dir / 'tok'}",
                                             f"data.cache_dir={data_dir / 'cache'}",
                                             f"run.dir={run_dir}", *overrides])
    recipe_config.validate(cfg)
    return cfg


def killed_run(train: Callable, cfg: DictConfig, fault: str) -> int:
    """`train(cfg)` in a forked child that SIGKILLs itself at `fault` (`checkpoint.FAULT_ENV`, e.g.
    "step:3" or "save:4"); returns the child's exit code (-9 when the fault fired)."""
    from twinpipe.trainer.checkpoint import io as ckpt

    def child():
        os.environ[ckpt.FAULT_ENV] = fault
        train(cfg)
        os._exit(0)

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(timeout=300)
    return proc.exitcode
