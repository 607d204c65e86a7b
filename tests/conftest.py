"""Shared test settings: offline hubs, offline wandb, CPU DeepSpeed, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_moe_aux_loss_scale():
    """The trainer sets the class attribute `MoE.aux_loss_scale` (1 / micro-batches); restore it so
    one test's trainer run cannot change the balance-loss gradient another test expects."""
    from twinpipe.model.moe import MoE

    saved = MoE.aux_loss_scale
    yield
    MoE.aux_loss_scale = saved
