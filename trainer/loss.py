"""Losses and how the trainer normalises them (DeepSeek-V3 report §2.2 for the pretraining loss).

The seam: `loss_fn(output, batch) -> (loss, metrics)`. `output` has `logits [B, T, V]` and
`mtp_logits` (`mtp_logits[k-1]` is `[B, T-k, V]`, position i predicting `labels[:, i+k]`), computed on
first use from the heads' inputs `hidden [B, T, H]`, `mtp_hidden` and `head_weight [V, H]`, which
PretrainLoss reads instead, taking the cross-entropy in chunks (trainer/chunked_ce.py); `batch` is
one micro-batch with every key its batch source gave it (`input_ids`, `labels` with -100 on ignored
positions, `position_ids`, and whatever else: `loss_mask`, `advantages`, ...), under every runner.

Normalisation over the global batch. A mean per micro-batch, averaged again over micro-batches and
dp ranks, depends on how a batch with masked tokens is split. So a loss may declare what it averages
over: `normalizers(batch) -> {name: count}` for one micro-batch (e.g. `{"tokens": valid labels}`).
Before the step the trainer sums each count over the whole global batch (every micro-batch of every
dp rank) and hands the totals to every micro-batch as `batch["global_counts"][name]`; the loss then
returns its micro-batch's *share* of the global mean (sum of per-token losses / global count), and so
do its metrics. The trainer sums shares over micro-batches and dp ranks, so the result is the global
mean however the batch is split (torchtitan's `global_valid_tokens`). A loss without `normalizers` is
a plain per-micro-batch mean; the trainer divides it by the number of micro-batches (the old mean of
means). Per-sequence normalisation is the same mechanism with a count of sequences.

The sequence-wise balance loss is not added here: it reaches the gradient inside the model's graph
(docs/internals.md, MoE routing seam) and the trainer logs it from the MoE layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from twinpipe.trainer.chunked_ce import linear_cross_entropy_sum, rows_for_budget

IGNORE_INDEX = -100
GLOBAL_COUNTS = "global_counts"  # the batch key under which the trainer hands the global totals


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions whose label is not -100 (fp32 softmax). logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE over positions whose label is not -100 (fp32 softmax). logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions of `labels [B, T]` that carry a target (int64, 0-d)."""
    return (labels != IGNORE_INDEX).sum()


def global_count(batch: dict[str, Any], name: str) -> torch.Tensor:
    """The global total of normaliser `name` the trainer put in `batch` (at least 1, so an all-masked
    global batch gives a zero loss rather than 0/0)."""
    counts = batch.get(GLOBAL_COUNTS)
    if counts is None or name not in counts:
        raise KeyError(f"batch has no {GLOBAL_COUNTS}[{name!r}]: a loss with normalizers() runs under the "
                       "trainer's step, which sums the counts over the global batch first")
    return counts[name].clamp(min=1)


class PretrainLoss:
    """L = CE(main head) + (λ / D) Σ_k CE(MTP head k), each CE a mean over the *global* batch's valid
    targets of its head (head k has T-k positions per row); λ is set by the trainer from its schedule.

    Serves pretraining and SFT alike: SFT labels are -100 outside assistant tokens."""

    def __init__(self, mtp_lambda: float = 0.3, mtp_depths: int = 0, ce_chunk_mib: float = 256.0):
        self.mtp_lambda, self.mtp_depths = mtp_lambda, mtp_depths
        self.ce_chunk_mib = ce_chunk_mib  # the loss's working memory per head (trainer/chunked_ce.py); 0: whole logits

    def head_cross_entropy_sum(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`cross_entropy_sum(hidden @ weight^T, labels)`: hidden [B, T, H] (a head's input), weight [V, H],
        in chunks whose working memory is at most `ce_chunk_mib` MiB unless that is 0."""
        if not self.ce_chunk_mib:
            return cross_entropy_sum(F.linear(hidden, weight), labels)
        return linear_cross_entropy_sum(hidden, weight, labels, rows_for_budget(self.ce_chunk_mib, weight.shape[0]))

    def mtp_labels(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """The targets of MTP head k: `labels[:, k:]` [B, T-k] (head k at position i predicts
        labels[:, i + k]); SFT's loss also ignores those in the next packed conversation."""
        return batch["labels"][:, k:]

    def normalizers(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        counts = {"tokens": valid_tokens(batch["labels"])}
        for k in range(1, self.mtp_depths + 1):
            counts[f"mtp{k}_tokens"] = valid_tokens(self.mtp_labels(batch, k))
        return counts

    def __call__(self, output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]  # [B, T]
        if hasattr(output, "hidden"):  # the heads' inputs and weight (TransformerOutput): chunked CE
            heads = [output.hidden, *output.mtp_hidden]                       # [B, T-k, H]

            def ce_sum(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                return self.head_cross_entropy_sum(hidden, output.head_weight, targets)
        else:  # logits only
            heads = [output.logits, *(getattr(output, "mtp_logits", None) or [])]  # [B, T-k, V]
            ce_sum = cross_entropy_sum
        lm_loss = ce_sum(heads[0], labels) / global_count(batch, "tokens")
        mtp_heads = heads[1:]
        if len(mtp_heads) != self.mtp_depths:
            raise ValueError(f"PretrainLoss(mtp_depths={self.mtp_depths}) got {len(mtp_heads)} MTP heads: "
                             "build it with the model's num_nextn_predict_layers")
        if mtp_heads:
            mtp_losses = [ce_sum(head, self.mtp_labels(batch, k)) / global_count(batch, f"mtp{k}_tokens")
                          for k, head in enumerate(mtp_heads, start=1)]
            mtp_loss = torch.stack(mtp_losses).mean()  # (1/D) Σ_k
            loss = lm_loss + self.mtp_lambda * mtp_loss
        else:
            mtp_loss = torch.zeros((), device=lm_loss.device)
            loss = lm_loss
        return loss, {"lm_loss": lm_loss.detach(), "mtp_loss": mtp_loss.detach()}
