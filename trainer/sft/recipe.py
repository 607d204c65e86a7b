"""Supervised fine-tuning: `twinpipe-train --config-name sft data.paths=[chats.jsonl] init_from=PATH`.

The pretraining loop (`loop.train`, the same `TrainStep`, checkpoints, resume, metrics) with what SFT
changes: the batch source (chat records -> template -> assistant-only labels -> packed rows,
`twinpipe.data.build.sft_train_loader`), the loss (`SFTLoss`), where the weights and tokenizer start
(`init_from`, see `trainer/checkpoint/init_from.py`; `data.tokenizer=default` is the BPE with DeepSeek-V3's chat
tokens when training from scratch) and evaluation every `eval.every` steps (`trainer/sft/evaluate.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from twinpipe.trainer.loss import IGNORE_INDEX, PretrainLoss


class SFTLoss(PretrainLoss):
    """The pretraining loss (CE + λ·MTP, each normalised by the global count of its valid targets) on
    labels that are -100 outside assistant tokens. In packed rows an MTP target that lies in the next
    conversation is ignored too: head k at position i counts only when positions i .. i+k are one
    conversation (`position_ids[i + k] - position_ids[i] == k`), so packed and unpacked losses agree."""

    def mtp_labels(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        labels = batch["labels"][:, k:]  # [B, T-k]: head k at position i predicts labels[:, i + k]
        positions = batch.get("position_ids")
        if positions is None:  # no row restarts
            return labels
        same = positions[:, k:] - positions[:, :-k] == k  # [B, T-k]
        return labels.masked_fill(~same, IGNORE_INDEX)


def batch_source(cfg: DictConfig, tokenizer: Any, dp_rank: int, dp_size: int) -> Any:
    """The SFT rows of `data.paths` for this dp rank (a `PackedLoader`). The chat template becomes the
    tokenizer's own, so the checkpoints' tokenizer (and an HF export) renders chats as training did."""
    from twinpipe.data.build import sft_train_loader
    from twinpipe.data.chat import ChatTemplate

    tokenizer.chat_template = ChatTemplate.for_tokenizer(tokenizer).source
    return sft_train_loader(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.global_batch,
                            cfg.train.micro_batch, dp_rank, dp_size, cfg.train.seed, cfg.sft.train_on_prompt)


def evaluator(cfg: DictConfig, tokenizer: Any, model: torch.nn.Module, grid: Any, device: torch.device) -> Any:
    from twinpipe.trainer.sft.evaluate import SFTEvaluator

    return SFTEvaluator(cfg, tokenizer, model, grid, device)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train a validated SFT recipe (resolved, `config.validate`d); returns `loop.train`'s summary."""
    from twinpipe.trainer.build import model_config
    from twinpipe.trainer.checkpoint.init_from import tokenizer_path
    from twinpipe.trainer.loop import train

    if cfg.init_from is not None and cfg.data.tokenizer == "default":
        cfg.data.tokenizer = str(tokenizer_path(cfg.init_from))
    depths = model_config(cfg.model).num_nextn_predict_layers
    return train(cfg, loss_fn=SFTLoss(cfg.loss.mtp_lambda, depths), batch_source=batch_source,
                 evaluator=evaluator if cfg.eval.every else None)
