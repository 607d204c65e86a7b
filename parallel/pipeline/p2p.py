"""Point-to-point transfers between pipeline ranks, batched with `batch_isend_irecv`.

A pipeline schedule queues sends and receives (`append_isend`, `append_irecv`) and commits them all at
once, so on NCCL they become one grouped launch and on gloo one batch of async requests. Messages
between two ranks are matched in the order they were queued, on every backend (we use no tags, because
NCCL ignores them): the schedules keep that order the same on both sides.

The receiver must know what arrives. As in deepseek-ai/DualPipe, the caller declares the tensors one
micro-batch sends from stage to stage with `set_p2p_tensor_shapes` and `set_p2p_tensor_dtype`; unlike
it, a dtype may be given per tensor (a stage can pass token ids [B, T] int64 beside hidden states, which
the last stage needs for MTP). Gradients travel back only for the floating-point tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

_TENSOR_SHAPES: list[tuple[int, ...]] | None = None
_TENSOR_DTYPES: list[torch.dtype] | torch.dtype | None = None


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Shapes of the tensors one micro-batch passes from a stage to the next, in forward order."""
    global _TENSOR_SHAPES
    _TENSOR_SHAPES = [tuple(int(d) for d in s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype | Sequence[torch.dtype]) -> None:
    """One dtype for all those tensors, or one per tensor (same length as the shapes)."""
    global _TENSOR_DTYPES
    _TENSOR_DTYPES = dtype if isinstance(dtype, torch.dtype) else list(dtype)


def tensor_specs() -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The declared (shape, dtype) pairs; a clear error when they were never set."""
    if _TENSOR_SHAPES is None or _TENSOR_DTYPES is None:
        raise RuntimeError("pipeline P2P tensors are undeclared: call set_p2p_tensor_shapes([...]) and "
                           "set_p2p_tensor_dtype(dtype) before step() on a multi-rank pipeline")
    dtypes = _TENSOR_DTYPES
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(_TENSOR_SHAPES)
    if len(dtypes) != len(_TENSOR_SHAPES):
        raise ValueError(f"set_p2p_tensor_dtype got {len(dtypes)} dtypes for {len(_TENSOR_SHAPES)} "
                         "shapes: give one dtype, or one per shape")
    return list(zip(_TENSOR_SHAPES, dtypes))


def group_device(group: dist.ProcessGroup) -> torch.device:
    """Where P2P buffers live: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def append_irecv_forward(ops: list, src: int, group: dist.ProcessGroup, requires_grad: bool) -> list:
    """Queue receives of one micro-batch's stage inputs from group rank `src`; return the buffers."""
    device = group_device(group)
    peer = dist.get_global_rank(group, src)
    tensors = []
    for shape, dtype in tensor_specs():
        t = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, t, peer, group))
        # Received activations are leaves of this stage's graph; their .grad is what we send back.
        tensors.append(t.requires_grad_() if requires_grad and dtype.is_floating_point else t)
    return tensors


def append_irecv_backward(ops: list, src: int, group: dist.ProcessGroup) -> list:
    """Queue receives of the gradients of one micro-batch's stage outputs (floating tensors only).

    Returns one entry per declared tensor: a buffer, or None for the non-floating ones.
    """
    device = group_device(group)
    peer = dist.get_global_rank(group, src)
    grads = []
    for shape, dtype in tensor_specs():
        if not dtype.is_floating_point:
            grads.append(None)
            continue
        g = torch.empty(shape, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, g, peer, group))
        grads.append(g)
    return grads


def append_isend(ops: list, tensors: Sequence[torch.Tensor | None], dst: int,
                 group: dist.ProcessGroup) -> None:
    """Queue sends of `tensors` (None entries are skipped, as the receiver skips them too).

    Each tensor must match its declared shape and dtype: the receiver allocates by the declaration, so
    a mismatch would otherwise be read as garbage.
    """
    peer = dist.get_global_rank(group, dst)
    specs = tensor_specs()
    if len(tensors) != len(specs):
        raise ValueError(f"stage sends {len(tensors)} tensors but {len(specs)} are declared with "
                         "set_p2p_tensor_shapes")
    for i, (t, (shape, dtype)) in enumerate(zip(tensors, specs)):
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"pipeline tensor {i} is {tuple(t.shape)} {t.dtype}, declared {shape} "
                             f"{dtype} (set_p2p_tensor_shapes / set_p2p_tensor_dtype)")
        ops.append(dist.P2POp(dist.isend, t.detach().contiguous(), peer, group))


def post(ops: list) -> list:
    """Launch the queued operations together; return their requests (wait on them before reading
    the received buffers or reusing the sent ones). Empties `ops`."""
    if not ops:
        return []
    reqs = dist.batch_isend_irecv(ops)
    ops.clear()
    return reqs


def post_apart(ops: list) -> tuple[list, list]:
    """Launch the queued operations, one batch per process group and kind (sends, receives); return
    (send requests, receive requests). Empties `ops`. For an engine with a communicator per direction
    (`PipelineEngine(p2p_groups=...)`), which waits for the receives only: its sends may leave before
    the peer posts the matching receives."""
    batches: dict[tuple, list] = {}
    for op in ops:
        batches.setdefault((id(op.group), op.op is dist.isend), []).append(op)
    ops.clear()
    sends, recvs = [], []
    for (_, is_send), batch in batches.items():
        (sends if is_send else recvs).extend(dist.batch_isend_irecv(batch))
    return sends, recvs


def commit(ops: list) -> None:
    """Launch the queued operations together and wait for all of them; empties `ops`."""
    for req in post(ops):
        req.wait()
