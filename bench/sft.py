"""SFT benchmark: held-out exact-match accuracy from ~0 to >= 40% on a generated task, on 2 CPU cores.

The task (`make_task`, generated here, offline): add two numbers below 10**digits,
    user: "What is 7 + 5?"   ->   assistant: "12"
chat-formatted with DeepSeek-V3's template (the default BPE with its chat tokens, from scratch). The
held-out records come from another seed; with one digit there are only 100 problems, all of which the
training records contain, so the accuracy measures how fast SFT fits the skill, not generalisation
(the JSON says how many held-out problems occur in training). Letter copying and reversal (tried first)
stayed at 0% for 450 steps on this model. The model is the `tiny` preset with a 512-token vocabulary (MoE: 8 routed experts, 1 shared,
MTP depth 1); the recipe is `recipes/sft.yaml` with the overrides in `overrides()`; accuracy is the
recipe's own `eval_exact_match` (greedy decoding through the inference path) after step 1 and every
`--eval-every` steps.

    python bench/sft.py                 # 120 steps (wall time in the JSON, with the machine's load)
    python bench/sft.py --steps 40      # quicker look

Writes bench/results/sft_addition.json (model size, steps, wall time, accuracy and loss curves, the
command line) and sft_addition.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_task(path: Path, count: int, seed: int, digits: int) -> Path:
    """`count` addition records (messages + answer) in a jsonl file: two numbers below 10**digits."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
            record = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                   {"role": "assistant", "content": str(a + b)}], "answer": str(a + b)}
            f.write(json.dumps(record) + "\n")
    return path


def overrides(args: argparse.Namespace, train: Path, held: Path, run_dir: Path) -> list[str]:
    return [f"data.paths=[{train}]", f"eval.paths=[{held}]", f"run.dir={run_dir}", "resume=never",
            "model.vocab_size=512", f"train.steps={args.steps}", "train.global_batch=16",
            "train.micro_batch=16", "train.seq_len=128", "optim.lr=3e-3", "optim.min_lr=3e-4",
            "optim.warmup_steps=20", f"eval.every={args.eval_every}", f"eval.answers={args.eval_records}",
            "eval.batches=2", "eval.max_new_tokens=16", "checkpoint.every=0", "checkpoint.at_end=false",
            "logging.wandb=disabled", "logging.progress=false", f"data.cache_dir={run_dir.parent / 'cache'}",
            f"train.threads={args.threads}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-records", type=int, default=200)
    parser.add_argument("--train-records", type=int, default=5000)
    parser.add_argument("--digits", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/bench-sft")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = make_task(work / "train.jsonl", args.train_records, seed=1, digits=args.digits)
    held = make_task(work / "heldout.jsonl", args.eval_records, seed=2, digits=args.digits)
    run_dir = work / f"run-{int(time.time())}"
    command = [sys.executable, "-m", "twinpipe.trainer", "--config-name", "sft",
               *overrides(args, train, held, run_dir)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_exact_match" in r]
    question = lambda line: json.loads(line)["messages"][0]["content"]  # noqa: E731
    train_questions = {question(line) for line in train.read_text().splitlines()}
    held_questions = [question(line) for line in held.read_text().splitlines()]
    from twinpipe.model.config import ModelConfig

    result = {
        "task": f"add two {args.digits}-digit numbers", "train_records": args.train_records,
        "eval_records": args.eval_records, "eval_seen_in_training": sum(q in train_questions for q in held_questions),
        "model": "tiny, vocab 512", "params": ModelConfig.preset("tiny", vocab_size=512).num_parameters(),
        "steps": args.steps, "wall_s": round(wall, 1), "threads": args.threads, "host": platform.node(),
        "cpus": os.cpu_count(), "load_average_before_after": [load_before, load_after],
        "accuracy": {r["step"]: r["eval_exact_match"] for r in evals},
        "eval_loss": {r["step"]: r["eval_loss"] for r in evals},
        "first_accuracy": evals[0]["eval_exact_match"], "final_accuracy": evals[-1]["eval_exact_match"],
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2],
        "command": " ".join(command),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sft_addition.json").write_text(json.dumps(result, indent=2))
    plot(rows, evals, result, RESULTS / "sft_addition.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("accuracy", "eval_loss", "command")}))


def plot(rows: list[dict], evals: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], label="train LM loss (assistant tokens)")
    left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    left.set_xlabel("step")
    left.legend()
    right.plot([r["step"] for r in evals], [100 * r["eval_exact_match"] for r in evals], "o-")
    right.axhline(40, color="gray", linestyle=":")
    right.set_xlabel("step")
    right.set_ylabel("held-out exact match (%)")
    fig.suptitle(f"SFT, {result['task']}: {result['model']} ({result['params'] / 1e6:.1f}M params), "
                 f"{result['steps']} steps in {result['wall_s']:.0f} s on {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
