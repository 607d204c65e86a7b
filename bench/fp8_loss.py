"""FP8 vs BF16 training loss on the tiny model and the embedded corpus (DeepSeek-V3 §3.3 validation).

    python bench/fp8_loss.py                           # 500 steps, fp8=emulate vs fp8=off
    python bench/fp8_loss.py --steps 200 --backend triton -- train.threads=4

Runs the trainer's public entry twice with the same seed and data (`python -m twinpipe.trainer`
with `fp8=<backend>` and `fp8=off`, both `train.dtype=<dtype>`), reads each `run.dir/metrics.jsonl`,
and reports the relative error of the mean loss over the last 100 steps (the report's criterion: below
0.25% for its 16B and 230B runs). Writes a PNG of both curves and a JSON to bench/results/.
Extra Hydra overrides after `--` go to both runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_BOUND = 0.0025


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the training run wrote no metrics")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def train(run_dir: Path, fp8: str, args, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "twinpipe.trainer", "model=tiny", f"fp8={fp8}", f"train.steps={args.steps}",
           f"train.seed={args.seed}", f"train.dtype={args.dtype}", f"run.dir={run_dir}", "resume=never",
           "checkpoint.every=0", "logging.wandb=disabled", *extra]
    print(" ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def tail_mean(losses: list[tuple[int, float]], last: int) -> float:
    tail = [loss for _, loss in losses[-last:]]
    return sum(tail) / len(tail)


def plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    for name, losses in curves.items():
        ax.plot([s for s, _ in losses], [v for _, v in losses], label=name, linewidth=1)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    (base_name, base), (fp8_name, fp8) = list(curves.items())
    common = dict(base)
    rel = [(s, (v - common[s]) / common[s] * 100) for s, v in fp8 if s in common]
    ax_rel.plot([s for s, _ in rel], [r for _, r in rel], linewidth=0.8, color="gray")
    ax_rel.axhline(0, color="black", linewidth=0.5)
    ax_rel.set_ylabel("fp8 vs baseline, %")
    ax_rel.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="emulate", choices=["emulate", "triton", "cublas", "auto"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="train.dtype of both runs (bf16 autocasts on GPU; CPU runs stay fp32)")
    parser.add_argument("--last", type=int, default=100, help="steps averaged at the end")
    parser.add_argument("--runs", default="runs/bench_fp8_loss", help="parent folder of the two run dirs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse the metrics of the two run dirs from an earlier call (re-plot only)")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]

    # e.g. train.seq_len=64 -> _seq_len64, optim.lr=1.5e-3 -> _lr1.5e-3
    tag = "".join(f"_{key.rsplit('.', 1)[-1]}{value}" for key, _, value in (e.partition("=") for e in extra))
    runs = Path(args.runs)
    base_dir = runs / f"off_{args.dtype}_s{args.seed}{tag}"
    fp8_dir = runs / f"{args.backend}_{args.dtype}_s{args.seed}{tag}"
    seconds = {}
    if not args.skip_train:
        seconds["baseline"] = train(base_dir, "off", args, extra)
        seconds["fp8"] = train(fp8_dir, args.backend, args, extra)
    base, fp8 = read_losses(base_dir), read_losses(fp8_dir)
    last = min(args.last, len(base), len(fp8))
    base_mean, fp8_mean = tail_mean(base, last), tail_mean(fp8, last)
    rel = abs(fp8_mean - base_mean) / base_mean

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fp8_loss_{args.backend}_{args.dtype}_{args.steps}steps_s{args.seed}{tag}"
    names = {f"fp8=off, train.dtype={args.dtype}": base, f"fp8={args.backend}, train.dtype={args.dtype}": fp8}
    plot(names, out / f"{stem}.png",
         f"tiny model, {args.steps} steps: rel. error of last-{last} mean = {rel:.3%}")
    result = {
        "bench": "fp8_loss", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": args.steps, "seed": args.seed, "backend": args.backend, "dtype": args.dtype,
        "overrides": extra, "last": last, "baseline_mean_loss": base_mean, "fp8_mean_loss": fp8_mean,
        "relative_error": rel, "report_bound": REPORT_BOUND, "within_report_bound": rel < REPORT_BOUND,
        "note": "train.dtype=bf16 autocasts only on CUDA: on CPU both runs compute in FP32 outside the FP8 GEMMs",
        "seconds": seconds, "baseline_losses": base, "fp8_losses": fp8,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(f"mean loss of the last {last} steps: baseline {base_mean:.4f}, fp8={args.backend} {fp8_mean:.4f}, "
          f"relative error {rel:.3%} (report: < {REPORT_BOUND:.2%}); wrote {out / stem}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
