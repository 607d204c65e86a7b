"""`twinpipe-convert`: HF DeepSeek-V3 folders <-> FP8, and twinpipe training checkpoints -> HF.

    twinpipe-convert src=SRC dst=DST to=hf-fp8       # BF16/FP32 -> FP8 (128x128 block scales)
    twinpipe-convert src=SRC dst=DST to=hf           # FP8 (or anything) -> BF16 (dtype=fp32 also)
    twinpipe-convert src=RUN/checkpoints/step_N dst=DST  # twinpipe checkpoint (or run dir) -> HF

Hydra composes `recipes/convert.yaml` (keys: `ConvertSchema` in `trainer/cli/config.py`); a `src`
holding config.json is converted as an HF folder, any other as a twinpipe checkpoint.

HF -> HF works tensor by tensor on the safetensors (no model is built, names are kept as they are),
and a twinpipe checkpoint is read tensor by tensor by ranges (one expert at a time), so converting the
671B checkpoint needs memory for one output shard, not for the model. FP8 -> FP8
copies the quantized weights and scales unchanged. Text files beside the weights (tokenizer,
generation config) are copied. Load the result with `twinpipe.model.load_hf` to check it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from twinpipe.model.hf import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, QUANTIZATION_CONFIG, is_fp8_weight
from twinpipe.model.safetensors_io import (
    INDEX_FILE,
    SCALE_SUFFIX,
    CheckpointError,
    CheckpointReader,
    PlannedTensor,
    iter_plan_fp8,
    scale_shape,
    write_folder,
)
from twinpipe.trainer.cli.config import DTYPES, check, launch

logger = logging.getLogger(__name__)

_SIDE_FILES_SKIP = {CONFIG_FILE, INDEX_FILE}


def _side_files(src: Path) -> dict[str, str]:
    """Small text files beside the weights (tokenizer, generation config) to copy along."""
    out = {}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and f.name not in _SIDE_FILES_SKIP:
            out[f.name] = f.read_text()
    return out


def convert_hf(src: str | Path, dst: str | Path, fp8: bool, dtype: torch.dtype = torch.bfloat16,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Rewrite the HF folder `src` as `dst`: projections/experts in FP8 when `fp8`, everything else in
    `dtype` (FP8 weights of `src` are dequantized when `fp8` is False; the router bias stays FP32)."""
    src, dst = Path(src), Path(dst)
    cfg_file = src / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: an HF checkpoint folder needs its config.json")
    cfg = json.loads(cfg_file.read_text())
    with CheckpointReader(src) as reader:
        plan: list[PlannedTensor] = []
        cache: dict[str, torch.Tensor] = {}  # scales waiting for their shard
        names = set(reader.names())
        for name in reader.names():
            if name.endswith(SCALE_SUFFIX):
                if name[: -len(SCALE_SUFFIX)] not in names:
                    raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} is a scale without its "
                                          f"weight")
                continue
            shape = reader.shape(name)
            src_dtype = reader.dtype_name(name)
            numel = math.prod(shape)
            if fp8 and is_fp8_weight(name):
                if src_dtype == "F8_E4M3":  # already block-quantized: copy q and s as they are
                    if name + SCALE_SUFFIX not in names:
                        raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} is float8_e4m3fn "
                                              f"but its scale {name + SCALE_SUFFIX!r} is missing")
                    rows, cols = scale_shape(shape)
                    plan.append(PlannedTensor(name, numel, lambda n=name: reader.get(n)))
                    plan.append(PlannedTensor(name + SCALE_SUFFIX, rows * cols * 4,
                                              lambda n=name + SCALE_SUFFIX: reader.get(n)))
                else:
                    plan.extend(iter_plan_fp8(name, shape, lambda n=name: reader.get(n).float(), cache))
                continue
            out_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
            plan.append(PlannedTensor(name, numel * out_dtype.itemsize, lambda n=name, d=out_dtype: reader.get_weight(n, d)))
        cfg_out = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
        cfg_out["torch_dtype"] = str(dtype).removeprefix("torch.")
        if fp8:
            cfg_out["quantization_config"] = dict(QUANTIZATION_CONFIG)
        files = _side_files(src)
        files[CONFIG_FILE] = json.dumps(cfg_out, indent=2) + "\n"
        return write_folder(dst, plan, files, max_shard_bytes, overwrite)


def convert_twinpipe(src: str | Path, dst: str | Path, fp8: bool, dtype: torch.dtype = torch.bfloat16,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """A twinpipe training checkpoint (`run.dir/checkpoints/step_N`, or a run dir) -> HF folder,
    tokenizer included. No model is built: each HF tensor (one expert of a layer's stacked weights, as
    HF stores experts) is read by ranges when its shard is written (`ranged.ModelTensors`; an expert
    saved under expert parallelism from its first slot), so the memory is one output shard, not the
    model. Values are those of `load_model_for_inference` + `save_hf`: cast to `dtype` (the router
    bias kept fp32), FP8 quantised from that."""
    from omegaconf import OmegaConf

    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.model.hf import hf_config_dict, ours_to_hf
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.build import model_config
    from twinpipe.trainer.checkpoint import format as fmt
    from twinpipe.trainer.checkpoint.io import resolve_resume
    from twinpipe.trainer.checkpoint.ranged import ModelTensors

    ckpt = resolve_resume(str(src), Path(src), "src")
    if ckpt is None:
        raise FileNotFoundError(f"src={src}: neither a twinpipe checkpoint nor an HF folder with config.json")
    config = model_config(OmegaConf.load(ckpt / fmt.CONFIG).model)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Transformer(config).state_dict().items()}
    source = ModelTensors(ckpt, config.n_routed_experts)
    tensors = [(hf, name, row) for name in shapes
               for hf, row in ours_to_hf(name, config.num_hidden_layers, config.n_routed_experts)]
    for k in range(config.num_nextn_predict_layers):  # the MTP layers' copies of the embedding and head
        layer = config.num_hidden_layers + k
        tensors += [(f"model.layers.{layer}.embed_tokens.weight", "embed_tokens.weight", None),
                    (f"model.layers.{layer}.shared_head.head.weight", "lm_head.weight", None)]
    plan: list[PlannedTensor] = []
    fp8_cache: dict = {}
    for hf, name, row in tensors:
        shape = shapes[name] if row is None else shapes[name][1:]
        bias = hf.endswith("e_score_correction_bias")
        read = lambda name=name, row=row, d=torch.float32 if bias else dtype: source.read(name, row).to(d)  # noqa: E731
        if fp8 and is_fp8_weight(hf):
            plan.extend(iter_plan_fp8(hf, shape, read, fp8_cache))
        else:
            plan.append(PlannedTensor(hf, math.prod(shape) * (4 if bias else dtype.itemsize), read))
    files = {CONFIG_FILE: json.dumps(hf_config_dict(config, fp8, dtype), indent=2) + "\n"}
    out = write_folder(dst, plan, files, max_shard_bytes, overwrite)
    tokenizer = load_tokenizer(ckpt / fmt.TOKENIZER)
    if tokenizer is not None:  # tokenizer.json (+ tokenizer_config.json), next to the weights
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            for f in Path(tmp).iterdir():
                shutil.copy(f, out / f.name)
    return out


def run(cfg: DictConfig) -> Path:
    """The CLI's work on a composed `recipes/convert.yaml`; returns the written folder. The source
    format is read from `src`: a folder with config.json is an HF folder, anything else goes to
    `load_model_for_inference` as a twinpipe checkpoint folder or run dir."""
    check(cfg, "convert")
    src = Path(cfg.src)
    if not src.is_dir():
        raise ValueError(f"src={src}: no such folder (an HF folder with {CONFIG_FILE}, a twinpipe "
                         "checkpoints/step_N folder or a run dir)")
    convert = convert_hf if (src / CONFIG_FILE).is_file() else convert_twinpipe
    out = convert(src, cfg.dst, fp8=cfg.to == "hf-fp8", dtype=DTYPES[cfg.dtype],
                  max_shard_bytes=int(cfg.max_shard_gb * 2**30), overwrite=cfg.overwrite)
    logger.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: Hydra overrides from `argv` (tests) or the command line."""
    launch("convert", run, argv)


if __name__ == "__main__":
    main()
