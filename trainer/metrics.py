"""Metrics: `run.dir/metrics.jsonl` (rank 0), progress (a tqdm bar on a terminal, plain lines
elsewhere), and wandb (offline by default).

Each logged step is one JSON object with at least `step, loss, lm_loss, mtp_loss, lr, grad_norm,
tokens_per_s, expert_load_max_over_mean` (DESIGN.md contract), plus `balance_loss`, `tokens`,
`mfu` (when a peak is known), `skipped` and `expert_load` ([moe layers][experts] token counts of the
global batch). A resumed run appends; readers keep the last line of a step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


class MetricsWriter:
    """Rank 0's record of a run: `log(record)` per logged step, `close()` in any case, and `finish`
    after a run that ended (the summary, `trainer/summary.py`). Other ranks' writers do nothing."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 wandb_mode: str = "disabled", project: str = "twinpipe", run_name: str = "",
                 config: Optional[dict] = None, progress: bool = True, every_s: float = 10.0,
                 start_tokens: float = 0.0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.start = (start_step, start_tokens, time.perf_counter())
        self._file = None
        self._progress = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if progress:
            self._progress = Progress(total_steps, start_step, every_s)
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                log.warning("logging.wandb=%s but wandb is not installed; continuing without it", wandb_mode)
            else:
                self._wandb = wandb.init(project=project, name=run_name or None, mode=wandb_mode,
                                         dir=str(Path(run_dir)), config=config, resume="allow",
                                         id=_wandb_id(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._progress is not None:
            self._progress.update(record)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "expert_load"}, step=record["step"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def finish(self, step: int, tokens: float, stopped: bool = False) -> None:
        """The run ended (all steps, or stopped by a signal): write `summary.json` and log its line."""
        if self.enabled:
            from twinpipe.trainer.summary import write_summary

            start_step, start_tokens, t0 = self.start
            write_summary(self.run_dir, step, tokens, step - start_step, tokens - start_tokens,
                          time.perf_counter() - t0, stopped)


def output_is_terminal() -> bool:
    """Both stdout and stderr are terminals: the only case where a redrawn bar is readable (a file, a
    pipe or SLURM's output would get every redraw, joined by carriage returns)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """Rank 0's progress: on a terminal a tqdm bar; otherwise one plain log line (step, loss, lr,
    tokens/s since the previous line, ETA, the latest evaluation) at the first logged step, then
    whenever `every_s` seconds have passed, and at the last step. No carriage return is written."""

    def __init__(self, total_steps: int, start_step: int, every_s: float, terminal: Optional[bool] = None):
        self.total, self.start_step, self.every_s = total_steps, start_step, every_s
        self.t0 = time.perf_counter()
        self._last: Optional[tuple[float, float]] = None  # (time, tokens) at the previous line
        self._evals: dict[str, float] = {}
        self._bar = None
        if output_is_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        # the latest evaluation (SFT's eval_loss / eval_exact_match) is shown until the next one
        self._evals.update({k: v for k, v in record.items() if k.startswith("eval_") and v is not None})
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                  **{k: f"{v:.4f}" for k, v in self._evals.items()})
            return
        now = time.perf_counter()
        if self._last is not None and now - self._last[0] < self.every_s and record["step"] < self.total:
            return
        log.info(self.line(record, now))
        self._last = (now, record.get("tokens", 0.0))

    def line(self, record: dict[str, Any], now: float) -> str:
        step = record["step"]
        tokens = record.get("tokens")
        if self._last is not None and tokens is not None and now > self._last[0]:
            tok_s = (tokens - self._last[1]) / (now - self._last[0])  # mean since the previous line
        else:
            tok_s = record["tokens_per_s"]
        done = step - self.start_step
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else math.nan
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)", f"loss {record['loss']:.4f}",
                 f"lr {record['lr']:.3g}", f"{tok_s:.0f} tok/s", f"eta {format_seconds(eta)}"]
        parts += [f"{k} {v:.4f}" for k, v in sorted(self._evals.items())]
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_seconds(seconds: float) -> str:
    """`1h02m`, `3m07s`, `42s` (`?` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def ema(values: list[float], window: int) -> list[float]:
    """Exponential moving average with span `window` (α = 2 / (window + 1)), bias-corrected so the
    first points are not pulled towards 0: y_t = Σ_i (1-α)^i x_{t-i} / Σ_i (1-α)^i
    (pandas' `ewm(span=window).mean()`)."""
    decay = 1.0 - 2.0 / (window + 1)
    num = den = 0.0
    out = []
    for x in values:
        num, den = decay * num + x, decay * den + 1.0
        out.append(num / den)
    return out


# the curves plots.py draws (raw and EMA) and summary.py reports: key -> (name, True when higher is better)
CURVES: dict[str, tuple[str, bool]] = {
    "loss": ("loss", False),
    "lm_loss": ("LM loss", False),
    "mtp_loss": ("MTP loss", False),
    "eval_loss": ("eval loss", False),
    "eval_exact_match": ("eval exact match", True),
    "reward": ("reward", True),
    "accuracy": ("accuracy", True),
}


def ema_window(num_points: int) -> int:
    """Points averaged by the plots' and the summary's EMA: a tenth of the curve, 1 to 100."""
    return max(1, min(100, num_points // 10))


def curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged a finite `key`."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _wandb_id(run_dir: str | Path) -> str:
    """A stable wandb run id per run dir, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged records by step; when a resumed run re-logged a step, its last record wins."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
