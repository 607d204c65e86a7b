"""twinpipe GRPO against TRL's `GRPOTrainer` on the same exported model, task, reward and settings.

Set-up (CPU, fp32, `--threads` each): the SFT benchmark's checkpoint (`bench/grpo.py`'s SFT stage on
`bench/sft.py`'s addition task, run here unless `--sft` names one) written once with `save_hf` (fp32)
with its tokenizer and chat template; both runs start from that folder (`init_from` for twinpipe,
`from_pretrained` for TRL, whose DeepseekV3ForCausalLM ignores the MTP layer GRPO does not train).
Prompts: the task's user turns with `answer`, rendered by the same chat template with the generation
prompt (the JSON says whether both tokenise the first prompt to the same ids). Reward: twinpipe's
`exact_match` in both. Hyperparameters, both: `--prompts` x `--group` completions per step, one
update per rollout (mu = 1), at most `--max-new-tokens` new tokens, temperature 1, top_p 1, clip
[1 - 0.2, 1 + 0.28], beta 0 (no reference), token-mean loss (TRL `dapo`), group-scaled advantages,
AdamW lr `--lr` constant (no warmup), betas (0.9, 0.95), eps 1e-8, no weight decay, clip 1.0, router
bias frozen (`balance.gamma=0`; HF does not update it). Prompt order differs (each trainer shuffles its
own way): the reward curves are two samples of the same process, not the same numbers.

Rollout tokens/s: completion tokens (eos included) of a step's rollout over the time spent generating
them — twinpipe's `rollout_s` (latent-cache decode through `model.generation.generate`), TRL's
`_generate_single_turn` (transformers' `generate`, KV cache); the median over steps 2..n (a step
descheduled on a shared machine takes seconds instead of tens of milliseconds, so the total over all
steps, also recorded, measures the load more than the generator). The load average is recorded. A third run, twinpipe with
`grpo.speculative=true` (the MTP layer drafts, exact by rejection), gives the acceptance rate and the
rollout speed-up over the plain twinpipe run (its reward curve is a third sample of the same process).

    pip install -e '.[bench]'; python bench/grpo_vs_trl.py
    python bench/grpo_vs_trl.py --sft-steps 5 --steps 2 --prompts 2 --group 2   # a smoke run

Writes bench/results/grpo_vs_trl.json (reward and accuracy curves, rollout tokens/s and step times of
both, the settings) and grpo_vs_trl.png (reward curves side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from twinpipe.bench.grpo import prompts_file, run_sft
from twinpipe.bench.sft import RESULTS, make_task

LOSS_AGG = "token_mean"  # = TRL's loss_type "dapo": sum over tokens / tokens of the whole batch
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def export(sft: Path, folder: Path) -> Path:
    """The SFT checkpoint as an HF folder (fp32) with its tokenizer and chat template."""
    from twinpipe.data.chat import DEEPSEEK_V3_TEMPLATE
    from twinpipe.model import save_hf
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    model, tokenizer = load_model_for_inference(sft, torch.float32)
    save_hf(model, folder, dtype=torch.float32, overwrite=True)
    tokenizer.chat_template = tokenizer.chat_template or DEEPSEEK_V3_TEMPLATE
    tokenizer.save(folder)
    return folder


def run_twinpipe(args: argparse.Namespace, folder: Path, prompts: Path, run_dir: Path,
                 *extra: str) -> list[dict]:
    n = args.prompts * args.group
    command = [sys.executable, "-m", "twinpipe.trainer", "--config-name", "grpo", f"init_from={folder}",
               f"data.paths=[{prompts}]", f"run.dir={run_dir}", "resume=never", "model.vocab_size=512",
               f"train.steps={args.steps}", f"train.global_batch={n}", f"train.micro_batch={n}",
               "train.seq_len=64", f"grpo.group_size={args.group}", f"grpo.max_new_tokens={args.max_new_tokens}",
               "grpo.reward=exact_match", "grpo.temperature=1.0", "grpo.top_p=1.0", "grpo.beta=0",
               f"grpo.clip_low={CLIP_LOW}", f"grpo.clip_high={CLIP_HIGH}", f"grpo.loss_agg={LOSS_AGG}",
               "grpo.scale_rewards=group", "grpo.updates_per_rollout=1", f"optim.lr={args.lr}",
               f"optim.min_lr={args.lr}", "optim.warmup_steps=0", "optim.decay=0", "optim.constant=1e9",
               "optim.weight_decay=0", "train.grad_clip=1.0", "balance.gamma=0", "checkpoint.every=0",
               "checkpoint.at_end=false", "logging.wandb=disabled", "logging.progress=false",
               "logging.plots=false", f"train.threads={args.threads}", f"data.cache_dir={run_dir.parent / 'cache'}",
               *extra]
    subprocess.run(command, check=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_trl(args: argparse.Namespace, folder: Path, prompts: Path, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from twinpipe.trainer.grpo.rewards import exact_match

    class TimedRollouts(GRPOTrainer):
        """Times transformers' generate and counts the completion tokens it returned (eos included)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.rollouts: list[tuple[float, int]] = []

        def _generate_single_turn(self, *a, **k):
            start = time.perf_counter()
            result = super()._generate_single_turn(*a, **k)
            self.rollouts.append((time.perf_counter() - start, sum(len(c) for c in result[0])))
            return result

    class Log(TrainerCallback):
        def __init__(self):
            self.rows: list[dict] = []
            self.step_s: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                self.rows.append(dict(logs))

    def reward(prompts, completions, answer, **_):
        return [exact_match(p, c[0]["content"] if isinstance(c, list) else c, a)
                for p, c, a in zip(prompts, completions, answer)]

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in records])
    n = args.prompts * args.group
    config = GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=n,
                        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
                        num_generations=args.group, max_completion_length=args.max_new_tokens,
                        temperature=1.0, top_p=1.0, beta=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
                        loss_type="dapo", scale_rewards="group", learning_rate=args.lr,
                        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1, report_to=[],
                        save_strategy="no", use_cpu=True, seed=0, bf16=False, fp16=False)
    log = Log()
    trainer = TimedRollouts(model=model, args=config, processing_class=tokenizer, reward_funcs=reward,
                            train_dataset=dataset, callbacks=[log])
    trainer.train()
    return {"rows": log.rows, "step_s": log.step_s, "rollouts": trainer.rollouts,
            "first_prompt_ids": tokenizer.apply_chat_template(records[0]["messages"], add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)}


def twinpipe_first_prompt(folder: Path, prompts: Path) -> list[int]:
    from twinpipe.data.prompts import load_prompts
    from twinpipe.data.records import Fields
    from twinpipe.data.tokenizer import load_tokenizer

    return load_prompts([str(prompts)], load_tokenizer(folder), 64, Fields())[0].ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", default=None, help="a twinpipe SFT checkpoint (default: train one in --work)")
    parser.add_argument("--sft-steps", type=int, default=60)  # bench/grpo.py's start (26% held-out)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)  # bench/grpo.py's
    parser.add_argument("--train-records", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--digits", type=int, default=1, help="addends below 10**digits (bench/sft.py's task)")
    parser.add_argument("--work", default="runs/bench-grpo-vs-trl")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    train = make_task(work / "train.jsonl", args.train_records, seed=1, digits=args.digits)
    held = make_task(work / "heldout.jsonl", 200, seed=2, digits=args.digits)
    sft = Path(args.sft) if args.sft else run_sft(args, work, train, held)
    folder = export(sft, work / "hf")
    prompts = prompts_file(train, work / "prompts.jsonl")
    ours = run_twinpipe(args, folder, prompts, work / f"twinpipe-{int(time.time())}")
    spec = run_twinpipe(args, folder, prompts, work / f"twinpipe-speculative-{int(time.time())}",
                        "grpo.speculative=true")
    trl = run_trl(args, folder, prompts, work / "trl")
    n = args.prompts * args.group

    def tokens_per_s(rows: list[dict]) -> float:
        return statistics.median(r["response_length_mean"] * n / max(r["rollout_s"], 1e-9) for r in rows[1:])

    def total_tokens_per_s(rows: list[dict]) -> float:
        return sum(r["response_length_mean"] * n for r in rows[1:]) / max(sum(r["rollout_s"] for r in rows[1:]), 1e-9)

    trl_rows = [{"rollout_s": seconds, "response_length_mean": tokens / n} for seconds, tokens in trl["rollouts"]]
    result = {
        "model": f"SFT checkpoint {sft} exported to {folder} (fp32)", "steps": args.steps,
        "completions_per_step": n, "args": vars(args), "torch": torch.__version__,
        "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
        "first_prompt_ids_equal": twinpipe_first_prompt(folder, prompts) == list(trl["first_prompt_ids"]),
        "rollout_tokens_per_s": {"twinpipe": tokens_per_s(ours), "trl": tokens_per_s(trl_rows),
                                 "twinpipe_speculative": tokens_per_s(spec)},
        "rollout_tokens_per_s_total": {"twinpipe": total_tokens_per_s(ours), "trl": total_tokens_per_s(trl_rows),
                                       "twinpipe_speculative": total_tokens_per_s(spec)},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "speculative_acceptance_mean": statistics.mean(r["speculative_acceptance"] for r in spec),
        "speculative_speedup": tokens_per_s(spec) / tokens_per_s(ours),
        "rollout_tokens_counted": "median over steps 2..n of a step's completion tokens (eos included) over "
                                  "its generation time; _total: all of them over all the time",
        "step_s_median": {"twinpipe": statistics.median(r["rollout_s"] + r["update_s"] for r in ours),
                          "trl": statistics.median(trl["step_s"])},
        "reward_mean": {"twinpipe": [r["reward_mean"] for r in ours], "trl": [r["reward"] for r in trl["rows"]],
                        "twinpipe_speculative": [r["reward_mean"] for r in spec]},
        "response_length_mean": {"twinpipe": [r["response_length_mean"] for r in ours],
                                 "trl": [r.get("completions/mean_length") for r in trl["rows"]]},
        "rollout_s": {"twinpipe": [r["rollout_s"] for r in ours], "trl": [r["rollout_s"] for r in trl_rows],
                      "twinpipe_speculative": [r["rollout_s"] for r in spec]},
        "command": " ".join(sys.argv),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_vs_trl.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "grpo_vs_trl.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("reward_mean", "response_length_mean", "rollout_s")},
                     indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["reward_mean"])  # twinpipe, trl, twinpipe_speculative
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True)
    for ax, name in zip(axes, names):
        rewards = result["reward_mean"][name]
        ax.plot(range(1, len(rewards) + 1), rewards, marker=".")
        ax.set(xlabel="step", title=f"{name}: {result['rollout_tokens_per_s'][name]:.0f} rollout tok/s")
    axes[0].set_ylabel("mean reward (exact match)")
    fig.suptitle(f"GRPO, same model/task/reward/settings ({result['completions_per_step']} completions per step)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
