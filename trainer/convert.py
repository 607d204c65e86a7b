"""`twinpipe-convert`: HF DeepSeek-V3 folders <-> FP8, and twinpipe training checkpoints -> HF.

    twinpipe-convert --from hf --to hf-fp8 SRC DST        # BF16/FP32 -> FP8 (128x128 block scales)
    twinpipe-convert --from hf --to hf SRC DST            # FP8 (or anything) -> BF16 (--dtype fp32)
    twinpipe-convert --from twinpipe --to hf RUN/checkpoints/step_N DST

HF -> HF works tensor by tensor on the safetensors (no model is built, names are kept as they are),
so converting the 671B checkpoint needs memory for one output shard, not for the model. FP8 -> FP8
copies the quantized weights and scales unchanged. Text files beside the weights (tokenizer,
generation config) are copied. Load the result with `twinpipe.model.load_hf` to check it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from twinpipe.model.hf import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, QUANTIZATION_CONFIG, is_fp8_weight, save_hf
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

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
    """A twinpipe training checkpoint (`run.dir/checkpoints/step_N`) -> HF folder, tokenizer included."""
    try:
        from twinpipe.trainer.checkpoint import load_model_for_inference
    except ImportError as exc:
        raise RuntimeError("--from twinpipe needs twinpipe.trainer.checkpoint.load_model_for_inference, which "
                           f"this installation does not provide ({exc})") from exc
    model, tokenizer = load_model_for_inference(src, dtype)
    out = save_hf(model, dst, fp8=fp8, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)
    if tokenizer is not None:  # tokenizer.json (+ tokenizer_config.json), next to the weights
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            for f in Path(tmp).iterdir():
                shutil.copy(f, out / f.name)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="twinpipe-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src_format", choices=["hf", "twinpipe"], required=True)
    p.add_argument("--to", dest="dst_format", choices=["hf", "hf-fp8"], required=True)
    p.add_argument("src", type=Path, help="source folder")
    p.add_argument("dst", type=Path, help="destination folder (created atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="storage dtype of the non-FP8 tensors (default bf16)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30)
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fp8 = args.dst_format == "hf-fp8"
    kwargs = dict(fp8=fp8, dtype=DTYPES[args.dtype], max_shard_bytes=int(args.max_shard_gb * 2**30),
                  overwrite=args.overwrite)
    try:
        if args.src_format == "hf":
            out = convert_hf(args.src, args.dst, **kwargs)
        else:
            out = convert_twinpipe(args.src, args.dst, **kwargs)
    except (CheckpointError, FileExistsError, RuntimeError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
