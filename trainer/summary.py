"""The end of a run: `run.dir/summary.json` and one closing log line (rank 0).

The summary covers the whole run as its metrics.jsonl has it (a resumed run included) and, for the
timing, the part this process trained:

    steps, tokens                 where the run stands (optimizer steps, training tokens)
    steps_this_run, tokens_this_run, wall_s, tokens_per_s
                                  this process: steps and tokens it trained, seconds from its first
                                  step to its end (checkpoints, evaluation and plots included), and
                                  their ratio
    step_tokens_per_s             the same over the training steps alone: tokens / seconds summed over
                                  this process's logged steps (what the progress line shows)
    mfu                           mean model FLOPs utilisation of this process's logged steps (null
                                  when no peak is known: CPU without logging.peak_tflops)
    final_<key>, best_<key>, best_<key>_step, final_<key>_ema
                                  for each curve of `CURVES` the run logged (loss, lm_loss, mtp_loss,
                                  eval_loss, eval_exact_match, reward, accuracy): the last value, the
                                  best (lowest loss, highest reward/accuracy) and its step, the last
                                  point of the plotted EMA (a raw loss of a small batch is noisy)
    checkpoint                    the newest complete checkpoint folder (null: none)
    stopped_by_signal             SIGTERM/SIGUSR1 ended the run before train.steps
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from twinpipe.trainer.metrics import CURVES, curve, ema, ema_window, format_seconds, read_metrics

log = logging.getLogger(__name__)

CLOSING_LINE_KEYS = ("loss", "eval_loss", "eval_exact_match", "reward", "accuracy")  # all: summary.json


def summarize(records: list[dict[str, Any]], step: int, tokens: float, steps_this_run: int,
              tokens_this_run: float, wall_s: float, checkpoint: Optional[Path],
              stopped: bool = False) -> dict[str, Any]:
    """The summary's fields (see the module docstring) from the run's records."""
    mine = [r for r in records if r["step"] > step - steps_this_run]
    mfus = [r["mfu"] for r in mine if isinstance(r.get("mfu"), float)]
    # a step's seconds are its sequences / its tokens/s x seq_len: seq_len cancels in the ratio
    timed = [(r.get("global_batch", 1), r["tokens_per_s"]) for r in mine if r.get("tokens_per_s")]
    out: dict[str, Any] = {
        "steps": step, "tokens": tokens, "steps_this_run": steps_this_run, "tokens_this_run": tokens_this_run,
        "wall_s": wall_s, "tokens_per_s": tokens_this_run / max(wall_s, 1e-9),
        "step_tokens_per_s": (sum(b for b, _ in timed) / sum(b / tps for b, tps in timed)) if timed else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
    }
    for key, (_, higher) in CURVES.items():
        steps, values = curve(records, key)
        if not values:
            continue
        best = (max if higher else min)(range(len(values)), key=values.__getitem__)
        out.update({f"final_{key}": values[-1], f"best_{key}": values[best], f"best_{key}_step": steps[best],
                    f"final_{key}_ema": ema(values, ema_window(len(values)))[-1]})
    out["checkpoint"] = str(checkpoint) if checkpoint is not None else None
    out["stopped_by_signal"] = stopped
    return out


def closing_line(summary: dict[str, Any], path: Path) -> str:
    """`done: step 300, 3.072e+05 tokens (this run: 300 steps in 1m32s, 3335 tok/s; 3805 tok/s in the
    steps), loss 6.2010 (best 5.9113 at step 287, EMA 6.1902), ..., MFU 12.3%, checkpoint
    runs/x/checkpoints/step_300, summary runs/x/summary.json`."""
    parts = [f"{'stopped by signal' if summary['stopped_by_signal'] else 'done'}: step {summary['steps']}, "
             f"{summary['tokens']:.4g} tokens (this run: {summary['steps_this_run']} steps in "
             f"{format_seconds(summary['wall_s'])}, {summary['tokens_per_s']:.0f} tok/s"
             + (f"; {summary['step_tokens_per_s']:.0f} tok/s in the steps)" if summary["step_tokens_per_s"] else ")")]
    for key in CLOSING_LINE_KEYS:
        name = CURVES[key][0]
        if f"final_{key}" in summary:
            parts.append(f"{name} {summary[f'final_{key}']:.4f} (best {summary[f'best_{key}']:.4f} at step "
                         f"{summary[f'best_{key}_step']}, EMA {summary[f'final_{key}_ema']:.4f})")
    if summary["mfu"] is not None:
        parts.append(f"MFU {100 * summary['mfu']:.1f}%")
    parts.append(f"checkpoint {summary['checkpoint'] or 'none'}")
    parts.append(f"summary {path}")
    return ", ".join(parts)


def write_summary(run_dir: Path, step: int, tokens: float, steps_this_run: int, tokens_this_run: float,
                  wall_s: float, stopped: bool = False) -> dict[str, Any]:
    """Write `run_dir/summary.json` (replaced by each run that ends) and log the closing line."""
    from twinpipe.trainer.checkpoint.io import complete_checkpoints

    saved = complete_checkpoints(run_dir)
    summary = summarize(read_metrics(run_dir), step, tokens, steps_this_run, tokens_this_run, wall_s,
                        saved[-1][1] if saved else None, stopped)
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    log.info("%s", closing_line(summary, path))
    return summary
