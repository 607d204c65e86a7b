"""Evaluation during SFT, after step 1 and every `eval.every` steps: held-out loss and greedy exact match.

- `eval_loss`: the main head's mean CE over the assistant tokens of the eval rows (`eval.paths`, or the
  `data.heldout_percent` split of `data.paths`), at most `eval.batches` micro-batches per dp rank, summed
  over the dp group before dividing (one global mean, whatever dp is).
- `eval_exact_match`: for up to `eval.answers` eval records carrying `data.answer_field`, the prompt
  (the chat up to its last assistant turn, with the generation prompt) is continued greedily through
  the model's own inference path (`parallel.inference.generate_parallel`, latent KV cache: pipeline
  stages, EP lockstep, prompts split over dp) for at most `eval.max_new_tokens` tokens; a record
  matches when the decoded continuation, up to eos and stripped, equals the answer stripped.

The model runs in eval mode (`ExpertLoadTracker` ignores such forwards, so evaluation never moves the
router bias). Under parallel.pp > 1 only the exact match is computed (the packed loss rows are for
the plain forward; a warning says so once).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from twinpipe.data.build import answer_prompts, sft_dataset
from twinpipe.data.loader import eval_batches
from twinpipe.trainer.loss import cross_entropy_sum, valid_tokens

log = logging.getLogger(__name__)


def _summed(values: list[float], group: Any, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


class SFTEvaluator:
    """`evaluate(step) -> metrics` ({} between evaluations); built by the loop with the run's objects."""

    def __init__(self, cfg: DictConfig, tokenizer: Any, model: torch.nn.Module, grid: Any,
                 device: torch.device):
        self.cfg, self.tokenizer, self.model, self.grid, self.device = cfg, tokenizer, model, grid, device
        self.every = cfg.eval.every
        paths = list(cfg.eval.paths) or None
        self.rows = None
        self.answers: list[tuple[list[int], str]] = []
        if grid.pp > 1:
            log.warning("eval.every=%d: the held-out SFT loss runs with parallel.pp=1 only (packed rows); "
                        "greedy exact match only", self.every)
        else:
            self.rows = sft_dataset(cfg.data, tokenizer, "heldout", cfg.train.seq_len,
                                    cfg.sft.train_on_prompt, paths)
        if cfg.eval.answers:
            self.answers = answer_prompts(cfg.data, tokenizer, cfg.eval.answers, paths)

    def __call__(self, step: int) -> dict[str, float]:
        if not self.every or (step != 1 and step % self.every) or (self.rows is None and not self.answers):
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = {"eval_loss": self._loss()} if self.rows is not None else {}
                if self.answers:
                    metrics["eval_exact_match"] = self._exact_match()
        finally:
            self.model.train(was_training)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _loss(self) -> float:
        grid, mb = self.grid, self.cfg.train.micro_batch
        per_rank = min(self.cfg.eval.batches * mb, len(self.rows) // grid.dp)  # equal on every rank
        total = count = 0.0
        if per_rank:
            batches = eval_batches(self.rows, mb, grid.dp_rank, grid.dp, max_samples=per_rank * grid.dp)
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(batch["input_ids"], batch.get("position_ids"))  # [B, T, V]
                total += float(cross_entropy_sum(logits, batch["labels"]))
                count += float(valid_tokens(batch["labels"]))
        total, count = _summed([total, count], self.grid.dp_group, self.device)
        return total / max(count, 1.0)

    def _exact_match(self) -> float:
        """Greedy decoding of every answer prompt through `generate_parallel` (any layout: stages, EP
        lockstep, prompts split over dp; every rank gets every output), continuously batched with
        train.micro_batch sequences at once per replica (a row freed at eos takes the next prompt)."""
        from twinpipe.parallel.inference import generate_parallel

        outputs = generate_parallel(self.model, self.grid, [p for p, _ in self.answers],
                                    self.cfg.eval.max_new_tokens, eos_id=self.tokenizer.eos_id,
                                    schedule=self.cfg.parallel.schedule, slots=self.cfg.train.micro_batch)
        matches = 0
        for out, (_, answer) in zip(outputs, self.answers):
            out = out[:-1] if out and out[-1] == self.tokenizer.eos_id else out
            matches += self.tokenizer.decode(out).strip() == answer.strip()
        return matches / len(self.answers)
