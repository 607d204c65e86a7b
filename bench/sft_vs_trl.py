"""twinpipe SFT against TRL's `SFTTrainer` on the same model, data, tokenizer, template and settings.

Set-up (CPU, fp32, 2 threads each): the `tiny` preset with a 512-token vocabulary, no MTP layer (HF's
DeepseekV3ForCausalLM has none) and no balance loss (HF trains without one), initialised with seed 0 and
written once with `save_hf` (fp32); both runs start from that folder (`init_from` for twinpipe,
`from_pretrained` for TRL) and its tokenizer (our chat BPE with DeepSeek-V3's template, whose
`{% generation %}` marks TRL's `assistant_only_loss` reads). Data: the addition records of
`bench/sft.py` (two digits), one conversation per row (`data.packing=pad`; TRL: no packing, padding). The rows TRL
sees are the ones twinpipe's loader picks, in that order (a sequential sampler), so step n is the same
batch for both. AdamW lr 1e-3 constant (no warmup), betas (0.9, 0.95), eps 1e-8, no weight decay (the
two trainers decay different parameter sets), clip 1.0, router bias frozen (`balance.gamma=0`; HF does
not update it); loss = CE summed over assistant tokens (and their end token) / their count.

    pip install -e '.[bench]'; python bench/sft_vs_trl.py

Writes bench/results/sft_vs_trl.json (first-step losses and their difference, which must be < 1e-4;
50-step losses; tokens/s of both, counting the non-padding tokens of each batch) and sft_vs_trl.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from twinpipe.bench.sft import RESULTS, make_task  # the same generated task

MODEL = {"vocab_size": 512, "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.0}


def prepare(work: Path, records: int) -> tuple[Path, Path]:
    """The task file and the HF folder (model + tokenizer with the chat template) both runs start from."""
    from twinpipe.data.chat import DEEPSEEK_V3_TEMPLATE
    from twinpipe.data.tokenizer import default_tokenizer
    from twinpipe.model import save_hf
    from twinpipe.model.config import ModelConfig
    from twinpipe.model.transformer import Transformer

    data = make_task(work / "train.jsonl", records, seed=1, digits=2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", **MODEL))
    folder = save_hf(model, work / "init", dtype=torch.float32, overwrite=True)
    tokenizer = default_tokenizer(MODEL["vocab_size"], work / "cache", chat=True)
    tokenizer.chat_template = DEEPSEEK_V3_TEMPLATE
    tokenizer.save(folder)
    return data, folder


def run_twinpipe(args: argparse.Namespace, data: Path, folder: Path, run_dir: Path) -> list[dict]:
    command = [sys.executable, "-m", "twinpipe.trainer", "--config-name", "sft", f"init_from={folder}",
               f"data.paths=[{data}]", f"run.dir={run_dir}", "resume=never", "data.packing=pad",
               "data.heldout_percent=0", "eval.every=0", f"data.cache_dir={run_dir.parent / 'cache'}",
               "model.vocab_size=512", "model.num_nextn_predict_layers=0", "+model.extra.aux_loss_alpha=0.0",
               f"train.steps={args.steps}",
               f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}",
               f"train.seq_len={args.seq_len}", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.decay=0",
               "optim.constant=1e9", "optim.weight_decay=0", "train.grad_clip=1.0", "balance.gamma=0",
               "loss.mtp_lambda=0", "checkpoint.every=0", "checkpoint.at_end=false",
               "logging.wandb=disabled", "logging.progress=false", "logging.plots=false",
               f"train.threads={args.threads}"]
    subprocess.run(command, check=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def twinpipe_rows(args: argparse.Namespace, data: Path, folder: Path, cache: Path) -> tuple[list[int], list[int]]:
    """The records twinpipe's loader trains on, in order, and each one's token count."""
    from twinpipe.data.build import sft_dataset
    from twinpipe.data.loader import PackedLoader
    from twinpipe.data.tokenizer import load_tokenizer

    cfg = {"paths": [str(data)], "packing": "pad", "cache_dir": str(cache)}
    dataset = sft_dataset(cfg, load_tokenizer(folder), "train", args.seq_len)
    order = PackedLoader(dataset, args.batch, args.batch, seed=0).sample_indices(0, args.steps * args.batch)
    examples = [int(dataset.kept[row]) for row in order]  # pad packing: row r holds example kept[r]
    lengths = [len(dataset.examples.example(i)[0]) for i in examples]
    return examples, lengths


def run_trl(args: argparse.Namespace, records: list[dict], folder: Path, out: Path) -> tuple[list[float], float]:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                       max_grad_norm=1.0, max_length=args.seq_len, assistant_only_loss=True, packing=False,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                       dataloader_drop_last=True, bf16=False, fp16=False)
    timer = StepTimes()
    trainer = InOrder(model=model, args=config, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list([{"messages": r["messages"]} for r in records]),
                      callbacks=[timer])
    trainer.train()
    return timer.losses, sum(timer.times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/bench-sft-vs-trl")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data, folder = prepare(work, args.records)
    ours = run_twinpipe(args, data, folder, work / f"twinpipe-{int(time.time())}")
    order, lengths = twinpipe_rows(args, data, folder, work / "cache")
    all_records = [json.loads(line) for line in data.read_text().splitlines()]
    trl_losses, trl_seconds = run_trl(args, [all_records[i] for i in order], folder, work / "trl")
    ours_losses = [r["lm_loss"] for r in ours]
    ours_seconds = sum(args.batch * args.seq_len / r["tokens_per_s"] for r in ours[1:])
    real_tokens = sum(lengths[args.batch:])  # steps 2..n (the first step warms up both)
    result = {
        "model": "tiny, vocab 512, no MTP, fp32", "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "threads": args.threads, "torch": torch.__version__,
        "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
        "first_step_loss": {"twinpipe": ours_losses[0], "trl": trl_losses[0]},
        "first_step_abs_diff": abs(ours_losses[0] - trl_losses[0]),
        "max_abs_diff_50_steps": max(abs(a - b) for a, b in zip(ours_losses, trl_losses)),
        "tokens_per_s": {"twinpipe": real_tokens / ours_seconds, "trl": real_tokens / trl_seconds},
        "tokens_counted": "non-padding tokens of steps 2..n over their step time",
        "losses": {"twinpipe": ours_losses, "trl": trl_losses},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sft_vs_trl.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "sft_vs_trl.png")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(result["losses"].items(), ("-", "--")):
        ax.plot(range(1, len(losses) + 1), losses, style, label=f"{name} ({result['tokens_per_s'][name]:.0f} tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"SFT, same model/data/settings: first-step |diff| {result['first_step_abs_diff']:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
