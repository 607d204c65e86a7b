"""The small GRPO recipe the GRPO tests run: a 512-token BPE with chat tokens, arithmetic prompts (string
and chat ones) with answers, and a dense reward the tiny model can learn in a few steps."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_module

from trainer_recipe import TINY
from twinpipe.trainer import config as recipe_config

recipe_config.register()

COMMON = "etaoin"


def common_letters(prompt, completion: str, **fields) -> float:
    """The share of the completion's characters among the six most common English letters."""
    return sum(c in COMMON for c in completion) / max(len(completion), 1)


def odd_answers_vary(prompt, completion: str, answer: str, **fields) -> float:
    """1 for an even answer (its groups are zero-std), else the parity of the completion's character
    codes (a group of 4 samples is mixed 7 times in 8): for dynamic sampling."""
    return 1.0 if int(answer) % 2 == 0 else float(sum(map(ord, completion)) % 2)


def prompt_record(i: int) -> dict:
    if i % 2:
        return {"prompt": f"{i} plus {i % 7} is", "answer": str(i + i % 7)}
    return {"messages": [{"role": "user", "content": f"{i} plus {i % 7}?"}], "answer": str(i + i % 7)}


def make_data(root: Path) -> Path:
    from twinpipe.data.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, corpus_sample, train_bpe

    train_bpe(corpus_sample(200_000), 512, SPECIAL_TOKENS + CHAT_TOKENS).save(root / "tok")
    (root / "prompts.jsonl").write_text("".join(json.dumps(prompt_record(i)) + "\n" for i in range(48)))
    return root


def grpo_cfg(data: Path, run_dir: Path, *overrides: str):
    """The grpo recipe on the TINY model: 4 prompts x 4 samples of 6 tokens per step."""
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose("grpo", overrides=[
            *TINY, f"data.tokenizer={data / 'tok'}", f"data.paths=[{data / 'prompts.jsonl'}]",
            f"data.cache_dir={data / 'cache'}", f"run.dir={run_dir}", "train.global_batch=16",
            "train.micro_batch=4", "grpo.group_size=4", "grpo.max_new_tokens=6", "train.init_std=0.05",
            "grpo.reward=[grpo_recipe:common_letters,exact_match]", "grpo.reward_weights=[1.0,0.5]",
            "checkpoint.every=0", "optim.decay=0", "optim.constant=0", *overrides])
    recipe_config.validate(cfg)
    return cfg
