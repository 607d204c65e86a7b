"""Metrics: `run.dir/metrics.jsonl` (rank 0), a tqdm bar, and wandb (offline by default).

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
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool,
                 wandb_mode: str = "disabled", project: str = "twinpipe", run_name: str = "",
                 config: Optional[dict] = None, progress: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._bar = None
        self._last_eval: dict[str, str] = {}
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)
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
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            # the latest evaluation (SFT's eval_loss / eval_exact_match) stays on the bar between them
            self._last_eval.update({k: f"{v:.4f}" for k, v in record.items() if k.startswith("eval_")})
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                  **self._last_eval)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "expert_load"}, step=record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


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
