"""Evaluation during training for any recipe: held-out loss and the MTP acceptance rate.

Every `eval.every` steps (and after step 1) the model, in eval mode, scores `eval.batches` x
`train.micro_batch` held-out windows of `train.seq_len + 1` tokens (the embedded corpus's held-out
split, as `twinpipe-eval` reads it) through the inference path (`parallel/inference.score_parallel`,
so under every layout: stages, expert lockstep, windows split over the data-parallel replicas):

- `eval_loss`: the main head's mean next-token cross-entropy;
- `eval_mtp_acceptance` (models with MTP): how often MTP depth 1's top-1 at position i (given the true
  token i+1) equals the main head's top-1 at position i+1 — the share of drafts speculative decoding
  would accept (`model/speculative.py`), i.e. the speed-up to expect from it.

`evaluator(cfg, tokenizer, model, grid, device)` is the factory `loop.train(evaluator=...)` takes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def loss_and_acceptance(model: torch.nn.Module, h: torch.Tensor, tokens: torch.Tensor,
                        valid: torch.Tensor) -> list[tuple[float, int, int, int]]:
    """On the last stage, for full (unpadded) windows: per row (CE sum, targets, MTP drafts agreeing
    with the main head's next top-1, drafts)."""
    logits = model.head(h).float()                                                  # [B, T, V]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").sum(1)  # [B]
    T = tokens.shape[1]
    agree = torch.zeros(len(tokens), dtype=torch.long, device=h.device)
    drafts = 0
    if len(model.mtp) and T > 2:
        positions = torch.arange(T - 1, device=h.device).expand(len(tokens), T - 1)
        h_mtp = model.mtp[0](h[:, :-1], model.embed(tokens[:, 1:]), positions)     # [B, T-1, H]
        draft = model.mtp_head(1, h_mtp).argmax(-1)                                 # [B, T-1]: token i+2
        agree = (draft[:, :-1] == logits[:, 1:-1].argmax(-1)).sum(1)                # vs main top-1 at i+1
        drafts = T - 2
    return [(float(c), T - 1, int(a), drafts) for c, a in zip(ce.tolist(), agree.tolist())]


class Evaluator:
    """`evaluate(step) -> metrics` ({} between evaluations)."""

    def __init__(self, cfg: Any, tokenizer: Any, model: torch.nn.Module, grid: Any, schedule: str = "1f1b"):
        from twinpipe.trainer.cli.evaluate import heldout_ids

        self.model, self.grid, self.schedule = model, grid, schedule
        self.every, seq = int(cfg.eval.every), int(cfg.train.seq_len)
        count = int(cfg.eval.batches) * int(cfg.train.micro_batch) * grid.dp
        ids = heldout_ids(tokenizer, count * seq + 1)
        self.windows = [ids[i:i + seq + 1] for i in range(0, len(ids) - seq, seq)][:count]
        if not self.windows:
            raise ValueError(f"eval.every={self.every}: the held-out split has fewer than train.seq_len + 1 = "
                             f"{seq + 1} tokens")

    def __call__(self, step: int) -> dict[str, float]:
        from twinpipe.parallel.inference import score_parallel

        if not self.every or (step != 1 and step % self.every):
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            rows = score_parallel(self.model, self.grid, self.windows, loss_and_acceptance, self.schedule)
        finally:
            self.model.train(was_training)
        ce, targets, agree, drafts = (sum(r[i] for r in rows) for i in range(4))
        metrics = {"eval_loss": ce / targets}
        if drafts:
            metrics["eval_mtp_acceptance"] = agree / drafts
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics


def evaluator(cfg: Any, tokenizer: Any, model: torch.nn.Module, grid: Any, device: torch.device) -> Evaluator:
    """The factory `loop.train(evaluator=...)` calls with the run's objects."""
    return Evaluator(cfg, tokenizer, model, grid, cfg.parallel.schedule)
