"""lm-evaluation-harness on twinpipe models: the `twinpipe` model class and `twinpipe-eval harness=true`.

    twinpipe-eval checkpoint=runs/try1 harness=true 'tasks=[my_mc, my_gen]' include_path=my_tasks/ limit=100

    import lm_eval                                        # from Python, on a model in memory
    lm = TwinpipeLM(model=model, tokenizer=tokenizer)     # or TwinpipeLM(checkpoint="runs/try1")
    lm_eval.simple_evaluate(model=lm, tasks=["my_mc"], task_manager=lm_eval.tasks.TaskManager(include_path=...))

`loglikelihood`, `loglikelihood_rolling` and `generate_until` run on our inference path
(`parallel/inference`: `score_parallel` and `generate_parallel`), so they work on a model split over
ranks too: every rank runs the same lm-eval call (lm-eval sees one process: rank 0 of 1), the ranks
compute each batch of requests together and each gets every answer; rank 0 prints. Importing this
module registers the class as `twinpipe` in lm-eval's registry (`lm_eval.api.registry.get_model`).
lm-eval's own command line cannot reach it: in lm-eval 0.4.13 `get_model` (api/registry.py:491-511)
imports only `lm_eval.models`, whose `MODEL_MAPPING` (models/__init__.py:25-78) names the built-in
classes; nothing in the package reads entry points (no `entry_points(` call), and `--include_path`
feeds the TaskManager only (tasks/manager.py:56). So use `twinpipe-eval harness=true` instead.

Tokens: a request's context and continuation are encoded together and split where the context's own
encoding ends (as HF causal LMs in lm-eval do); an empty context starts from eos; sequences longer
than the model's context keep their last `max_position_embeddings` tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from omegaconf import DictConfig

from twinpipe.parallel.grid import Grid
from twinpipe.model.scoring import token_logprobs
from twinpipe.parallel.inference import generate_parallel, score_parallel

log = logging.getLogger(__name__)


@register_model("twinpipe")
class TwinpipeLM(LM):
    """An lm-eval `LM` over a twinpipe model (this rank's part under `grid` and `schedule`)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, checkpoint: str | None = None, grid: Any = None,
                 schedule: str = "1f1b", batch_size: int = 16, max_new_tokens: int = 256, **_: Any):
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("TwinpipeLM needs model= and tokenizer=, or checkpoint=")
            from twinpipe.trainer.checkpoint.io import load_model_for_inference

            model, tokenizer = load_model_for_inference(checkpoint)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.grid, self.schedule = grid or Grid.single(), schedule
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.max_length = model.config.max_position_embeddings

    def _score(self, sequences: list[list[int]]) -> list[tuple[list[float], list[bool]]]:
        out = []
        for b in range(0, len(sequences), self.batch_size):
            out += score_parallel(self.model, self.grid, sequences[b:b + self.batch_size], token_logprobs,
                                  self.schedule)
        return out

    def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens, number of continuation tokens), cut on the left to the model's context."""
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context)) if context else 0
        tokens = ([] if context else [self.tokenizer.eos_id]) + whole
        n_cont = max(1, len(whole) - n_context)
        return tokens[-self.max_length:], min(n_cont, self.max_length - 1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        results = []
        for (logps, greedy), (_, n) in zip(self._score([t for t, _ in pairs]), pairs):
            results.append((sum(logps[-n:]), all(greedy[-n:])))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for r in requests:
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(r.args[0])
            step = self.max_length - 1  # windows overlapping by one token: each token scored once
            windows = [ids[i:i + step + 1] for i in range(0, len(ids) - 1, step)]
            results.append(sum(sum(logps) for logps, _ in self._score(windows)))
        return results

    def generate_until(self, requests) -> list[str]:
        results, start = [], 0
        while start < len(requests):  # runs of consecutive requests with the same generation kwargs,
            end = start + 1           # continuously batched, batch_size sequences at once per replica
            while end < len(requests) and requests[end].args[1] == requests[start].args[1]:
                end += 1
            batch, start = requests[start:end], end
            kwargs = dict(batch[0].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", self.max_new_tokens))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [(self.tokenizer.encode(r.args[0]) or [self.tokenizer.eos_id])[-(self.max_length - new):]
                       for r in batch]
            outs = generate_parallel(self.model, self.grid, prompts, new, temperature=temperature,
                                     eos_id=self.tokenizer.eos_id, schedule=self.schedule, slots=self.batch_size)
            for tokens in outs:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min([text.index(s) for s in until if s and s in text], default=len(text))
                results.append(text[:cut])
        return results


def check_tasks(names: list[str], manager: Any, include_path: str | None) -> None:
    """A ValueError naming the first task `manager` does not know."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            where = f" nor in include_path={include_path}" if include_path else " (include_path= adds yours)"
            raise ValueError(f"tasks: unknown task {name!r}: not in lm-eval's task registry{where}")


def run_harness(cfg: DictConfig) -> dict:
    """`twinpipe-eval harness=true`: lm-eval's `simple_evaluate` on `cfg.tasks` (lm-eval's registry
    plus `cfg.include_path`); prints one JSON line {task: {metric: value}} on rank 0; returns it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from twinpipe.trainer.cli.config import load_for_inference
    from twinpipe.trainer.cli.evaluate import write_result

    if not cfg.tasks:
        raise ValueError("tasks=[]: harness=true needs lm-eval task names, e.g. 'tasks=[my_task]'")
    manager = None
    if cfg.include_path:  # lm-eval's own ~10k task files take many seconds to index: only when needed
        manager = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if not set(cfg.tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=cfg.include_path)
    check_tasks(list(cfg.tasks), manager, cfg.include_path)
    model, tokenizer, grid = load_for_inference(cfg)
    lm = TwinpipeLM(model, tokenizer, grid=grid, schedule=cfg.parallel.schedule, batch_size=cfg.batch_size,
                    max_new_tokens=cfg.max_new_tokens)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                                  num_fewshot=cfg.num_fewshot, log_samples=False)
    result = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
              for task, metrics in out["results"].items()}
    if grid.is_main:
        write_result({**result, "checkpoint": cfg.checkpoint}, cfg.output)
    return result
