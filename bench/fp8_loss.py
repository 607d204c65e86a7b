"""FP8 vs BF16 training loss on the tiny model and the embedded corpus (DeepSeek-V3 §3.3 validation).

    python bench/fp8_loss.py                                   # seed 0: fp8=emulate vs fp8=off, 500 steps
    python bench/fp8_loss.py --seeds 0,1,2,3 --noise-floor --jobs 2
    python bench/fp8_loss.py --steps 200 --backend triton -- train.threads=4

For every seed, runs the trainer's public entry (`python -m twinpipe.trainer`) with `fp8=<backend>` and
with `fp8=off`, both `train.dtype=<dtype>` (bf16 autocast on CPU as on GPU), same seed and data; reads
each `run.dir/metrics.jsonl` and reports the relative error of the mean loss over the last 100 steps
(the report's criterion: below 0.25% for its 16B and 230B runs).

`--noise-floor` adds, per seed, a third run that differs from the baseline only in the order of its
floating-point sums (`train.micro_batch` halved: the same global batch accumulated in more pieces).
A MoE's routing flips on ulp-level changes, so any perturbation sends the run on its own trajectory;
that run's distance from the baseline is the spread a perturbation of *no* numerical consequence
already causes, the scale to read the FP8 figure against. Several seeds separate a systematic FP8
loss penalty (same sign every seed) from trajectory noise (sign varies). With the reordered runs, the
two fp8=off runs of a seed are equally valid BF16 runs, so FP8 is also compared with their mean
(`fp8_vs_both_baselines_mean`, with its standard error over seeds): a less noisy estimate of FP8's
expected loss penalty than the distance from one baseline run.

Writes one JSON (every seed's losses and errors, the mean and spread) and one PNG to bench/results/.
Extra Hydra overrides after `--` go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_BOUND = 0.0025


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the training run wrote no metrics")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def train(run_dir: Path, fp8: str, seed: int, args, extra: list[str]) -> float:
    if args.reuse and (run_dir / "metrics.jsonl").exists() and len(read_losses(run_dir)) == args.steps:
        print(f"reusing {run_dir} ({args.steps} steps logged)", flush=True)
        return 0.0
    cmd = [sys.executable, "-m", "twinpipe.trainer", "model=tiny", f"fp8={fp8}", f"train.steps={args.steps}",
           f"train.seed={seed}", f"train.dtype={args.dtype}", f"run.dir={run_dir}", "resume=never",
           "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false", *extra]
    print(" ".join(cmd), flush=True)
    start = time.time()
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed (exit {proc.returncode}); its log: {log}")
    return time.time() - start


def tail_mean(losses: list[tuple[int, float]], last: int) -> float:
    tail = [loss for _, loss in losses[-last:]]
    return sum(tail) / len(tail)


def relative(curve: list[tuple[int, float]], base: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """(step, % difference of the trailing `window`-step means) for the steps both curves have."""
    common = dict(base)
    pairs = [(s, v, common[s]) for s, v in curve if s in common]
    out = []
    for i in range(window - 1, len(pairs)):
        chunk = pairs[i - window + 1:i + 1]
        a, b = sum(v for _, v, _ in chunk), sum(r for _, _, r in chunk)
        out.append((pairs[i][0], (a - b) / b * 100))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result["seeds"][0]
    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=[2, 1.3])
    for key, label in (("baseline_losses", "fp8=off"), ("fp8_losses", f"fp8={result['backend']}"),
                       ("noise_losses", "fp8=off, sums reordered")):
        if key in first:
            ax.plot([s for s, _ in first[key]], [v for _, v in first[key]], label=label, linewidth=1)
    ax.set_ylabel(f"training loss (seed {first['seed']})")
    errors = [s["fp8_relative_error"] for s in result["seeds"]]
    title = (f"tiny model, train.dtype={result['dtype']}, {result['steps']} steps, {len(errors)} seed(s): fp8 vs "
             f"fp8=off, last-{result['last']} mean\nrel. error {result['fp8_relative_error_mean']:+.2%} "
             f"(seeds: {min(errors):+.2%} .. {max(errors):+.2%})")
    if result["noise_relative_error_mean"] is not None:
        title += (f"; reordered sums {result['noise_relative_error_mean']:+.2%}; vs both fp8=off runs "
                  f"{result['fp8_vs_both_baselines_mean']:+.2%}")
    ax.set_title(title + f" (bound {REPORT_BOUND:.2%})", fontsize=8)
    ax.legend()
    for i, seed in enumerate(result["seeds"]):
        rel = relative(seed["fp8_losses"], seed["baseline_losses"], 20)
        ax_rel.plot([s for s, _ in rel], [r for _, r in rel], linewidth=0.9, color=f"C{i}",
                    label=f"fp8, seed {seed['seed']}")
        if "noise_losses" in seed:
            rel = relative(seed["noise_losses"], seed["baseline_losses"], 20)
            ax_rel.plot([s for s, _ in rel], [r for _, r in rel], linewidth=0.7, color=f"C{i}",
                        linestyle=":", label=f"reordered, seed {seed['seed']}")
    for y in (0, REPORT_BOUND * 100, -REPORT_BOUND * 100):
        ax_rel.axhline(y, color="black", linewidth=0.5 if y == 0 else 0.3, linestyle="-" if y == 0 else "--")
    ax_rel.set_ylabel("vs fp8=off, % (20-step mean)", fontsize=8)
    ax_rel.set_xlabel("step")
    ax_rel.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values, e.g. 0,1,2,3")
    parser.add_argument("--backend", default="emulate", choices=["emulate", "triton", "cublas", "auto"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="train.dtype of every run (bf16: autocast, on CPU as on GPU)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="per seed, also run the baseline with its sums reordered (see the module doc)")
    parser.add_argument("--noise-override", default="train.micro_batch=2",
                        help="the override that reorders the baseline's sums (default recipe: 4 -> 2)")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (one core each)")
    parser.add_argument("--last", type=int, default=100, help="steps averaged at the end")
    parser.add_argument("--runs", default="runs/bench_fp8_loss", help="parent folder of the run dirs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--reuse", action="store_true",
                        help="skip a run whose run dir already logged --steps steps (run dirs are named by "
                             "backend, dtype, seed and overrides)")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse the metrics of the run dirs from an earlier call (re-plot only)")
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")

    # e.g. train.seq_len=64 -> _seq_len64, optim.lr=1.5e-3 -> _lr1.5e-3
    tag = "".join(f"_{key.rsplit('.', 1)[-1]}{value}" for key, _, value in (e.partition("=") for e in extra))
    runs = Path(args.runs)
    jobs = []  # (seed, role, run dir, fp8, overrides)
    for seed in seeds:
        jobs.append((seed, "baseline", runs / f"off_{args.dtype}_s{seed}{tag}", "off", extra))
        jobs.append((seed, "fp8", runs / f"{args.backend}_{args.dtype}_s{seed}{tag}", args.backend, extra))
        if args.noise_floor:
            jobs.append((seed, "noise", runs / f"off_{args.dtype}_s{seed}{tag}_reordered", "off",
                         [*extra, args.noise_override]))
    seconds: dict[str, float] = {}
    if not args.skip_train:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(train, d, fp8, seed, args, over): f"{role}_s{seed}"
                       for seed, role, d, fp8, over in jobs}
            for future, name in futures.items():
                seconds[name] = future.result()

    per_seed = []
    for seed in seeds:
        dirs = {role: d for s, role, d, _, _ in jobs if s == seed}
        curves = {role: read_losses(d) for role, d in dirs.items()}
        last = min(args.last, *(len(c) for c in curves.values()))
        means = {role: tail_mean(c, last) for role, c in curves.items()}
        entry = {"seed": seed, "last": last, "baseline_mean_loss": means["baseline"],
                 "fp8_mean_loss": means["fp8"],
                 "fp8_relative_error": (means["fp8"] - means["baseline"]) / means["baseline"]}
        if "noise" in means:
            entry["noise_mean_loss"] = means["noise"]
            entry["noise_relative_error"] = (means["noise"] - means["baseline"]) / means["baseline"]
        entry.update({f"{role}_losses": c for role, c in curves.items()})
        per_seed.append(entry)
        print(f"seed {seed}: mean loss of the last {last} steps: baseline {means['baseline']:.4f}, "
              f"fp8={args.backend} {means['fp8']:.4f} ({entry['fp8_relative_error']:+.3%})"
              + (f", reordered baseline {means['noise']:.4f} ({entry['noise_relative_error']:+.3%})"
                 if "noise" in means else ""), flush=True)

    errors = [s["fp8_relative_error"] for s in per_seed]
    noise = [s["noise_relative_error"] for s in per_seed if "noise_relative_error" in s]
    # Both fp8=off runs of a seed are BF16 training runs, equally valid draws: FP8 against their mean.
    pooled = [(s["fp8_mean_loss"] - (s["baseline_mean_loss"] + s.get("noise_mean_loss", s["baseline_mean_loss"])) / 2)
              / ((s["baseline_mean_loss"] + s.get("noise_mean_loss", s["baseline_mean_loss"])) / 2) for s in per_seed]
    result = {
        "bench": "fp8_loss", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": args.steps, "backend": args.backend, "dtype": args.dtype, "overrides": extra,
        "noise_override": args.noise_override if args.noise_floor else None, "last": per_seed[0]["last"],
        "report_bound": REPORT_BOUND,
        "fp8_relative_error_mean": statistics.fmean(errors),
        "fp8_relative_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
        "fp8_relative_error_max_abs": max(abs(e) for e in errors),
        "noise_relative_error_mean": statistics.fmean(noise) if noise else None,
        "noise_relative_error_max_abs": max(abs(e) for e in noise) if noise else None,
        "fp8_vs_both_baselines_mean": statistics.fmean(pooled),
        "fp8_vs_both_baselines_standard_error": (statistics.stdev(pooled) / len(pooled) ** 0.5
                                                 if len(pooled) > 1 else None),
        "every_seed_within_report_bound": all(abs(e) < REPORT_BOUND for e in errors),
        "note": f"train.dtype={args.dtype} for every run; relative error = (fp8 - baseline) / baseline of the "
                f"mean training loss over the last steps; signed",
        "seconds": seconds, "seeds": per_seed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_tag = f"s{seeds[0]}" if len(seeds) == 1 else f"seeds{'-'.join(map(str, seeds))}"
    stem = f"fp8_loss_{args.backend}_{args.dtype}_{args.steps}steps_{seed_tag}{tag}"
    plot(result, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    spread = f" ± {result['fp8_relative_error_std']:.3%} (std over seeds)" if len(errors) > 1 else ""
    print(f"fp8={args.backend} vs fp8=off, train.dtype={args.dtype}: relative error of the last-"
          f"{result['last']} mean {result['fp8_relative_error_mean']:+.3%}{spread}, largest "
          f"{result['fp8_relative_error_max_abs']:.3%} (report: < {REPORT_BOUND:.2%})"
          + (f"; reordered-sum baselines differ by {result['noise_relative_error_mean']:+.3%} on average, up to "
             f"{result['noise_relative_error_max_abs']:.3%}; fp8 vs the mean of both fp8=off runs of each seed "
             f"{result['fp8_vs_both_baselines_mean']:+.3%}" if noise else "")
          + (f" ± {result['fp8_vs_both_baselines_standard_error']:.3%} (standard error)" if noise and len(pooled) > 1
             else "") + f"; wrote {out / stem}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
