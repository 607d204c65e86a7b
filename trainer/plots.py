"""PNG plots of a run from its metrics.jsonl: loss curves, learning rate, expert-load heatmap."""

from __future__ import annotations

import logging
from pathlib import Path

from twinpipe.trainer.metrics import read_metrics

log = logging.getLogger(__name__)


def make_plots(run_dir: str | Path) -> list[Path]:
    """Write loss.png (loss, LM loss, MTP loss; SFT's held-out loss), eval.png (SFT's held-out exact
    match, when logged), lr.png and expert_load.png (one panel per MoE layer:
    experts x steps, colour = share of the layer's tokens); return the paths written."""
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

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "loss (LM + λ·MTP)"), ("lm_loss", "LM loss"), ("mtp_loss", "MTP loss")):
        ax.plot(steps, [r[key] if r[key] is not None else np.nan for r in records], label=label)
    evals = [r for r in records if "eval_loss" in r]  # SFT's held-out loss (eval.every)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out LM loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"training loss: {run_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(run_dir / "loss.png")
    fig.savefig(out[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    matches = [r for r in records if "eval_exact_match" in r]
    if matches:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([r["step"] for r in matches], [100 * r["eval_exact_match"] for r in matches], "o-")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out exact match (%)")
        ax.grid(alpha=0.3)
        out.append(run_dir / "eval.png")
        fig.savefig(out[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["lr"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
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
