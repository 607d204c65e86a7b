"""GRPO benchmark: from the SFT benchmark's checkpoint on its task (addition, `bench/sft.py`),
GRPO with the exact-match reward should raise held-out greedy exact match; mean and spread over seeds.

    python bench/grpo.py                          # SFT stage once (60 steps), then 3 GRPO seeds
    python bench/grpo.py --sft-steps 100 --steps 20 --seeds 0   # a quick look

1. SFT: `recipes/sft.yaml` with `bench/sft.py`'s overrides for `--sft-steps`, saving its checkpoint
   (reused when `--work` already holds it).
2. GRPO per seed: `recipes/grpo.yaml`, `init_from` that checkpoint, the task's prompts (the chat up to
   the assistant turn) with `answer`, reward `exact_match`, `--steps` steps of `--prompts` x `--group`
   samples, a checkpoint every `--eval-every` steps.
3. Held-out greedy exact match (`model.generation.generate`, the same check as SFT's eval) of the SFT
   checkpoint and of every GRPO checkpoint, on `--eval-records` records of another seed.

Writes bench/results/grpo_addition.json (per seed: held-out accuracy by step, reward and training
accuracy curves, wall times; mean and spread of the gain) and grpo_addition.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from twinpipe.bench.sft import make_task
from twinpipe.bench.sft import overrides as sft_overrides

RESULTS = Path(__file__).resolve().parent / "results"


def heldout_exact_match(checkpoint: Path, held: Path, max_new_tokens: int = 16) -> float:
    """Greedy exact match of a checkpoint on the held-out records (prompt: the chat up to the answer)."""
    import torch

    from twinpipe.data.chat import ChatTemplate, prompt_ids
    from twinpipe.data.records import RecordReader
    from twinpipe.model.generation import generate
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    model, tok = load_model_for_inference(checkpoint, torch.float32)
    template = ChatTemplate.for_tokenizer(tok)
    records = [r for _, r in RecordReader([str(held)])]
    prompts = [prompt_ids(r, template, tok) for r in records]
    outputs = generate(model, prompts, max_new_tokens, eos_id=tok.eos_id)
    hits = sum(tok.decode(o[:-1] if o and o[-1] == tok.eos_id else o).strip() == r.answer.strip()
               for o, r in zip(outputs, records))
    return hits / len(records)


def run_sft(args: argparse.Namespace, work: Path, train: Path, held: Path) -> Path:
    run_dir = work / "sft"
    done = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    if not done:
        sft_args = argparse.Namespace(steps=args.sft_steps, eval_every=0, eval_records=0, threads=args.threads)
        command = [sys.executable, "-m", "twinpipe.trainer", "--config-name", "sft",
                   *sft_overrides(sft_args, train, held, run_dir), "checkpoint.at_end=true"]
        subprocess.run(command, check=True)
        done = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    return done[-1].parent


def prompts_file(records: Path, out: Path) -> Path:
    """The task's records as GRPO prompts: the user turn, with the answer as a field."""
    with open(out, "w") as f:
        for line in records.read_text().splitlines():
            r = json.loads(line)
            f.write(json.dumps({"messages": r["messages"][:1], "answer": r["answer"]}) + "\n")
    return out


def run_grpo(args: argparse.Namespace, work: Path, sft: Path, prompts: Path, seed: int) -> tuple[Path, float]:
    run_dir = work / f"grpo-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no metrics or checkpoints of an earlier one
    command = [sys.executable, "-m", "twinpipe.trainer", "--config-name", "grpo", f"init_from={sft}",
               f"data.paths=[{prompts}]", f"run.dir={run_dir}", "resume=never", "model.vocab_size=512",
               f"train.seed={seed}", f"train.steps={args.steps}", f"train.global_batch={args.prompts * args.group}",
               f"train.micro_batch={args.prompts * args.group}", "train.seq_len=64", f"grpo.group_size={args.group}",
               "grpo.max_new_tokens=16", "grpo.reward=exact_match", f"optim.lr={args.lr}", "optim.warmup_steps=2",
               f"checkpoint.every={args.eval_every}", f"checkpoint.keep={args.steps}", "logging.wandb=disabled",
               "logging.progress=false", f"train.threads={args.threads}", f"data.cache_dir={work / 'cache'}"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return run_dir, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=60)  # ~44% held-out: room to improve
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-records", type=int, default=200)
    parser.add_argument("--train-records", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--digits", type=int, default=1, help="addends below 10**digits (bench/sft.py's task)")
    parser.add_argument("--work", default="runs/bench-grpo")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = make_task(work / "train.jsonl", args.train_records, seed=1, digits=args.digits)
    held = make_task(work / "heldout.jsonl", args.eval_records, seed=2, digits=args.digits)
    sft = run_sft(args, work, train, held)
    start_accuracy = heldout_exact_match(sft, held)
    prompts = prompts_file(train, work / "prompts.jsonl")
    seeds = {}
    for seed in args.seeds:
        run_dir, wall = run_grpo(args, work, sft, prompts, seed)
        accuracy = {0: start_accuracy}
        for ckpt in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])):
            accuracy[int(ckpt.name[5:])] = heldout_exact_match(ckpt, held)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        seeds[seed] = {"wall_s": round(wall, 1), "heldout_accuracy": accuracy,
                       "reward_mean": [r["reward_mean"] for r in rows], "accuracy": [r["accuracy"] for r in rows],
                       "rollout_tokens_per_s_median": statistics.median(r["rollout_tokens_per_s"] for r in rows),
                       "logprob_diff_max": max(r.get("logprob_diff_max", 0.0) for r in rows)}
    gains = [100 * (list(s["heldout_accuracy"].values())[-1] - start_accuracy) for s in seeds.values()]
    result = {"task": f"addition of numbers below 10**{args.digits} (bench/sft.py)", "sft_checkpoint": str(sft), "sft_steps": args.sft_steps,
              "heldout_start": start_accuracy, "gain_points_mean": statistics.mean(gains),
              "gain_points_spread": [min(gains), max(gains)], "seeds": seeds, "args": vars(args),
              "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_addition.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "grpo_addition.png")
    print(json.dumps({k: v for k, v in result.items() if k != "seeds"}))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, s in result["seeds"].items():
        axes[0].plot(range(1, len(s["reward_mean"]) + 1), s["reward_mean"], label=f"reward, seed {seed}")
        steps = [int(k) for k in s["heldout_accuracy"]]
        axes[1].plot(steps, list(s["heldout_accuracy"].values()), marker="o", label=f"held-out, seed {seed}")
    axes[0].set(xlabel="step", ylabel="reward (exact match)", title="GRPO training reward")
    axes[1].set(xlabel="step", ylabel="greedy exact match", title="held-out accuracy")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
