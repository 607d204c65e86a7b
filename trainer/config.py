"""The recipe schema: dataclasses registered with Hydra's ConfigStore, plus the checks types cannot say.

`recipes/pretrain.yaml` names these schemas in its defaults list, so OmegaConf rejects an unknown key
or a value of the wrong type at start-up with the key's full name; `validate(cfg)` then rejects the
keys Hydra's `+key=value` added past the schema (`reject_unknown_keys`, shared with the other command
lines), checks ranges and choices and raises `ValueError("<key>=<value>: <what is allowed>")`.
`set_offline_defaults` is the other piece of start-up every command line shares.

Sections: `model` (a preset of `ModelConfig` plus optional field overrides), `data`, `optim` (AdamW and
the LR schedule), `parallel`, `fp8`, `train`, `loss`, `balance`, `eplb`, `run`, `logging`, `checkpoint`,
and the top-level `resume`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterator, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelSchema:
    """`ModelConfig.preset(preset)` with the non-null fields below (HF `DeepseekV3Config` names) replaced."""

    preset: str = MISSING  # tiny | small | v3_671b
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    intermediate_size: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    n_routed_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    n_shared_experts: Optional[int] = None
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    first_k_dense_replace: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_nextn_predict_layers: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    freeze_router: bool = False  # keep the gate weights fixed (the bias still follows balance.gamma)
    # any other ModelConfig field, e.g. `+model.extra.rope_theta=50000`
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSchema:
    source: str = "embedded"  # embedded (the interpreter's standard-library sources) | files
    paths: List[str] = field(default_factory=list)  # source=files: files or folders (txt, jsonl, parquet...)
    text_field: str = "text"  # source=files: the field holding the text in json/parquet records
    heldout_percent: int = 1  # source=files: documents held out for evaluation (by content hash)
    # "default" trains (once, cached) the byte-level BPE on the embedded corpus with model.vocab_size;
    # otherwise a tokenizer.json file or an HF tokenizer folder.
    tokenizer: str = "default"
    # true: resume / init_from even when data.tokenizer is not the checkpoint's (its ids then mean other
    # tokens; trainer/checkpoint/tokenizer_match.py); false: that is a one-line error
    accept_tokenizer: bool = False
    cache_dir: str = "runs/.cache"
    streaming: bool = False  # source=files / SFT: read files through datasets' streaming mode
    # pretraining: concat (documents cut across samples) | pad (whole documents, padded);
    # SFT: pack (conversations side by side, positions restarting) | pad (one per row)
    packing: str = "concat"
    reset_position_ids: bool = False  # pretraining: positions (and attention) restart after each eos
    # SFT records (twinpipe.data.records): format auto | messages | prompt_completion | text
    format: str = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    answer_field: str = "answer"  # a reference answer for eval's exact match (optional)
    on_bad_record: str = "error"  # error (names file:line) | skip (counted)
    overlong: str = "truncate"  # SFT: a conversation longer than train.seq_len: truncate | drop


@dataclass
class OptimSchema:
    lr: float = 2.2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    moment_dtype: str = "fp32"  # fp32 | bf16 (DeepSeek keeps AdamW moments in BF16)
    # fp32 | bf16: the model's parameters; bf16 stores them in BF16 with FP32 master weights and FP32
    # gradients in the optimizer (DeepSeek-V3's mixed precision; trainer/optim/zero.py), needs
    # train.dtype=bf16
    param_dtype: str = "fp32"
    zero: str = "ours"  # ours | deepspeed: who partitions the optimizer state over DP (ZeRO stage 1)
    # true: the expert slots' AdamW state (moments; FP32 master with param_dtype=bf16) partitioned over the
    # expert-data-parallel group too (dp / ep ranks hold the same slots; trainer/optim/zero.py ExpertAdamW)
    shard_experts: bool = False
    # LR schedule: linear warmup (steps) -> constant -> cosine to min_lr -> tail phases [length, lr]
    unit: str = "steps"  # steps | tokens: the unit of constant, decay and the tail lengths
    warmup_steps: int = 2000
    constant: float = 0.0
    decay: float = 0.0
    min_lr: float = 2.2e-5
    tail: List[Any] = field(default_factory=list)  # [[length, lr], ...]
    # optional batch-size ramp: sequences per step grow linearly from ramp_start to train.global_batch
    ramp_start: int = 0  # 0 = no ramp
    ramp_tokens: float = 0.0


@dataclass
class ParallelSchema:
    pp: int = 1
    dp: int = 1
    ep: int = 1
    schedule: str = "1f1b"  # dualpipe | dualpipev | 1f1b (used when pp > 1)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # seconds a collective waits for a peer; the watchdog ends a job whose rank went silent within it.
    # None: 600 (nccl), 300 (gloo) (twinpipe.parallel.grid.DEFAULT_TIMEOUT_S)
    timeout_s: Optional[float] = None
    # blocks per pipeline stage, in stage order (None: as even as possible, extra blocks on the first
    # stages); pp entries for 1f1b and DualPipe, 2 x pp for DualPipeV. E.g. fewer blocks on the stages
    # that also hold the embedding, head and MTP (twinpipe.parallel.pipeline.stages.split_layers)
    layer_split: Optional[List[int]] = None


@dataclass
class FP8Schema:
    backend: str = "off"  # off | emulate | triton | cublas | auto
    # keep each FP8 weight's transpose (Dgrad's operand) through the step; false: made in each backward
    # and dropped after use, half the FP8 weight copies' memory (twinpipe.fp8.weight_cache)
    cache_transposed: bool = True


@dataclass
class TrainSchema:
    steps: int = 300
    seed: int = 0
    global_batch: int = 8  # sequences per optimizer step over all data-parallel ranks
    micro_batch: int = 2  # sequences per forward on one rank
    seq_len: int = 128
    dtype: str = "fp32"  # fp32 | bf16 (autocast, on CPU as on GPU; master weights stay fp32)
    grad_clip: float = 1.0
    on_nonfinite: str = "skip"  # skip | stop: what a NaN/inf loss or gradient does
    init_std: Optional[float] = None  # None: the model's own initialisation
    threads: int = 0  # torch.set_num_threads on CPU; 0 leaves torch's default
    # recomputed in the backward: none | norms | mla_up | attention | router | moe | full, or a list,
    # e.g. [norms,mla_up]
    # (twinpipe.parallel.recompute)
    recompute: Any = "none"
    ema_decay: float = 0.0  # EMA of the weights kept on the CPU (trainer/ema.py); 0 = off, else in (0, 1)


@dataclass
class LossSchema:
    mtp_lambda: float = 0.3  # weight of the MTP loss
    mtp_lambda_late: float = 0.1  # ... after mtp_switch_tokens
    mtp_switch_tokens: float = 10e12
    # cross-entropy in chunks whose [rows, vocab] buffers take at most this many MiB (trainer/chunked_ce.py:
    # two fp32 buffers per chunk, beside the gradients); 0 = whole fp32 logits
    ce_chunk_mib: float = 256.0


@dataclass
class BalanceSchema:
    gamma: float = 0.001  # router bias update speed
    gamma_until_tokens: float = 14.3e12  # gamma is 0 after this many tokens
    center: bool = False  # subtract the mean of each update (torchtitan); DeepSeek/Megatron: off


@dataclass
class EPLBSchema:
    every: int = 0  # steps between expert re-placements; 0 = off (needs parallel.ep > 1)
    replicas: int = 0  # physical expert slots per MoE layer under expert parallelism; 0 = one per expert


@dataclass
class RunSchema:
    dir: str = MISSING
    name: str = "pretrain"


@dataclass
class LoggingSchema:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "twinpipe"
    every: int = 1  # steps between metrics.jsonl lines
    progress: bool = True  # rank 0: a tqdm bar on a terminal, else a plain line every `every_s` seconds
    every_s: float = 10.0  # seconds between plain progress lines (output to a file, a pipe, SLURM)
    plots: bool = True  # PNG plots in run.dir at the end
    peak_tflops: Optional[float] = None  # for MFU; None: detected from the GPU name (none on CPU)


@dataclass
class CheckpointSchema:
    every: int = 100  # steps; 0 = only at the end
    keep: int = 2  # newest complete checkpoints kept
    at_end: bool = True
    # true: written by a thread while the next steps run (trainer/checkpoint/writer.py); one staged copy
    # of the state in host memory. Not `async`: a Python keyword
    async_save: bool = False


@dataclass
class SFTSchema:
    train_on_prompt: bool = False  # the loss also covers system/user tokens


@dataclass
class EvalSchema:
    every: int = 0  # steps between evaluations; 0 = off
    paths: List[str] = field(default_factory=list)  # eval records; [] = the data.heldout_percent split
    batches: int = 8  # held-out micro-batches for the loss (per dp rank)
    answers: int = 32  # records with data.answer_field for greedy exact match; 0 = off
    max_new_tokens: int = 32


@dataclass
class RecipeSchema:
    model: ModelSchema = MISSING
    data: DataSchema = MISSING
    optim: OptimSchema = MISSING
    parallel: ParallelSchema = MISSING
    fp8: FP8Schema = MISSING
    train: TrainSchema = field(default_factory=TrainSchema)
    loss: LossSchema = field(default_factory=LossSchema)
    balance: BalanceSchema = field(default_factory=BalanceSchema)
    eplb: EPLBSchema = field(default_factory=EPLBSchema)
    run: RunSchema = field(default_factory=RunSchema)
    logging: LoggingSchema = field(default_factory=LoggingSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)  # every recipe: held-out loss, MTP acceptance
    resume: str = "auto"  # auto | never | PATH (a checkpoints/step_N folder)


@dataclass
class SFTRecipeSchema(RecipeSchema):
    """`recipes/sft.yaml`: the training recipe plus where the weights start, SFT and eval keys."""

    init_from: Optional[str] = None  # a twinpipe checkpoint / run dir or an HF DeepSeek-V3 folder
    sft: SFTSchema = field(default_factory=SFTSchema)


def short_dirname(overrides: str, limit: int = 100) -> str:
    """A folder name for a run from Hydra's `key=value,...` override string: as is when short,
    else its first characters plus a hash of the whole (file names stop at 255 bytes)."""
    name = overrides.replace("/", "_")
    if len(name) <= limit:
        return name
    import hashlib

    return f"{name[:limit - 13]}..{hashlib.sha256(name.encode()).hexdigest()[:11]}"


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline_defaults() -> None:
    """No network unless the environment asks for it: the HF hub, datasets and transformers offline;
    tokenizers without their own thread pool. Every command line calls this at start-up."""
    for key in OFFLINE_ENV:
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def user_errors(command: str, *kinds: type[BaseException]) -> Iterator[None]:
    """An exception of `kinds` (a bad recipe value, a missing file) ends `command` with one line,
    `<command>: <message>`, and exit status 1 instead of a traceback; HYDRA_FULL_ERROR=1 keeps it."""
    try:
        yield
    except kinds as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"{command}: {exc}") from exc


def register() -> None:
    """Register the schemas and the `twinpipe_dirname` resolver (called once before Hydra composes)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("twinpipe_dirname"):
        OmegaConf.register_new_resolver("twinpipe_dirname", short_dirname)
    cs = ConfigStore.instance()
    cs.store(name="recipe_schema", node=RecipeSchema)
    cs.store(name="sft_recipe_schema", node=SFTRecipeSchema)
    from twinpipe.trainer.grpo.config import GRPORecipeSchema

    cs.store(name="grpo_recipe_schema", node=GRPORecipeSchema)
    cs.store(group="model", name="model_schema", node=ModelSchema)
    cs.store(group="data", name="data_schema", node=DataSchema)
    cs.store(group="optim", name="optim_schema", node=OptimSchema)
    cs.store(group="parallel", name="parallel_schema", node=ParallelSchema)
    cs.store(group="fp8", name="fp8_schema", node=FP8Schema)


CHOICES = {
    "model.preset": ("tiny", "small", "v3_671b"),
    "data.source": ("embedded", "files"),
    "optim.moment_dtype": ("fp32", "bf16"),
    "optim.param_dtype": ("fp32", "bf16"),
    "optim.zero": ("ours", "deepspeed"),
    "optim.unit": ("steps", "tokens"),
    "parallel.schedule": ("dualpipe", "dualpipev", "1f1b"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "fp8.backend": ("off", "emulate", "triton", "cublas", "auto"),
    "train.dtype": ("fp32", "bf16"),
    "train.on_nonfinite": ("skip", "stop"),
    "logging.wandb": ("offline", "online", "disabled"),
}

SFT_CHOICES = {
    "data.packing": ("pack", "pad"),
    "data.format": ("auto", "messages", "prompt_completion", "text"),
    "data.on_bad_record": ("error", "skip"),
    "data.overlong": ("truncate", "drop"),
}
SFT_NON_NEGATIVE = ("eval.every", "eval.answers", "data.heldout_percent")
SFT_POSITIVE = ("eval.batches", "eval.max_new_tokens")

POSITIVE = ("train.steps", "train.global_batch", "train.micro_batch", "train.seq_len",
            "parallel.pp", "parallel.dp", "parallel.ep", "parallel.timeout_s", "checkpoint.keep", "logging.every",
            "logging.every_s")
NON_NEGATIVE = ("optim.lr", "optim.eps", "optim.weight_decay", "optim.warmup_steps", "optim.constant",
                "optim.decay", "optim.min_lr", "train.grad_clip", "train.threads", "balance.gamma",
                "loss.mtp_lambda", "loss.mtp_lambda_late", "loss.ce_chunk_mib", "checkpoint.every", "eplb.every", "eplb.replicas",
                "optim.ramp_start", "optim.ramp_tokens")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted names of the keys of `cfg` that its schema dataclasses do not declare, at any depth (a
    `Dict` field such as `model.extra` takes any key)."""
    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return []
    known = {f.name for f in fields(schema)}
    found = []
    for key in cfg:
        if key not in known:
            found.append(f"{prefix}{key}")
        elif (not OmegaConf.is_missing(cfg, key) and not OmegaConf.is_interpolation(cfg, key)
              and isinstance(cfg[key], DictConfig)):
            found += unknown_keys(cfg[key], f"{prefix}{key}.")
    return found


def reject_unknown_keys(cfg: DictConfig, command: str) -> None:
    """Hydra's `+key=value` adds a key even to a schema-backed config, where it would be silently
    ignored: raise ValueError naming every such key."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a key of {command} (`+key=value` adds keys the "
                         f"schema does not have); `{command} --cfg job` prints every key")


def check_values(cfg: DictConfig, choices: Dict[str, Any], positive: Any = (), non_negative: Any = ()) -> None:
    """Raise ValueError naming the (dotted) key, its value and what is allowed: a value outside
    `choices[key]`, a `positive` key <= 0, a `non_negative` key < 0 (unset keys, None, pass)."""
    for key, allowed in choices.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: allowed values are {', '.join(allowed)}")
    for keys, bad, rule in ((positive, lambda v: v <= 0, "> 0"), (non_negative, lambda v: v < 0, ">= 0")):
        for key in keys:
            value = _get(cfg, key)
            if value is not None and bad(value):
                raise ValueError(f"{key}={value}: must be {rule}")


def validate(cfg: DictConfig) -> None:
    """Raise ValueError naming the key, the value seen and what is allowed."""
    reject_unknown_keys(cfg, "twinpipe-train")
    check_values(cfg, CHOICES, POSITIVE, NON_NEGATIVE)
    if "sft" in cfg:
        validate_sft(cfg)
    elif "grpo" in cfg:
        from twinpipe.trainer.grpo.config import validate_grpo

        validate_grpo(cfg)
    else:
        check_values(cfg, {"data.packing": ("concat", "pad")})
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas={betas}: need two values in [0, 1)")
    for i, phase in enumerate(cfg.optim.tail):
        if len(phase) != 2 or phase[0] < 0 or phase[1] < 0:
            raise ValueError(f"optim.tail[{i}]={list(phase)}: each phase is [length >= 0, lr >= 0]")
    t, p = cfg.train, cfg.parallel
    per_step = t.micro_batch * p.dp
    if t.global_batch % per_step:
        raise ValueError(f"train.global_batch={t.global_batch}: must be a multiple of train.micro_batch"
                         f" x parallel.dp = {t.micro_batch} x {p.dp} = {per_step}")
    if cfg.optim.ramp_start and cfg.optim.ramp_start % per_step:
        raise ValueError(f"optim.ramp_start={cfg.optim.ramp_start}: must be a multiple of "
                         f"train.micro_batch x parallel.dp = {per_step}")
    if p.dp % p.ep:
        raise ValueError(f"parallel.ep={p.ep}: must divide parallel.dp={p.dp} (experts are spread"
                         " inside the data-parallel group)")
    if p.pp > 1 and p.schedule == "dualpipe" and p.pp % 2:
        raise ValueError(f"parallel.pp={p.pp}: DualPipe needs an even number of pipeline ranks")
    if p.layer_split is not None:
        from twinpipe.trainer.build import model_config

        check_layer_split(list(p.layer_split), p.pp, p.schedule, model_config(cfg.model).num_hidden_layers)
    if cfg.eplb.every and p.ep == 1:
        raise ValueError(f"eplb.every={cfg.eplb.every}: EPLB re-places experts over the expert-parallel "
                         "group; it needs parallel.ep > 1 (or eplb.every=0)")
    if p.ep > 1 and cfg.optim.zero == "deepspeed":
        raise ValueError(f"optim.zero=deepspeed with parallel.ep={p.ep}: expert parallelism runs with "
                         "optim.zero=ours (expert weights keep a local optimizer EPLB can move)")
    if cfg.optim.shard_experts and cfg.optim.zero != "ours":
        raise ValueError(f"optim.shard_experts=true with optim.zero={cfg.optim.zero}: the expert slots' sharded "
                         "state is optim.zero=ours's; use optim.zero=ours (or optim.shard_experts=false)")
    if cfg.optim.param_dtype == "bf16":
        check_bf16_params(cfg)
    if cfg.data.source == "files" and not cfg.data.paths:
        raise ValueError("data.paths=[]: data.source=files needs at least one file or folder, e.g. "
                         "'data.paths=[corpus/,extra.jsonl]'")
    from twinpipe.parallel.recompute import parse_options

    if "full" in parse_options(t.recompute) and p.ep > 1:
        raise ValueError(f"train.recompute={t.recompute} with parallel.ep={p.ep}: recomputing whole blocks would "
                         "repeat their all-to-alls in the backward; use [norms,attention,router,moe] (collective-free)")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = no EMA)")
    resume = cfg.resume
    if not resume:
        raise ValueError("resume='': allowed values are auto, never or a checkpoint folder path")


def check_bf16_params(cfg: DictConfig) -> None:
    """optim.param_dtype=bf16: what the BF16 parameters with FP32 master weights run with."""
    if cfg.train.dtype != "bf16":
        raise ValueError(f"optim.param_dtype=bf16 with train.dtype={cfg.train.dtype}: BF16 parameters compute "
                         "under BF16 autocast; set train.dtype=bf16 (or optim.param_dtype=fp32)")
    if cfg.optim.zero != "ours":
        raise ValueError(f"optim.param_dtype=bf16 with optim.zero={cfg.optim.zero}: the FP32 master weights and "
                         "gradients are optim.zero=ours's; use optim.zero=ours")


def check_layer_split(split: List[int], pp: int, schedule: str, num_layers: int) -> None:
    """parallel.layer_split: one count >= 1 per pipeline stage of the schedule, summing to the model's
    blocks."""
    if pp == 1:
        raise ValueError(f"parallel.layer_split={split}: needs pipeline parallelism (parallel.pp > 1)")
    from twinpipe.parallel.pipeline.placement import StagePlacement

    stages = StagePlacement(schedule, pp).num_stages
    if len(split) != stages or sum(split) != num_layers or min(split) < 1:
        raise ValueError(f"parallel.layer_split={split}: {schedule} at parallel.pp={pp} has {stages} stages; "
                         f"give {stages} counts >= 1 summing to model.num_hidden_layers={num_layers}")


def validate_sft(cfg: DictConfig) -> None:
    """The SFT recipe's own keys (called by `validate` when the recipe has an `sft` section)."""
    check_values(cfg, SFT_CHOICES, SFT_POSITIVE, SFT_NON_NEGATIVE)
    if not cfg.data.paths:
        raise ValueError("data.paths=[]: the sft recipe needs chat records, e.g. 'data.paths=[chats.jsonl]'")
    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise ValueError(f"init_from={cfg.init_from}: no such checkpoint or folder; allowed: null, a "
                         "twinpipe checkpoint / run dir, or an HF DeepSeek-V3 folder")
    if cfg.eval.every and not cfg.eval.paths and not cfg.data.heldout_percent:
        raise ValueError(f"eval.every={cfg.eval.every}: evaluation needs eval.paths or a held-out split "
                         "(data.heldout_percent > 0)")
    if cfg.data.reset_position_ids:
        raise ValueError("data.reset_position_ids=true: SFT positions always restart per conversation "
                         "with data.packing=pack; the key is for pretraining")
