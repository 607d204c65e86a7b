"""`twinpipe-eval`: perplexity of a model on a text file, or lm-evaluation-harness tasks.

    twinpipe-eval checkpoint=runs/try1                        # the embedded corpus's held-out split
    twinpipe-eval checkpoint=runs/try1 text_file=some.py seq_len=256 output=ppl.json
    twinpipe-eval checkpoint=runs/try1 harness=true 'tasks=[my_task]' include_path=tasks/  # trainer/cli/harness.py
    launch/torchrun.sh 4 eval checkpoint=runs/try1 parallel.pp=2 parallel.ep=2   # pp x dp ranks

Hydra composes `recipes/eval.yaml` (keys: `EvalSchema` in `trainer/cli/config.py`). The text is
tokenized, followed by eos (as in pretraining), cut into windows of `seq_len + 1` tokens that overlap
by one token, so every token after the first is predicted exactly once, with at most `seq_len` tokens
of context. Without `text_file` the held-out split of the embedded corpus (the standard-library files
the trainer never trains on, each followed by eos) is scored, so a run of the default recipe gets its
held-out perplexity with no other argument. Under several ranks the windows are scored through the
stages of `parallel.*` (`parallel/inference`), split over the data-parallel replicas; rank 0 prints.
`perplexity` is the same work on token ids in memory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from twinpipe.parallel.grid import Grid
from twinpipe.data.loader import embedded_documents
from twinpipe.model.scoring import token_logprobs
from twinpipe.parallel.inference import score_parallel
from twinpipe.trainer.cli.config import check, launch, load_for_inference

logger = logging.getLogger(__name__)

HELDOUT = "embedded:heldout"  # the result's "text" when the held-out split was scored


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, batch_size: int = 8, grid=None,
               schedule: str = "1f1b") -> dict[str, float]:
    """Mean next-token negative log-likelihood over `ids` and its exp: {nll, ppl, tokens}. `grid`:
    the model is this rank's part under that grid and `schedule`; every rank returns the result."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    grid = grid or Grid.single()
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    per_call = batch_size * grid.dp  # windows per forward on each replica
    total, count = 0.0, 0
    for b in tqdm(range(0, len(windows), per_call), desc="perplexity", unit="batch",
                  disable=None if grid.is_main else True, leave=False):
        for logps, _ in score_parallel(model, grid, windows[b:b + per_call], token_logprobs, schedule):
            total -= math.fsum(logps)
            count += len(logps)
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": float(count)}


def evaluate_text(model, tokenizer, text: str, seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of `text` (tokenized without special tokens, then eos)."""
    return perplexity(model, tokenizer.encode(text) + [tokenizer.eos_id], seq_len, batch_size)


def heldout_ids(tokenizer, max_tokens: int | None = None) -> list[int]:
    """The embedded corpus's held-out split as pretraining tokenizes it (each document, a special
    token's text kept literal, then eos), documents in file order; cut at `max_tokens`."""
    ids: list[int] = []
    for doc in embedded_documents("heldout"):
        ids += tokenizer.encode_batch([doc], literal_specials=True)[0] + [tokenizer.eos_id]
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def run(cfg: DictConfig) -> dict:
    """The CLI's work on a composed `recipes/eval.yaml`: load, score, print one JSON line
    {nll, ppl, tokens, checkpoint, text} (and write it to `cfg.output` when set); returns it."""
    check(cfg, "eval")
    if cfg.max_tokens is not None and cfg.max_tokens < 2:
        raise ValueError(f"max_tokens={cfg.max_tokens}: must be >= 2 (one token predicts the next)")
    if cfg.text_file is not None and not Path(cfg.text_file).is_file():
        raise ValueError(f"text_file={cfg.text_file}: no such file")
    if cfg.harness:
        from twinpipe.trainer.cli.harness import run_harness

        return run_harness(cfg)
    model, tokenizer, grid = load_for_inference(cfg)
    if cfg.text_file is None:
        ids, source = heldout_ids(tokenizer, cfg.max_tokens), HELDOUT
    else:
        text = Path(cfg.text_file).read_text(encoding="utf-8")
        ids, source = (tokenizer.encode(text) + [tokenizer.eos_id])[:cfg.max_tokens], cfg.text_file
    scores = perplexity(model, ids, cfg.seq_len, cfg.batch_size, grid, cfg.parallel.schedule)
    logger.info("%s: %d tokens scored, perplexity %.3f", source, scores["tokens"], scores["ppl"])
    result = {**scores, "tokens": int(scores["tokens"]), "checkpoint": cfg.checkpoint, "text": source}
    if grid.is_main:
        write_result(result, cfg.output)
    return result


def write_result(result: dict, output: str | None) -> None:
    """One JSON line to stdout, and to `output` when set."""
    line = json.dumps(result)
    sys.stdout.write(line + "\n")
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(line + "\n")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: Hydra overrides from `argv` (tests) or the command line."""
    launch("eval", run, argv)


if __name__ == "__main__":
    main()
