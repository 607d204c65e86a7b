"""HF DeepSeek-V3 checkpoint folders <-> `Transformer`, both ways, BF16/FP32 or FP8 block-scaled.

Names (docs/reference.md §1 "HF checkpoint layout" and docs/internals.md "Model tree"): our module tree
mirrors HF's, so a name is mostly the HF name without its `model.` prefix. Three things differ:
  - routed experts: HF stores one tensor per expert, `...mlp.experts.E.gate_proj.weight` [I, H];
    we hold them stacked, `...mlp.experts.gate_proj` [E, I, H] (same for up_proj and down_proj);
  - MTP layer k is HF layer `num_hidden_layers + k`: its block's tensors (attention, MoE, norms) are
    our `mtp.k.block.*`, `enorm` / `hnorm` / `eh_proj` are `mtp.k.*`, `shared_head.norm` is
    `mtp.k.norm`; its `embed_tokens` and `shared_head.head` are copies of the main embedding and
    head (we share those), written on save and checked for shape but not read on load;
  - FP8 checkpoints add a `<weight>_scale_inv` beside every projection and expert weight.

`load_hf` streams: the model is built on the meta device, then every checkpoint tensor is read with
`safe_open`, converted, checked and put in place one at a time, so peak memory is one model copy plus
one tensor. `layers=` (HF layer indices; MTP layer k is `num_hidden_layers + k`) loads a pipeline
stage's subset; everything else stays on the meta device. The embedding is loaded when layer 0 or an
MTP layer is selected, the final norm and `lm_head` when the last main layer or an MTP layer is (MTP
uses both). `save_hf` writes config.json, the shards and the index into a temporary folder and
renames it into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .safetensors_io import (
    SCALE_SUFFIX,
    CheckpointError,
    CheckpointReader,
    PlannedTensor,
    iter_plan_fp8,
    write_folder,
)
from .transformer import Transformer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # of the main embedding / head
_TOP_LEVEL = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FP8_WEIGHT = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                         r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
SHARED = "<shared>"  # what the MTP layer's copies of the embedding and head map to on load


def is_fp8_weight(hf_name: str) -> bool:
    """True for the weights an FP8 checkpoint stores as float8 (projections and experts); embedding,
    head, norms, router and eh_proj stay BF16."""
    return _FP8_WEIGHT.search(hf_name) is not None


def layer_of(hf_name: str) -> int | None:
    """HF layer index of a tensor name (`model.layers.L.*`), None for embedding / final norm / head."""
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Name mapping
# ---------------------------------------------------------------------------------------------

def ours_to_hf(name: str, num_hidden_layers: int, num_experts: int) -> list[tuple[str, int | None]]:
    """HF names (with expert rows) of one of our state-dict entries; MTP copies are added by the caller."""
    for hf, ours in _TOP_LEVEL.items():
        if name == ours:
            return [(hf, None)]
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m is not None:
        layer, rest = int(m.group(1)), m.group(2)
    else:
        m = re.match(r"^mtp\.(\d+)\.(.+)$", name)
        if m is None:
            raise KeyError(f"state-dict entry {name!r} has no HF DeepSeek-V3 name")
        layer, rest = num_hidden_layers + int(m.group(1)), m.group(2)
        if rest == "norm.weight":
            return [(f"model.layers.{layer}.shared_head.norm.weight", None)]
        if rest in MTP_OWN:
            return [(f"model.layers.{layer}.{rest}", None)]
        if not rest.startswith("block."):
            raise KeyError(f"state-dict entry {name!r} has no HF DeepSeek-V3 name")
        rest = rest[len("block."):]
    e = re.match(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)$", rest)
    if e is not None:
        return [(f"model.layers.{layer}.mlp.experts.{i}.{e.group(1)}.weight", i) for i in range(num_experts)]
    return [(f"model.layers.{layer}.{rest}", None)]


def _read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: an HF checkpoint folder needs its config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc


def _selection(config: ModelConfig, layers: Iterable[int] | None) -> tuple[set[int], bool, bool]:
    """(selected HF layer indices, load embedding, load final norm + head) for `layers=`."""
    total = config.num_hidden_layers + config.num_nextn_predict_layers
    if layers is None:
        return set(range(total)), True, True
    chosen = set(int(i) for i in layers)
    bad = sorted(i for i in chosen if not 0 <= i < total)
    if bad:
        raise ValueError(f"layers={sorted(chosen)}: indices {bad} out of range; the checkpoint has layers "
                         f"0..{total - 1} (MTP layers from {config.num_hidden_layers} on)")
    mtp = any(i >= config.num_hidden_layers for i in chosen)
    return chosen, 0 in chosen or mtp, config.num_hidden_layers - 1 in chosen or mtp


def _wanted(name: str, chosen: set[int], embed: bool, head: bool, num_hidden_layers: int) -> bool:
    if name == "embed_tokens.weight":
        return embed
    if name in ("norm.weight", "lm_head.weight"):
        return head
    m = re.match(r"^(layers|mtp)\.(\d+)\.", name)
    if m is None:
        return True
    layer = int(m.group(2)) + (num_hidden_layers if m.group(1) == "mtp" else 0)
    return layer in chosen


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` of `model` by `tensor`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, layers: Iterable[int] | None = None,
            device: str | torch.device = "cpu") -> Transformer:
    """Build a `Transformer` from an HF DeepSeek-V3 folder (BF16/FP32 or FP8 with `weight_scale_inv`).

    Parameters come out in `dtype` (FP8 weights dequantized per 128×128 block); fp32 buffers (the
    router bias) stay fp32. The MTP layers are loaded when the checkpoint has them; a checkpoint
    without any (e.g. one written by transformers) gives a model with num_nextn_predict_layers=0.
    Errors name the tensor and file: unknown names, missing tensors, wrong shapes, absent shards.
    """
    path = Path(path)
    hf_cfg = _read_config(path)
    with CheckpointReader(path) as reader:
        names = reader.names()
        n_layers = hf_cfg.get("num_hidden_layers")
        if not isinstance(n_layers, int) or n_layers <= 0:
            raise CheckpointError(f"{path / CONFIG_FILE}: num_hidden_layers={n_layers!r} must be a positive "
                                  f"integer")
        if not any((layer_of(n) or 0) >= n_layers for n in names):
            if hf_cfg.get("num_nextn_predict_layers", hf_cfg.get("num_mtp_layers", 0)):
                logger.warning("%s has no MTP layer tensors (layer %d); loading without MTP", path, n_layers)
            hf_cfg = {k: v for k, v in hf_cfg.items() if k != "num_mtp_layers"}
            hf_cfg["num_nextn_predict_layers"] = 0
        try:
            config = ModelConfig.from_hf_dict(hf_cfg)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from exc
        chosen, embed, head = _selection(config, layers)
        with torch.device("meta"):
            model = Transformer(config)
        _load_tensors(model, reader, config, dtype, torch.device(device), chosen, embed, head)
    _check_loaded(model, config, chosen, embed, head)
    return model


def hf_names(model: nn.Module, config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """Every HF tensor name of a checkpoint of `model` (no `_scale_inv`) -> (our state-dict name, expert
    row or None); the MTP layers' copies of the embedding and head map to SHARED. Works on meta models."""
    out: dict[str, tuple[str, int | None]] = {}
    for name in model.state_dict():
        for hf, row in ours_to_hf(name, config.num_hidden_layers, config.n_routed_experts):
            out[hf] = (name, row)
    for k in range(config.num_nextn_predict_layers):
        for rest in MTP_COPIES:
            out[f"model.layers.{config.num_hidden_layers + k}.{rest}"] = (SHARED, None)
    return out


def _load_tensors(model, reader: CheckpointReader, config: ModelConfig, dtype, device, chosen, embed, head):
    meta = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    expected = hf_names(model, config)
    present = set(reader.names())
    for name in reader.names():
        base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
        if base not in expected:
            raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} is not part of a DeepSeek-V3 "
                                  f"model with this config.json (num_hidden_layers={config.num_hidden_layers}, "
                                  f"n_routed_experts={config.n_routed_experts}, "
                                  f"num_nextn_predict_layers={config.num_nextn_predict_layers})")
        if name != base and base not in present:
            raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} is a scale without its weight "
                                  f"{base!r}")
    missing = [hf for hf in expected if hf not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r}{more} missing from {reader.folder}")

    stacks: dict[str, torch.Tensor] = {}
    for hf in sorted(expected, key=lambda n: (reader.weight_map[n], n)):  # one shard at a time
        ours, row = expected[hf]
        if ours == SHARED:
            main = "embed_tokens.weight" if hf.endswith("embed_tokens.weight") else "lm_head.weight"
            if reader.shape(hf) != tuple(meta[main].shape):
                raise CheckpointError(f"tensor {hf!r} in {reader.file_of(hf)} has shape {reader.shape(hf)}; "
                                      f"expected {tuple(meta[main].shape)} (copy of {main})")
            continue
        if not _wanted(ours, chosen, embed, head, config.num_hidden_layers):
            continue
        target = meta[ours]
        want = tuple(target.shape[1:]) if row is not None else tuple(target.shape)
        got = reader.shape(hf)
        if got != want:
            raise CheckpointError(f"tensor {hf!r} in {reader.file_of(hf)} has shape {got}; expected {want}")
        out_dtype = dtype if ours in params else target.dtype  # buffers (router bias) keep fp32
        tensor = reader.get_weight(hf, out_dtype)
        if row is None:
            _put(model, ours, tensor.to(device).contiguous())
            continue
        if ours not in stacks:
            stacks[ours] = torch.empty(tuple(target.shape), dtype=out_dtype, device=device)  # [E, ...]
            _put(model, ours, stacks[ours])
        stacks[ours][row].copy_(tensor)


def _check_loaded(model: nn.Module, config: ModelConfig, chosen: set[int], embed: bool, head: bool) -> None:
    """Every selected parameter and buffer left the meta device (catches a mapping that skipped one)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_meta and _wanted(name, chosen, embed, head, config.num_hidden_layers):
            raise CheckpointError(f"{name!r} was not loaded: no checkpoint tensor maps to it")


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def hf_config_dict(config: ModelConfig, fp8: bool, dtype: torch.dtype) -> dict:
    """config.json for `config`, with `quantization_config` when the weights are FP8."""
    out = config.to_hf_dict()
    for key in ("quantization_config", "dtype", "torch_dtype", "rope_parameters"):
        out.pop(key, None)
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return out


def _hf_tensors(model: nn.Module, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor or view, in the model's dtype) of every tensor of a checkpoint of `model`,
    MTP copies of the embedding and head included."""
    state = model.state_dict()
    for name, tensor in state.items():
        if tensor.is_meta:
            raise ValueError(f"save_hf: {name!r} is on the meta device (a partially loaded model cannot be "
                             f"saved)")
        for hf, row in ours_to_hf(name, config.num_hidden_layers, config.n_routed_experts):
            yield hf, (tensor if row is None else tensor[row])
    for k in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + k
        yield f"model.layers.{layer}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"model.layers.{layer}.shared_head.head.weight", state["lm_head.weight"]


def save_hf(model: Transformer, path: str | os.PathLike, fp8: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = torch.bfloat16,
            overwrite: bool = False) -> Path:
    """Write `model` as an HF DeepSeek-V3 folder: config.json + (sharded) safetensors + index.

    `dtype` is the storage dtype of the non-FP8 tensors (None keeps the model's; the router bias stays
    FP32). With `fp8=True` every projection and expert weight is stored as float8_e4m3fn with a FP32
    `weight_scale_inv` per 128×128 block. The folder appears atomically (temp folder + rename).
    """
    config: ModelConfig = model.config
    plan: list[PlannedTensor] = []
    fp8_cache: dict = {}
    for hf, t in _hf_tensors(model, config):
        if fp8 and is_fp8_weight(hf):  # quantized from the model's own precision
            plan.extend(iter_plan_fp8(hf, tuple(t.shape), lambda t=t: t.detach().cpu(), fp8_cache))
            continue
        out_dtype = t.dtype if dtype is None or hf.endswith("e_score_correction_bias") else dtype
        # A fresh tensor per name (clone), so safetensors never sees two names on one storage.
        plan.append(PlannedTensor(hf, t.numel() * out_dtype.itemsize,
                                  lambda t=t, d=out_dtype: t.detach().to("cpu", d, copy=True)))
    cfg = hf_config_dict(config, fp8, dtype or next(model.parameters()).dtype)
    out = write_folder(path, plan, {CONFIG_FILE: json.dumps(cfg, indent=2) + "\n"}, max_shard_bytes, overwrite)
    logger.info("saved %s (%d tensors, fp8=%s)", out, len(plan), fp8)
    return out


__all__ = ["CheckpointError", "hf_config_dict", "hf_names", "is_fp8_weight", "load_hf", "ours_to_hf", "save_hf"]
