"""Pretraining loss: next-token cross-entropy + λ · MTP loss (DeepSeek-V3 report §2.2).

A loss function has the trainer's seam signature `loss_fn(output, batch) -> (loss, metrics)`; SFT and
GRPO plug in their own. `output` is the model's `TransformerOutput` (`logits[B, T, V]`,
`mtp_logits[k-1]` = `[B, T-k, V]` predicting `labels[:, i+k]`), `batch` has `labels[B, T]` with -100 on
ignored positions. The sequence-wise balance loss is not added here: it reaches the gradient inside
the model's graph (docs/internals.md, MoE routing seam) and the trainer logs it from the MoE layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions whose label is not -100 (fp32 softmax). logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class PretrainLoss:
    """L = CE(main head) + (λ / D) Σ_k CE(MTP head k); λ is set by the trainer from its schedule."""

    def __init__(self, mtp_lambda: float = 0.3):
        self.mtp_lambda = mtp_lambda

    def __call__(self, output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]  # [B, T]
        lm_loss = cross_entropy(output.logits, labels)
        mtp_logits = list(getattr(output, "mtp_logits", None) or [])
        if mtp_logits:
            # head k at position i predicts labels[:, i + k]
            mtp_losses = [cross_entropy(lg, labels[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]
            mtp_loss = torch.stack(mtp_losses).mean()  # (1/D) Σ_k
            loss = lm_loss + self.mtp_lambda * mtp_loss
        else:
            mtp_loss = torch.zeros((), device=lm_loss.device)
            loss = lm_loss
        return loss, {"lm_loss": lm_loss.detach(), "mtp_loss": mtp_loss.detach()}
