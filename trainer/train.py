"""`twinpipe-train` / `python -m twinpipe.trainer`: Hydra entry point of the training recipes.

    twinpipe-train model=tiny train.steps=20 run.dir=runs/try1
    torchrun --nproc-per-node 4 -m twinpipe.trainer parallel.dp=4
    twinpipe-train --multirun train.seed=0,1

Hydra composes `recipes/pretrain.yaml` (or `--config-name sft|...`) against the schema in
`trainer/config.py`, does not change the working directory, and the resolved recipe goes to `train`.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from twinpipe.trainer import config

config.set_offline_defaults()
config.register()


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def prepare(cfg: DictConfig) -> None:
    """Resolve the interpolations of a composed recipe and check it against the schema."""
    OmegaConf.resolve(cfg)
    config.validate(cfg)


def entry(cfg: DictConfig):
    """The training function of a recipe: `sft.run` / `grpo.run` for one with an `sft` / `grpo` section,
    else `loop.train`."""
    if "sft" in cfg:
        from twinpipe.trainer.sft.recipe import run as train_sft

        return train_sft
    if "grpo" in cfg:
        from twinpipe.trainer.grpo.recipe import run as train_grpo

        return train_grpo
    from twinpipe.trainer.loop import train

    return train


def run(cfg: DictConfig) -> dict:
    """Validate a composed recipe and train (also the entry for tests and other recipes)."""
    prepare(cfg)
    return entry(cfg)(cfg)


@hydra.main(config_path="pkg://twinpipe.recipes", config_name="pretrain", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        # a user's error (a recipe value, a missing or malformed data file, a corrupt checkpoint, a
        # full disk, a non-finite loss under train.on_nonfinite=stop): one line from rank 0, exit 1
        # on every rank (HYDRA_FULL_ERROR=1: the traceback instead)
        with config.user_errors("twinpipe-train", ValueError, OSError, FloatingPointError):
            prepare(cfg)
            from twinpipe.trainer.watchdog import elastic_restart_problem

            problem = elastic_restart_problem()  # torchrun --max-restarts that could not restart
            if problem:
                raise ValueError(problem)
            entry(cfg)(cfg)
    except SystemExit as stop:
        if isinstance(stop.code, str) and int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1) from None
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
