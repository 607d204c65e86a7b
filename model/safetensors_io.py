"""Sharded safetensors folders, read tensor by tensor and written atomically, plus FP8 block scaling.

An HF checkpoint folder holds either one `model.safetensors` or `model.safetensors.index.json`
(`{"metadata": {...}, "weight_map": {tensor name: shard file}}`) and the shards it names.
`CheckpointReader` opens the shards lazily with `safe_open` and hands out one tensor at a time, so a
reader never holds more than the tensor asked for. `ShardWriter` plans shards from tensor sizes
first (so the file names `model-0000i-of-0000N.safetensors` are known), writes them into a temporary
folder next to the target and renames it into place only when everything is on disk.

FP8 checkpoints (DeepSeek-V3 layout) store a weight W[out, in] as `float8_e4m3fn` q with an FP32
sibling `<name>_scale_inv` s[ceil(out/128), ceil(in/128)], W ≈ q · s per 128×128 block; edge blocks
are partial when a dimension is not a multiple of 128. The block math is `fp8_format`'s
(`weight_quant` / `weight_dequant`: s = max(amax, 1e-4) / 448, q = e4m3(x / s)).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fp8_format import FP8_DTYPE, weight_dequant, weight_quant

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked: the message names the tensor and file."""


# ---------------------------------------------------------------------------------------------
# FP8 128×128 block scaling of weights
# ---------------------------------------------------------------------------------------------

def scale_shape(shape: Iterable[int], block: int = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the `weight_scale_inv` of a 2-D weight: [ceil(out/block), ceil(in/block)]."""
    out_dim, in_dim = shape
    return (-(-out_dim // block), -(-in_dim // block))


def block_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to FP8 E4M3 with one FP32 dequant scale per 128×128 block."""
    return weight_quant(w, block_size=FP8_BLOCK)


def block_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ≈ q · s per 128×128 block, returned in `dtype` (shapes need not be multiples of 128)."""
    return weight_dequant(q, s, block_size=FP8_BLOCK, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class CheckpointReader:
    """Tensor-by-tensor access to the safetensors of one checkpoint folder.

    Use as a context manager; shard files are opened on first use and closed on exit.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from exc
            self.weight_map: dict[str, str] = dict(weight_map)
            for shard in sorted(set(self.weight_map.values())):
                if not (self.folder / shard).is_file():
                    first = next(n for n, f in self.weight_map.items() if f == shard)
                    raise CheckpointError(f"{index} names shard {shard!r} (holding e.g. {first!r}), "
                                          f"but {self.folder / shard} does not exist")
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._handles: dict[str, object] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        return self.folder / self.weight_map[name]

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in {self.folder}")
        shard = self.weight_map[name]
        if shard not in self._handles:
            handle = safe_open(self.folder / shard, framework="pt")
            self._handles[shard] = handle.__enter__()
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"tensor {name!r} could not be read from {self.file_of(name)}: {exc}") from exc

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string of `name` ("BF16", "F32", "F8_E4M3", ...), without reading it."""
        return self._handle(name).get_slice(name).get_dtype()

    def get_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` in `dtype`, in memory of its own (never a view of the file); an FP8 weight
        is dequantized with its `_scale_inv` sibling."""
        t = self.get(name)  # may be a view of the memory-mapped file: always copy out of it
        if t.dtype != FP8_DTYPE:
            return t.to(dtype, copy=True)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} in {self.file_of(name)} is float8_e4m3fn but its "
                                  f"scale {scale_name!r} is missing")
        if t.dim() != 2:
            raise CheckpointError(f"tensor {name!r} in {self.file_of(name)} is float8_e4m3fn with shape "
                                  f"{tuple(t.shape)}; only 2-D block-scaled weights are supported")
        s = self.get(scale_name)
        want = scale_shape(t.shape)
        if tuple(s.shape) != want:
            raise CheckpointError(f"tensor {scale_name!r} in {self.file_of(scale_name)} has shape "
                                  f"{tuple(s.shape)}; weight {tuple(t.shape)} with 128x128 blocks needs {want}")
        return block_dequant(t, s, dtype)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    """One tensor to write: its name, its size on disk and how to produce it when its shard is written."""

    name: str
    nbytes: int
    produce: Callable[[], torch.Tensor]


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, in order: start a new shard when the next tensor would push this one past the limit."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_folder(path: str | os.PathLike, tensors: list[PlannedTensor], extra_files: dict[str, str],
                 max_shard_bytes: int, overwrite: bool = False) -> Path:
    """Write `tensors` as sharded safetensors (+ index when more than one shard) and `extra_files`
    (name → text) into `path`, atomically: a temporary sibling folder is renamed into place at the end.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    dup = [name for name, n in Counter(t.name for t in tensors).items() if n > 1]
    if dup:
        raise ValueError(f"tensor {dup[0]!r} planned more than once")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = plan_shards(tensors, max_shard_bytes)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = _shard_name(i, len(shards))
            data = {}
            for t in shard:
                data[t.name] = t.produce().contiguous()
                total += data[t.name].numel() * data[t.name].element_size()
                weight_map[t.name] = fname
            save_file(data, str(tmp / fname), metadata={"format": "pt"})
            logger.info("wrote %s (%d tensors)", fname, len(shard))
            del data
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname, text in extra_files.items():
            (tmp / fname).write_text(text)
        for f in tmp.iterdir():  # safetensors writes 0600; a checkpoint is meant to be shared
            f.chmod(0o644)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def iter_plan_fp8(name: str, shape: tuple[int, int], produce: Callable[[], torch.Tensor],
                  cache: dict[str, torch.Tensor]) -> Iterator[PlannedTensor]:
    """Plan a 2-D weight as FP8 q plus its FP32 `<name>_scale_inv`, quantized once.

    q is planned first, so it is produced first (shards are written in plan order); it leaves the
    scale in `cache` until the scale is written, possibly into the next shard.
    """
    rows, cols = scale_shape(shape)

    def q() -> torch.Tensor:
        qt, st = block_quant(produce())
        cache[name] = st
        return qt

    def s() -> torch.Tensor:
        return cache.pop(name).float()

    yield PlannedTensor(name, shape[0] * shape[1], q)
    yield PlannedTensor(name + SCALE_SUFFIX, rows * cols * 4, s)
