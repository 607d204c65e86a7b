"""Rollout logprobs against the training forward's, in fp32, bf16 and FP8: GRPO's `logprob_diff_max`.

The rollout records each sampled token's logprob from the latent-cache decode (`model.generation.
generate`, eval mode); the first update recomputes it with the training forward (`forward_train`, the
loss's chunked log-softmax) on the same tokens and weights. In exact arithmetic they are equal; this
measures how far apart rounding puts them, per precision:

    fp32                 train.dtype=fp32 (the test asserts <= 1e-5)
    bf16                 train.dtype=bf16 (autocast on both sides; master weights fp32)
    fp8 (+bf16)          fp8.backend=emulate (the training GEMMs in FP8, emulated on CPU) with bf16

and, in fp32, why a bench seed reached 3.1e-5: the decode's attention form (`absorb`: None = the
default, absorbed latent attention for decode steps; True; False = the naive form the training forward
uses), and the error against each token's logprob (a rare token's logprob is a large negative number,
so its rounding is larger in absolute terms: the table gives diffs in units of the fp32 spacing of the
value, `ulps`).

    python bench/grpo_logprobs.py --checkpoint runs/bench-grpo/grpo-seed0/checkpoints/step_50 \\
        --prompts runs/bench-grpo/prompts.jsonl [--resume-to 60]

`--resume-to N` also re-runs the bench's GRPO steps from that checkpoint to step N (a copy of the run
resumed from it: the same rollouts and updates), once as the recipe runs (absorbed decode) and once
with the rollout's decode in the naive form (`absorb=False`; from the first step on the sampled tokens
differ, so it is another sample of the same steps), and records each step's `logprob_diff_max`.

Writes bench/results/grpo_logprobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BINS = [(0.0, 1.0), (1.0, 4.0), (4.0, 8.0), (8.0, 16.0), (16.0, float("inf"))]  # -logp ranges


def build(checkpoint: str, prompts: str, dtype: str, fp8: str, seq_len: int):
    from hydra import compose, initialize_config_module

    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.trainer import config as recipe_config
    from twinpipe.trainer.build import build_model
    from twinpipe.trainer.checkpoint.init_from import tokenizer_path

    recipe_config.register()
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose("grpo", overrides=[
            f"init_from={checkpoint}", f"data.paths=[{prompts}]", "model.vocab_size=512",
            f"train.seq_len={seq_len}", f"train.dtype={dtype}", f"fp8.backend={fp8}",
            f"data.tokenizer={tokenizer_path(checkpoint)}", "logging.wandb=disabled"])
    recipe_config.validate(cfg)
    return cfg, build_model(cfg, torch.device("cpu")), load_tokenizer(cfg.data.tokenizer)


def measure(cfg, model, tokenizer, num_prompts: int, group: int, max_new_tokens: int, seed: int,
            absorb: bool | None) -> dict:
    """Roll out num_prompts x group sequences, recompute the logprobs with the training forward."""
    from twinpipe.data.prompts import load_prompts
    from twinpipe.model.generation import generate
    from twinpipe.parallel.pipeline.runner import autocast_context
    from twinpipe.trainer.grpo.loss import GRPOLoss
    from twinpipe.trainer.loss import IGNORE_INDEX

    device = torch.device("cpu")
    records = load_prompts(list(cfg.data.paths), tokenizer, cfg.train.seq_len - max_new_tokens)[:num_prompts]
    prompts = [r.ids for r in records for _ in range(group)]
    model.eval()
    with torch.no_grad(), autocast_context(cfg.train.dtype, device):
        new, logps = generate(model, prompts, max_new_tokens, 1.0, 1.0, tokenizer.eos_id, seed=seed,
                              rows=list(range(len(prompts))), logprobs=True, absorb=absorb)
    n, T = len(prompts), cfg.train.seq_len
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    input_ids = torch.full((n, T), pad, dtype=torch.long)
    labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(n, T)
    for b, (p, c, lp) in enumerate(zip(prompts, new, logps)):
        a, m = len(p), len(c)
        input_ids[b, :a + m] = torch.tensor(p + c)
        labels[b, a - 1: a + m - 1] = torch.tensor(c)
        old[b, a - 1: a + m - 1] = torch.tensor(lp)
    loss = GRPOLoss(temperature=1.0, max_new_tokens=max_new_tokens)
    model.train()
    got = []
    with torch.no_grad(), autocast_context(cfg.train.dtype, device):
        for i in range(0, n, 16):
            output = model.forward_train(input_ids[i:i + 16])
            logp, _ = loss.logprobs_and_entropy(output, labels[i:i + 16].clamp(min=0))
            got.append(logp.float())
    logp = torch.cat(got)                                                           # [n, T]
    used = labels != IGNORE_INDEX
    diff = (logp - old).abs()[used]                                                 # [tokens]
    value = old[used]
    ulps = diff / torch.finfo(torch.float32).eps / value.abs().clamp(min=2.0 ** -126).float()
    position = torch.arange(T).expand(n, T)[used]
    at = int(diff.argmax())
    per_bin = {}
    for lo, hi in BINS:
        sel = (-value >= lo) & (-value < hi)
        if sel.any():
            per_bin[f"{lo:g}..{hi:g}"] = {"tokens": int(sel.sum()), "diff_max": float(diff[sel].max()),
                                         "diff_mean": float(diff[sel].mean()), "ulps_max": float(ulps[sel].max())}
    return {"tokens": int(used.sum()),
            "logprob_diff_max": float(diff.max()), "logprob_diff_p99": float(diff.quantile(0.99)),
            "logprob_diff_mean": float(diff.mean()), "ulps_max": float(ulps.max()),
            "at_max": {"logprob": float(value[at]), "position": int(position[at]), "ulps": float(ulps[at])},
            "by_minus_logprob": per_bin}


def resumed_steps(checkpoint: str, to_step: int, absorb: bool | None, work: Path) -> dict[int, float]:
    """`logprob_diff_max` of each step after `checkpoint` up to `to_step`, the bench run resumed from it."""
    import functools
    import shutil

    from omegaconf import OmegaConf

    from twinpipe.trainer import config as recipe_config
    from twinpipe.trainer.grpo import rollout
    from twinpipe.trainer.metrics import read_metrics
    from twinpipe.trainer.train import run

    source = Path(checkpoint)
    run_dir = work / f"resumed-absorb-{absorb}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source, run_dir / "checkpoints" / source.name)
    recipe_config.register()
    from twinpipe.trainer.grpo.config import GRPORecipeSchema

    # the run's saved recipe over the schema (keys added since it was written take their defaults)
    cfg = OmegaConf.merge(OmegaConf.structured(GRPORecipeSchema), OmegaConf.load(source / "config.yaml"))
    cfg.run.dir, cfg.resume, cfg.train.steps = str(run_dir), "auto", to_step
    cfg.checkpoint.every, cfg.checkpoint.at_end, cfg.logging.progress = 0, False, False
    plain = rollout.generate
    rollout.generate = functools.partial(plain, absorb=absorb)
    try:
        run(cfg)
    finally:
        rollout.generate = plain
    return {r["step"]: r["logprob_diff_max"] for r in read_metrics(run_dir)}


def resumed(args: argparse.Namespace) -> dict:
    out = {}
    for absorb in (None, False):
        steps = resumed_steps(args.checkpoint, args.resume_to, absorb, Path(args.work))
        out[f"absorb={absorb}"] = {"logprob_diff_max": max(steps.values()), "by_step": steps}
        print(f"resumed to step {args.resume_to}, absorb={absorb}: logprob_diff_max by step {steps}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-grpo/grpo-seed0/checkpoints/step_50")
    parser.add_argument("--prompts", default="runs/bench-grpo/prompts.jsonl")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume-to", type=int, default=0, help="also re-run the bench's steps up to this one")
    parser.add_argument("--work", default="runs/bench-grpo-logprobs")
    parser.add_argument("--resume-only", action="store_true",
                        help="only the --resume-to part, added to the existing JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.resume_only:
        out = json.loads((RESULTS / "grpo_logprobs.json").read_text())
        out["resumed_steps"] = resumed(args)
        out["command_resumed"] = " ".join(sys.argv)
        (RESULTS / "grpo_logprobs.json").write_text(json.dumps(out, indent=2))
        return
    cases = [("fp32", "fp32", "off", None), ("fp32 absorb=True", "fp32", "off", True),
             ("fp32 absorb=False", "fp32", "off", False), ("bf16", "bf16", "off", None),
             ("fp8+bf16", "bf16", "emulate", None), ("fp8+fp32", "fp32", "emulate", None)]
    results = {}
    for name, dtype, fp8, absorb in cases:
        cfg, model, tokenizer = build(args.checkpoint, args.prompts, dtype, fp8, 64)
        runs = [measure(cfg, model, tokenizer, args.num_prompts, args.group, args.max_new_tokens, seed, absorb)
                for seed in args.seeds]
        worst = max(runs, key=lambda r: r["logprob_diff_max"])
        results[name] = {"train.dtype": dtype, "fp8.backend": fp8, "absorb": absorb,
                         "tokens": sum(r["tokens"] for r in runs),
                         "logprob_diff_max": worst["logprob_diff_max"],
                         "logprob_diff_p99_max": max(r["logprob_diff_p99"] for r in runs),
                         "logprob_diff_mean": sum(r["logprob_diff_mean"] * r["tokens"] for r in runs)
                         / sum(r["tokens"] for r in runs), "runs": runs}
        print(f"{name:18s} tokens {results[name]['tokens']:5d}  max {worst['logprob_diff_max']:.3g}  "
              f"p99 {results[name]['logprob_diff_p99_max']:.3g}  at logp {worst['at_max']['logprob']:.3g} "
              f"({worst['at_max']['ulps']:.0f} ulps)", flush=True)
    out = {"checkpoint": args.checkpoint, "resumed_steps": resumed(args) if args.resume_to else {}, "sequences_per_seed": args.num_prompts * args.group,
           "seeds": args.seeds, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "cases": results,
           "torch": torch.__version__, "load_average_1min": os.getloadavg()[0], "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_logprobs.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
