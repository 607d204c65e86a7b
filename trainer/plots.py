"""PNG plots of a run from its metrics.jsonl: loss curves (raw faintly, an EMA over them), evaluation,
reward/accuracy, learning rate, expert-load heatmap; x in steps (bottom) and tokens (top)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from twinpipe.trainer.metrics import CURVES, curve, ema, ema_window, read_metrics

log = logging.getLogger(__name__)

# file -> (title, y label, curves drawn in it, scale); a file is written when the run logged one of them
CURVE_FIGURES = {
    "loss.png": ("training loss", "cross-entropy (nats)", ("loss", "lm_loss", "mtp_loss", "eval_loss"), 1.0),
    "eval.png": ("held-out exact match", "exact match (%)", ("eval_exact_match",), 100.0),  # SFT's answers
    "reward.png": ("rollouts", "reward / accuracy", ("reward", "accuracy"), 1.0),  # RL
}
LABELS = {"loss": "loss (LM + λ·MTP)", "eval_loss": "held-out LM loss"}


def tokens_axis(ax: Any, records: list[dict[str, Any]]) -> None:
    """A top x axis in training tokens, for a bottom axis in steps (none before two records)."""
    import numpy as np
    from matplotlib.ticker import EngFormatter

    points = [(r["step"], r["tokens"]) for r in records if "tokens" in r]
    if len(points) < 2:
        return
    steps, tokens = (np.array(v, dtype=np.float64) for v in zip(*points))
    top = ax.secondary_xaxis("top", functions=(lambda s: _interp(s, steps, tokens),
                                               lambda t: _interp(t, tokens, steps)))
    top.xaxis.set_major_formatter(EngFormatter())  # 300k, 1.2M, 14.8T
    top.set_xlabel("tokens")


def _interp(x: Any, xp: Any, fp: Any) -> Any:
    """np.interp, extended linearly past both ends (the axes' margins lie outside the data)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    head = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    tail = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.where(x < xp[0], head, np.where(x > xp[-1], tail, np.interp(x, xp, fp)))


def curve_figure(records: list[dict[str, Any]], keys: tuple[str, ...], ylabel: str, scale: float = 1.0,
                 title: str = "") -> Optional[Any]:
    """One axes with, per logged key, the raw values (faint) and their EMA (solid, its window in the
    legend, in steps); None when the records have none of `keys`."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for i, key in enumerate(keys):
        steps, values = curve(records, key)
        if not values:
            continue
        color, label = f"C{i}", LABELS.get(key, CURVES[key][0])
        window = ema_window(len(values))
        span = round(window * (steps[-1] - steps[0]) / max(len(steps) - 1, 1)) or 1  # in steps
        sparse = len(values) < len(records)  # e.g. an evaluation every eval.every steps: markers
        ax.plot(steps, [scale * v for v in values], ".-" if sparse else "-", color=color, alpha=0.25,
                linewidth=0.8, label=f"{label} (raw)")
        ax.plot(steps, [scale * v for v in ema(values, window)], color=color, linewidth=1.8,
                label=f"{label}, EMA over {span} steps")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    tokens_axis(ax, records)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write loss.png (loss, LM loss, MTP loss; SFT's held-out loss), eval.png (SFT's held-out exact
    match), reward.png (reward / accuracy), each when logged, lr.png and expert_load.png (one panel per
    MoE layer: experts x steps, colour = share of the layer's tokens); return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        log.warning("no metrics in %s: no plots", run_dir)
        return []
    steps = [r["step"] for r in records]
    out = []

    for name, (title, ylabel, keys, scale) in CURVE_FIGURES.items():
        fig = curve_figure(records, keys, ylabel, scale, f"{title}: {run_dir.name}")
        if fig is not None:
            out.append(run_dir / name)
            fig.savefig(out[-1], dpi=110, bbox_inches="tight")
            plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    tokens_axis(ax, records)
    ax.grid(alpha=0.3)
    out.append(run_dir / "lr.png")
    fig.savefig(out[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    loads = [r.get("expert_load") for r in records]
    if loads and loads[-1]:
        load = np.array(loads, dtype=np.float64)  # [steps, layers, experts]
        share = load / np.maximum(load.sum(axis=2, keepdims=True), 1.0)
        layers = share.shape[1]
        fig, axes = plt.subplots(layers, 1, figsize=(8, 1.6 * layers + 0.6), squeeze=False, sharex=True)
        for i in range(layers):
            im = axes[i, 0].imshow(share[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                                   extent=(steps[0], steps[-1], -0.5, share.shape[2] - 0.5))
            axes[i, 0].set_ylabel(f"MoE {i}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0], label="share of routed tokens")
        fig.suptitle("expert load per MoE layer (uniform = 1/E)")
        out.append(run_dir / "expert_load.png")
        fig.savefig(out[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    log.info("plots: %s", ", ".join(str(p) for p in out))
    return out
