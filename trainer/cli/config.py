"""The schemas and the Hydra launcher of `twinpipe-generate`, `twinpipe-eval` and `twinpipe-convert`.

`recipes/generate.yaml`, `eval.yaml` and `convert.yaml` name these schemas in their defaults lists,
so an unknown or misspelt key, or a value of the wrong type, fails at start-up with the key's name;
`check(cfg, tool)` then rejects keys added with `+key=value` (`config.reject_unknown_keys`, shared with
`twinpipe-train`) and names the required keys left unset and the values out of range. The tools
write nothing but their product: Hydra keeps the working directory and writes no `.hydra/` folder and
no log file (the recipes' `hydra:` sections), so `twinpipe-eval checkpoint=...` can run anywhere.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from twinpipe.model.hf import DEFAULT_MAX_SHARD_BYTES
from twinpipe.trainer.config import check_values, reject_unknown_keys, set_offline_defaults, user_errors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InferenceParallelSchema:
    """The layout the tools run under (world = pp x dp; dp = world size / pp, prompts split over it)."""

    pp: int = 1  # pipeline ranks (launch pp x dp processes with launch/torchrun.sh)
    ep: int = 1  # expert-parallel ranks within the data-parallel ones (divides dp)
    schedule: str = "1f1b"  # dualpipe | dualpipev | 1f1b: which stages each pipeline rank holds
    backend: str = "auto"  # auto | gloo | nccl


@dataclass
class GenerateSchema:
    checkpoint: str = MISSING  # a checkpoints/step_N folder, a run dir (its newest checkpoint) or an HF folder
    prompts: List[str] = MISSING  # one continuation per prompt, decoded as a batch
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    speculative: bool = False  # draft with the MTP layer (needs num_nextn_predict_layers >= 1)
    dtype: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda
    parallel: InferenceParallelSchema = field(default_factory=InferenceParallelSchema)


@dataclass
class EvalSchema:
    checkpoint: str = MISSING
    text_file: Optional[str] = None  # None: the held-out split of the embedded corpus
    seq_len: int = 512  # context per window (windows overlap by one token: each token scored once)
    batch_size: int = 8  # windows per forward
    max_tokens: Optional[int] = None  # score only the first max_tokens tokens of the text (None: all)
    dtype: str = "fp32"  # fp32 | bf16
    ema: bool = False  # the checkpoint's EMA of the weights (a run with train.ema_decay > 0)
    device: str = "auto"  # auto | cpu | cuda
    output: Optional[str] = None  # also write the result JSON here
    harness: bool = False  # run lm-evaluation-harness `tasks` instead of perplexity
    tasks: List[str] = field(default_factory=list)  # lm-eval task names (with harness=true)
    include_path: Optional[str] = None  # a folder of lm-eval task YAMLs of your own (local data files)
    limit: Optional[int] = None  # documents per task (None: all)
    num_fewshot: Optional[int] = None
    max_new_tokens: int = 256  # generate_until's cap when a task sets none
    parallel: InferenceParallelSchema = field(default_factory=InferenceParallelSchema)


@dataclass
class ConvertSchema:
    src: str = MISSING  # an HF folder (has config.json) or a twinpipe checkpoint / run dir
    dst: str = MISSING  # written to a temporary folder, renamed when complete
    to: str = "hf"  # hf | hf-fp8 (projections and experts block-quantized, 128x128 scales)
    dtype: str = "bf16"  # bf16 | fp16 | fp32: storage dtype of the tensors not in FP8
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 2**30
    overwrite: bool = False  # replace dst if it exists


@dataclass(frozen=True)
class Rules:
    """What `check` verifies beyond the types: an example command line for the required keys,
    the allowed values of string keys and the numbers that must be > 0 or >= 0 (when set)."""

    usage: str
    choices: dict[str, tuple[str, ...]]
    positive: tuple[str, ...] = ()
    non_negative: tuple[str, ...] = ()


_INFERENCE_CHOICES = {"dtype": ("fp32", "bf16"), "device": ("auto", "cpu", "cuda"),
                      "parallel.schedule": ("dualpipe", "dualpipev", "1f1b"),
                      "parallel.backend": ("auto", "gloo", "nccl")}
_PARALLEL = ("parallel.pp", "parallel.ep")
RULES = {
    "generate": Rules("twinpipe-generate checkpoint=runs/try1 'prompts=[\"def main(\"]'", _INFERENCE_CHOICES,
                      positive=("max_new_tokens", "top_p", *_PARALLEL), non_negative=("temperature",)),
    "eval": Rules("twinpipe-eval checkpoint=runs/try1", _INFERENCE_CHOICES,
                  positive=("seq_len", "batch_size", "max_tokens", "limit", "max_new_tokens", *_PARALLEL),
                  non_negative=("num_fewshot",)),
    "convert": Rules("twinpipe-convert src=runs/try1 dst=out/hf to=hf",
                     {"to": ("hf", "hf-fp8"), "dtype": ("bf16", "fp16", "fp32")}, positive=("max_shard_gb",)),
}
SCHEMAS = {"generate": GenerateSchema, "eval": EvalSchema, "convert": ConvertSchema}


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (before Hydra composes a tool's recipe)."""
    cs = ConfigStore.instance()
    for tool, schema in SCHEMAS.items():
        cs.store(name=f"{tool}_schema", node=schema)


def check(cfg: DictConfig, tool: str) -> None:
    """Raise ValueError naming a required key left unset, or the key, the value and what is allowed."""
    rules = RULES[tool]
    reject_unknown_keys(cfg, f"twinpipe-{tool}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{' and '.join(missing)} not set (??? in recipes/{tool}.yaml): required, "
                         f"e.g. {rules.usage}")
    check_values(cfg, rules.choices, rules.positive, rules.non_negative)


def device_of(name: str) -> torch.device:
    """`device=auto|cpu|cuda` as a torch device (auto: cuda when there is one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda: no CUDA device here; use device=cpu or device=auto")
    return torch.device(name)


def load_for_inference(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, grid) from `cfg.checkpoint` (any saved layout): the process grid of
    `cfg.parallel` (joined from torchrun's environment; one process: all sizes 1) and this rank's part
    of the model under it (`parallelize`: pipeline stages, expert slots) in `cfg.dtype` on `cfg.device`."""
    from twinpipe.parallel.grid import build_grid, init_distributed
    from twinpipe.parallel.parallelize import parallelize
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    device = device_of(cfg.device)
    if not Path(cfg.checkpoint).is_dir():
        raise ValueError(f"checkpoint={cfg.checkpoint}: no such folder (a checkpoints/step_N folder, a run "
                         "dir or an HF folder)")
    init_distributed(cfg.parallel.backend)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    grid = build_grid(cfg.parallel.pp, max(1, world // cfg.parallel.pp), cfg.parallel.ep)
    model, tokenizer = load_model_for_inference(cfg.checkpoint, DTYPES[cfg.dtype], ema=bool(cfg.get("ema", False)))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"checkpoint={cfg.checkpoint}: its tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {model.config.vocab_size} (tokenizer of another model?)")
    return parallelize(model, grid, device, cfg.parallel.schedule).eval(), tokenizer, grid


def launch(tool: str, task: Callable[[DictConfig], Any], argv: list[str] | None = None) -> None:
    """Compose `recipes/<tool>.yaml` with Hydra's command line (`argv`, else `sys.argv[1:]`; `--help`
    and `--cfg job` work as usual) and run `task(cfg)`. A ValueError or OSError of the task (a bad
    value, a missing file, a broken checkpoint) ends the program with `twinpipe-<tool>: <message>` and
    exit status 1; HYDRA_FULL_ERROR=1 shows its traceback instead."""
    set_offline_defaults()
    register()

    def run_task(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        with user_errors(f"twinpipe-{tool}", ValueError, OSError):
            task(cfg)

    entry = hydra.main(config_path="pkg://twinpipe.recipes", config_name=tool, version_base=None)(run_task)
    saved = sys.argv
    if argv is not None:
        sys.argv = [f"twinpipe-{tool}", *argv]
    try:
        entry()
    finally:
        sys.argv = saved
