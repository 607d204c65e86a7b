"""The GRPO objective (DeepSeekMath; DAPO's asymmetric clip; Dr. GRPO's aggregation) on the trainer's seam.

Per completion token t of sequence i (batch keys from `trainer/grpo/rollout.py`: `labels` [B, T] the next
token or -100, `loss_mask` [B, T] 1 on counted completion targets, `old_logprobs` / `ref_logprobs`
[B, T], `advantages` [B]):

    logp_t  = log softmax(logits_t / temperature)[label_t]      (the rollout's `chosen_logprobs`)
    r_t     = exp(logp_t - old_t)                                (old: the rollout's, i.e. pi_old)
    pg_t    = -min(r_t A_i, clip(r_t, 1 - clip_low, 1 + clip_high) A_i)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         (k3, only with beta > 0)
    l_t     = pg_t + beta kl_t

Aggregation (`grpo.loss_agg`), each over the *global* batch through `normalizers` (trainer/loss.py):
`token_mean` sum l_t / tokens; `seq_mean_token_mean` mean over sequences of their token mean;
`seq_mean_token_sum_norm` sum l_t / (sequences x max_new_tokens) (Dr. GRPO). Metrics are global
token means: `pg_loss`, `kl`, `clip_fraction` (tokens whose ratio left the clip range), `entropy`.
`logprob_diff_max` (max |logp - old| on a rollout's first update, when nothing has moved yet) is kept
on the loss object (`take_diff_max`): a maximum is not a share the step can sum.

logp and the entropy come from the head's input and weight in chunks of tokens (trainer/chunked_ce.py,
`loss.ce_chunk_mib`; (h / temperature) @ W^T is the scaled logits), so no [B, T, V] logits are held;
an output with logits only (a model without `hidden`) takes the plain form.
"""

from __future__ import annotations

from typing import Any

import torch

from twinpipe.model.generation import chosen_logprobs
from twinpipe.trainer.chunked_ce import rows_for_budget, token_logprobs_and_entropy
from twinpipe.trainer.loss import IGNORE_INDEX, global_count

LOSS_AGG = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


class GRPOLoss:
    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.0,
                 loss_agg: str = "token_mean", temperature: float = 1.0, max_new_tokens: int = 1,
                 ce_chunk_mib: float = 256.0):
        if loss_agg not in LOSS_AGG:
            raise ValueError(f"grpo.loss_agg={loss_agg!r}: allowed {', '.join(LOSS_AGG)}")
        self.clip_low, self.clip_high, self.beta = clip_low, clip_high, beta
        self.loss_agg, self.temperature, self.max_new_tokens = loss_agg, temperature, max_new_tokens
        self.ce_chunk_mib = ce_chunk_mib
        self.diff_max = 0.0

    def logprobs_and_entropy(self, output: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log softmax(logits / temperature)[label] [B, T] and the entropy of that softmax [B, T] (no
        gradient), fp32."""
        if hasattr(output, "hidden") and self.ce_chunk_mib:
            scale = 1.0 / self.temperature if self.temperature > 0 else 1.0
            rows = rows_for_budget(self.ce_chunk_mib, output.head_weight.shape[0])
            logp, entropy = token_logprobs_and_entropy(output.hidden * scale, output.head_weight, labels, rows)
            return logp, entropy.detach()
        logits = output.logits                                                      # [B, T, V]
        with torch.no_grad():
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)          # [B, T]
        return chosen_logprobs(logits, labels, self.temperature), entropy

    def normalizers(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["loss_mask"]                                                   # [B, T]
        return {"tokens": mask.sum(), "sequences": (mask.sum(1) > 0).sum()}

    def take_diff_max(self) -> float:
        """The largest |training logprob - rollout logprob| seen since the last call (then reset)."""
        value, self.diff_max = self.diff_max, 0.0
        return value

    def __call__(self, output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels, mask = batch["labels"], batch["loss_mask"].float()                  # [B, T]
        logp, entropy = self.logprobs_and_entropy(output, labels.clamp(min=0))      # [B, T]
        old = batch["old_logprobs"]
        if bool(batch["first_update"]) and (labels != IGNORE_INDEX).any():
            diff = ((logp.detach() - old).abs() * (labels != IGNORE_INDEX)).max()
            self.diff_max = max(self.diff_max, float(diff))
        adv = batch["advantages"][:, None]                                          # [B, 1]
        ratio = torch.exp(logp - old)                                               # [B, T]
        clipped = ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
        pg = -torch.minimum(ratio * adv, clipped * adv)                             # [B, T]
        per_token = pg
        kl = torch.zeros_like(pg)
        if self.beta > 0:
            delta = batch["ref_logprobs"] - logp
            kl = torch.exp(delta) - delta - 1.0                                     # k3 >= 0
            per_token = pg + self.beta * kl
        tokens = global_count(batch, "tokens")
        if self.loss_agg == "token_mean":
            loss = (per_token * mask).sum() / tokens
        elif self.loss_agg == "seq_mean_token_mean":
            per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)          # [B]
            loss = per_seq.sum() / global_count(batch, "sequences")
        else:
            loss = (per_token * mask).sum() / (global_count(batch, "sequences") * self.max_new_tokens)
        with torch.no_grad():
            outside = ((ratio < 1.0 - self.clip_low) | (ratio > 1.0 + self.clip_high)).float()
            metrics = {name: (value * mask).sum() / tokens for name, value in
                       (("pg_loss", pg), ("kl", kl), ("clip_fraction", outside), ("entropy", entropy))}
        return loss, metrics
