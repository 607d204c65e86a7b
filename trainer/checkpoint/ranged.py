"""Ranged reads of our DCP checkpoints: only the bytes of the elements asked for, never a whole saved chunk.

torch.distributed.checkpoint's FileSystemReader reads each saved chunk whole (`torch.load` of the chunk,
then a narrow): a ZeRO-1 bucket saved by one dp rank is one chunk of 12 bytes per parameter of its
pipeline rank (master + two fp32 moments), so taking one parameter's range out of it held the whole
bucket. A chunk in a `.distcp` file is a `torch.save` archive: an uncompressed zip whose `data.pkl`
names each storage and whose `data/<key>` record is the storage's raw little-endian bytes. `ChunkLayout`
reads where that record starts and the tensor's offset, size and stride in it (the pickle is read with
an unpickler that knows only `_rebuild_tensor_v2`, loading nothing); a row-major range of the tensor is
then one `readinto` of its bytes.

    RangedReader(path)          a FileSystemReader for `dcp.load`: a read item whose region is one
                                contiguous byte range (a whole tensor, rows of dim 0, a 1-D range) is read
                                alone; anything else (compressed extensions, odd strides) falls back to
                                torch's whole-chunk read
    read_flat(reader, key, a, b)  elements [a, b) of saved tensor `key` flattened row-major, across its
                                chunks (1-D DTensor shards, or chunks whole past dim 0): what
                                `reshard` takes out of a bucket
    ModelTensors(ckpt, E)       the plain model's tensors one at a time, an expert of a layer's stacked
                                weights from its first saved EP slot: what the inference loader, the
                                EP merge and `twinpipe-convert` read

Memory: the elements asked for, plus a chunk's zip directory and pickle (bytes) while its layout is
read (kept per chunk: a few hundred bytes).
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from twinpipe.model.safetensors_io import CheckpointError
from twinpipe.trainer.checkpoint import format as fmt


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Where a saved chunk's elements are: absolute byte offset of element 0 of its (row-major) tensor."""

    data_start: int  # file offset of the tensor's first element
    size: tuple[int, ...]


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable file of its own (for zipfile)."""

    def __init__(self, f: Any, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class _TensorProbe(pickle.Unpickler):
    """Reads a torch.save pickle of one tensor without loading it: (storage key, offset, size, stride)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"not a plain tensor ({module}.{name})")

    def persistent_load(self, pid: Any) -> Any:
        return pid[2]  # ('storage', storage type, key, location, numel) -> key


def chunk_layout(f: Any, offset: int, length: int, dtype: torch.dtype) -> ChunkLayout | None:
    """The layout of the torch.save archive at [offset, offset + length) of open file `f`, or None when
    it is not a plain contiguous tensor stored uncompressed in little-endian order."""
    if sys.byteorder != "little":
        return None
    try:
        archive = zipfile.ZipFile(_FileSlice(f, offset, length))
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl[: -len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
            return None
        key, storage_offset, size, stride = _TensorProbe(io.BytesIO(archive.read(pkl))).load()
        info = archive.getinfo(f"{prefix}data/{key}")
    except (zipfile.BadZipFile, pickle.UnpicklingError, StopIteration, KeyError, ValueError, TypeError):
        return None
    contiguous = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if info.compress_type != zipfile.ZIP_STORED or any(s != c for s, c, n in zip(stride, contiguous, size) if n > 1):
        return None
    f.seek(offset + info.header_offset)
    header = f.read(30)  # the local file header: name and extra field lengths at 26 and 28
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = offset + info.header_offset + 30 + name_len + extra_len
    return ChunkLayout(start + storage_offset * dtype.itemsize, size)


def _contiguous_region(size: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]
                       ) -> tuple[int, int] | None:
    """(first element, count) of the row-major sub-block `offsets`/`lengths` of a tensor of `size`
    when it is one contiguous run of elements, else None."""
    narrowed = [i for i, (o, n, s) in enumerate(zip(offsets, lengths, size)) if (o, n) != (0, s)]
    if narrowed and any(lengths[i] != 1 for i in range(narrowed[0])):
        return None
    if len(narrowed) > 1:
        return None
    first = sum(o * math.prod(size[i + 1:]) for i, o in enumerate(offsets))
    return first, math.prod(lengths)


def _read_into(f: Any, start: int, out: torch.Tensor) -> None:
    f.seek(start)
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    if f.readinto(view) != len(view):
        raise CheckpointError(f"{getattr(f, 'name', f)}: truncated at byte {start} (wanted {len(view)} bytes)")


class RangedReader(FileSystemReader):
    """A FileSystemReader that reads only the requested elements of each saved chunk (see the module
    docstring); `dcp.load(state, storage_reader=RangedReader(path))`."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self.path_str = str(path)
        self.layouts: dict[tuple[str, int], ChunkLayout | None] = {}
        self.tensors: dict[str, TensorStorageMetadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = super().read_metadata(*args, **kwargs)
        self._know(metadata)
        return metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._know(metadata)  # every rank of a distributed load; only the coordinator reads the metadata

    def _know(self, metadata: Any) -> None:
        self.tensors = {k: v for k, v in metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        self.storage_data = metadata.storage_data

    def layout(self, f: Any, index: MetadataIndex) -> ChunkLayout | None:
        info = self.storage_data[index]
        key = (info.relative_path, info.offset)
        if key not in self.layouts:
            dtype = self.tensors[index.fqn].properties.dtype
            plain = not info.transform_descriptors
            self.layouts[key] = chunk_layout(f, info.offset, info.length, dtype) if plain else None
        return self.layouts[key]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        rest = []
        files: dict[str, Any] = {}
        try:
            for req in plan.items:
                if req.type == LoadItemType.BYTE_IO or not self._read_item(req, planner, files):
                    rest.append(req)
        finally:
            for f in files.values():
                f.close()
        if rest:
            return super().read_data(dataclasses.replace(plan, items=rest), planner)
        done: Future = Future()
        done.set_result(None)
        return done

    def _open(self, files: dict[str, Any], relative: str) -> Any:
        if relative not in files:
            files[relative] = open(Path(self.path_str) / relative, "rb")
        return files[relative]

    def _read_item(self, req: Any, planner: LoadPlanner, files: dict[str, Any]) -> bool:
        info = self.storage_data[req.storage_index]
        f = self._open(files, info.relative_path)
        layout = self.layout(f, req.storage_index)
        if layout is None:
            return False
        region = _contiguous_region(layout.size, tuple(req.storage_offsets), tuple(req.lengths))
        if region is None:
            return False
        first, count = region
        target = planner.resolve_tensor(req).detach()
        dtype = self.tensors[req.storage_index.fqn].properties.dtype
        direct = target.is_contiguous() and target.dtype == dtype and target.device.type == "cpu"
        out = target if direct else torch.empty(tuple(req.lengths), dtype=dtype)
        _read_into(f, layout.data_start + first * dtype.itemsize, out)
        if not direct:
            target.copy_(out)
        planner.commit_tensor(req, target)
        return True


def read_flat(reader: RangedReader, key: str, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of saved tensor `key` (a flat "top.name" key) flattened row-major, read
    from the chunks that hold them. Chunks must be 1-D ranges or whole past dim 1 (what DCP writes for
    our flat ZeRO buckets, plain tensors, and the expert state sharded over dim 1 by
    optim.shard_experts: one read per dim-0 row of such a chunk); a CheckpointError names the key
    otherwise."""
    if not reader.tensors:
        reader.read_metadata()
    meta = reader.tensors.get(key)
    if meta is None:
        raise CheckpointError(f"{reader.path_str}: {key} is not a tensor of the checkpoint")
    size, dtype = tuple(meta.size), meta.properties.dtype
    total, row = math.prod(size), math.prod(size[1:])
    if not 0 <= start <= stop <= total:
        raise CheckpointError(f"{reader.path_str}: {key} has {total} elements, asked for [{start}, {stop})")
    out = torch.empty(stop - start, dtype=dtype)
    files: dict[str, Any] = {}
    try:
        for chunk in meta.chunks:
            if tuple(chunk.sizes[2:]) != size[2:]:
                raise CheckpointError(f"{reader.path_str}: {key} is saved in chunks split past dim 1; a "
                                      "ranged read needs them whole past dim 1")
            # (flat [lo, hi) of the tensor, where it starts in the chunk): one range when the chunk is
            # whole past dim 0, else one per dim-0 row
            if len(size) < 2 or chunk.sizes[1] == size[1]:
                pieces = [((chunk.offsets[0] * row, (chunk.offsets[0] + chunk.sizes[0]) * row) if size
                           else (0, 1), 0)]
            else:
                (o0, o1), (s0, s1), row1 = chunk.offsets[:2], chunk.sizes[:2], math.prod(size[2:])
                rows = range(max(o0, start // row), min(o0 + s0, -(-stop // row)))
                pieces = [((i * row + o1 * row1, i * row + (o1 + s1) * row1), (i - o0) * s1 * row1) for i in rows]
            layout = None
            for (lo, hi), base in pieces:
                a, b = max(lo, start), min(hi, stop)
                if a >= b:
                    continue
                if layout is None:
                    index = MetadataIndex(key, chunk.offsets)
                    f = reader._open(files, reader.storage_data[index].relative_path)
                    layout = reader.layout(f, index)
                    if layout is None:
                        raise CheckpointError(f"{reader.path_str}: {key}: a chunk that is not a plain "
                                              "uncompressed tensor (written with a DCP extension?) cannot be "
                                              "read by ranges")
                _read_into(f, layout.data_start + (base + a - lo) * dtype.itemsize, out[a - start:b - start])
    finally:
        for f in files.values():
            f.close()
    return out


class ModelTensors:
    """The plain model's tensors saved in checkpoint `ckpt` under `top` (the weights, or their EMA),
    read by ranges (`ranged.read_flat`): a tensor saved whole, or, saved under expert parallelism, one
    logical expert of a layer's stacked weight from the first physical slot holding it (the layer's
    saved placement; replicas are copies)."""

    def __init__(self, ckpt: Path, num_experts: int, top: str = fmt.MODEL,
                 experts: tuple[Any, Any] = (fmt.EXPERT_WEIGHTS, fmt.expert_weights_key)):
        self.ckpt, self.num_experts, self.top = ckpt, num_experts, top
        pattern, self.experts_key = experts
        self.reader = RangedReader(ckpt)
        self.saved = self.reader.read_metadata().state_dict_metadata
        ep_keys: dict[int, set[int]] = {}
        for flat in self.saved:
            m = pattern.match(flat.split(".", 1)[0])
            if m:
                ep_keys.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
        if len(ep_keys) > 1:
            raise CheckpointError(f"{ckpt}: expert slots saved for several EP degrees {sorted(ep_keys)} (keys "
                                  f"{self.experts_key(0, min(ep_keys))}..., {self.experts_key(0, max(ep_keys))}...)")
        self.ep = next(iter(ep_keys), 0)
        if ep_keys and ep_keys[self.ep] != set(range(self.ep)):
            absent = [self.experts_key(r, self.ep) for r in range(self.ep) if r not in ep_keys[self.ep]]
            raise CheckpointError(f"{ckpt}: expert slots of EP ranks missing: no key {', '.join(absent)}")
        self.first_slot: dict[str, list[int]] = {}  # layer -> first physical slot of each logical expert

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """Tensor `name` of the plain model as saved (fp32), or its row `row` (one expert of a stacked
        expert weight)."""
        flat = f"{self.top}.{name}"
        if flat not in self.saved:
            if row is None:
                raise CheckpointError(f"{self.ckpt}: no key {flat} (saved under a different model config?)")
            return self.expert(name, row)
        size = tuple(self.saved[flat].size)
        if row is None:
            return read_flat(self.reader, flat, 0, math.prod(size)).view(size)
        n = math.prod(size[1:])
        return read_flat(self.reader, flat, row * n, (row + 1) * n).view(size[1:])

    def expert(self, name: str, expert: int) -> torch.Tensor:
        """Logical expert `expert` of the stacked expert weight `name`, saved as EP slots."""
        from twinpipe.parallel.experts.logical_state import LOCAL, PLACEMENT
        from twinpipe.parallel.experts.slots import placement_tables

        layer, _, param = name.rpartition(".")
        placement = f"{fmt.MODEL}.{layer}.{PLACEMENT}"
        slots = [f"{self.experts_key(r, self.ep)}.{layer}.{LOCAL}{param}" for r in range(self.ep)]
        absent = [k for k in [placement, *slots] if k not in self.saved] if self.ep else [placement]
        if absent:
            raise CheckpointError(f"{self.ckpt}: {self.top}.{name} is neither saved whole nor as expert slots: "
                                  f"no key {', '.join(absent)}")
        num_slots, per_rank = self.saved[placement].size[0], self.saved[slots[0]].size[0]
        if per_rank * self.ep != num_slots:
            raise CheckpointError(f"{self.ckpt}: {slots[0]} has {per_rank} slots; {placement} places "
                                  f"{num_slots} slots over ep={self.ep} ranks")
        if layer not in self.first_slot:
            phy2log = read_flat(self.reader, placement, 0, num_slots).to(torch.int64)
            try:
                log2phy, _ = placement_tables(phy2log, self.num_experts)
            except ValueError as exc:
                raise CheckpointError(f"{self.ckpt}: {placement}: {exc}") from exc
            self.first_slot[layer] = log2phy[:, 0].tolist()
        rank, local = divmod(self.first_slot[layer][expert], per_rank)
        size = tuple(self.saved[slots[rank]].size)
        n = math.prod(size[1:])
        return read_flat(self.reader, slots[rank], local * n, (local + 1) * n).view(size[1:])
