"""Ranged reads of DCP checkpoints (trainer/checkpoint/ranged.py): what resume under another layout,
the EP merge and twinpipe-convert read.

Exact (`torch.equal`): a range is the saved bytes copied, the same values torch's whole-chunk reader
gives. Memory: the peak RSS growth of a forked process while it takes one parameter's range out of a
saved ZeRO-1 bucket (`reshard._SavedState.part`, the resume path) is measured against the bytes of that
range, with glibc's mmap threshold fixed at 128 KiB so that every tensor above it is fresh pages (as in
tests/parallel/test_parallelize.py), the free heap the forked parent left trimmed (malloc_trim: a
reused resident chunk would not show), and the peak reset through /proc/self/clear_refs once the code
paths are imported.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from twinpipe.parallel.local import run_local
from twinpipe.trainer.checkpoint import format as fmt
from twinpipe.trainer.checkpoint.ranged import ModelTensors, RangedReader, read_flat

PARAMS, NUMEL = 4, 1 << 20  # a bucket of 4 parameters of 1M elements: 16 MiB per tensor, 48 MiB in all


def _bucket(name: str) -> torch.Tensor:
    return torch.randn(PARAMS * NUMEL, generator=torch.Generator().manual_seed(len(name)))


def _plain() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(6, 5, 7, generator=g).bfloat16(), "i": torch.arange(13),
            "v": torch.randn(9, 4, generator=g)[:, 1]}  # a strided view: DCP saves a copy


def _save(rank, world, path):
    """Two dp ranks save the bucket as DTensors sharded over them (as ZeRO-1 does), plus plain tensors."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    shard = lambda t: DTensor.from_local(t.chunk(world)[rank].clone(), mesh, [Shard(0)])  # noqa: E731
    state = {fmt.OPTIM: {fmt.OPTIM_STEP: 5,
                         "dense": {k: shard(_bucket(k)) for k in fmt.BUCKET_TENSORS}},
             fmt.MODEL: _plain()}
    dcp.save(state, checkpoint_id=path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranged")
    run_local(_save, 2, path)
    segments = {"dense": [[f"p{j}", j * NUMEL, NUMEL] for j in range(PARAMS)]}
    (path / fmt.META).write_text(json.dumps({fmt.SEGMENTS: segments, "ep": 1}))
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ranged_reads_equal_whole_reads(saved):
    reader = RangedReader(saved)
    full = _bucket("master")
    for lo, hi in [(0, 10), (NUMEL - 3, 3 * NUMEL + 5), (2 * NUMEL - 1, 2 * NUMEL + 1), (0, PARAMS * NUMEL)]:
        assert torch.equal(read_flat(reader, "optim.dense.master", lo, hi), full[lo:hi])  # across both chunks
    plain = _plain()
    assert torch.equal(read_flat(reader, "model.w", 35, 140), plain["w"].flatten()[35:140])
    # dcp.load through the ranged reader == through torch's reader, and no chunk fell back to it
    shapes = {fmt.MODEL: {k: torch.empty_like(v) for k, v in plain.items()},
              fmt.OPTIM: {fmt.OPTIM_STEP: 0,
                          "dense": {k: torch.empty(PARAMS * NUMEL) for k in fmt.BUCKET_TENSORS}}}
    ours, theirs = ({k: {n: ({m: t.clone() for m, t in v.items()} if isinstance(v, dict) else
                             v.clone() if isinstance(v, torch.Tensor) else v)
                         for n, v in part.items()} for k, part in shapes.items()} for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranged = RangedReader(saved)
        dcp.load(ours, storage_reader=ranged, no_dist=True)
        dcp.load(theirs, checkpoint_id=saved, no_dist=True)
    assert len(ranged.layouts) == 3 * 2 + len(plain) and None not in ranged.layouts.values()
    for k in plain:
        assert torch.equal(ours[fmt.MODEL][k], theirs[fmt.MODEL][k]) and torch.equal(ours[fmt.MODEL][k], plain[k])
    for k in fmt.BUCKET_TENSORS:
        assert torch.equal(ours[fmt.OPTIM]["dense"][k], theirs[fmt.OPTIM]["dense"][k])
    assert ours[fmt.OPTIM][fmt.OPTIM_STEP] == 5


def _part_peak(rank, world, path):
    """Peak RSS growth (bytes) while the resume path reads one parameter's state out of the bucket."""
    import ctypes
    import gc

    from twinpipe.trainer.checkpoint.reshard import _SavedState

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: tensors are fresh pages
    meta = json.loads((path / fmt.META).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _SavedState(path, meta)
    state.part("p0", (NUMEL,), 0, 16)  # imports and first-use work outside the measurement
    gc.collect()
    libc.malloc_trim(0)  # free heap chunks left by the parent go back: reusing them would not show
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    part = state.part("p2", (NUMEL,), 0, NUMEL)
    grown = (_status_kib("VmHWM") - before) * 1024
    return grown, [t.clone() for t in part]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_resume_reads_one_parameter_not_the_bucket(saved):
    """The state of one parameter (master + two moments: 12 MiB) is read without the bucket (48 MiB)
    or a saved chunk of it (24 MiB, what torch's reader loads whole). Bound: the 12 MiB read plus 4 MiB
    for the interpreter and torch while reading (zip directory, pickle, Python objects: measured
    under 1 MiB here); a whole-chunk read would exceed it by 12 MiB or more."""
    [(grown, part)] = run_local(_part_peak, 1, saved)
    for k, got in zip(fmt.BUCKET_TENSORS, part):
        assert torch.equal(got, _bucket(k)[2 * NUMEL:3 * NUMEL]), k
    need = 3 * NUMEL * 4
    assert need <= grown + (1 << 20) and grown < need + (4 << 20), (grown, need)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_model_tensors_merge_ep_slots_like_merge_expert_shards(tmp_path):
    """An EP checkpoint's experts read one at a time (the inference loader, init_from, twinpipe-convert)
    equal `merge_expert_shards` of the whole slots (EPLB replicas: expert 1 in slots 1 and 4)."""
    from twinpipe.parallel.experts.logical_state import merge_expert_shards

    g = torch.Generator().manual_seed(0)
    phy2log = torch.tensor([0, 1, 2, 3, 1, 2])  # 6 slots over ep=2, 4 experts
    slots = torch.randn(6, 3, 5, generator=g)
    slots[4], slots[5] = slots[1], slots[2]  # replicas are copies
    layer = "layers.1.mlp.experts"
    shards = [{f"{layer}.local.gate_proj": slots[3 * r:3 * r + 3].clone()} for r in range(2)]
    state = {fmt.MODEL: {f"{layer}.phy2log": phy2log, "norm.weight": torch.randn(5, generator=g)},
             **{fmt.expert_weights_key(r, 2): shards[r] for r in range(2)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    want = merge_expert_shards(state[fmt.MODEL], shards, num_experts=4)
    tensors = ModelTensors(tmp_path, num_experts=4)
    assert tensors.ep == 2
    assert torch.equal(tensors.read("norm.weight"), want["norm.weight"])
    for e in range(4):
        assert torch.equal(tensors.read(f"{layer}.gate_proj", e), want[f"{layer}.gate_proj"][e])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resume_reads_expert_rows_like_slots_to_logical(tmp_path):
    """Resuming an EP checkpoint under another layout reads each expert's weights and moments from its
    first slot (`reshard._SavedState.rows`): equal to `slots_to_logical` of the whole slots, the step
    of the EP ranks; replicas that differ are named."""
    from twinpipe.model.safetensors_io import CheckpointError
    from twinpipe.parallel.experts.logical_state import slots_to_logical
    from twinpipe.trainer.checkpoint.reshard import _SavedState

    g = torch.Generator().manual_seed(1)
    phy2log = torch.tensor([0, 1, 2, 3, 1, 2])  # 6 slots over ep=2, 4 experts; 1 and 2 replicated
    layer, name = "layers.1.mlp.experts", "layers.1.mlp.experts.local.up_proj"
    tensors = [torch.randn(6, 3, 5, generator=g) for _ in range(3)]  # weights, exp_avg, exp_avg_sq
    for t in tensors:
        t[4], t[5] = t[1], t[2]

    def save(path):
        state = {fmt.MODEL: {f"{layer}.phy2log": phy2log},
                 **{fmt.expert_weights_key(r, 2): {name: tensors[0][3 * r:3 * r + 3].clone()} for r in range(2)},
                 fmt.OPTIM: {fmt.OPTIM_STEP: 7, **{fmt.expert_optim_key(r): {name: {
                     "exp_avg": tensors[1][3 * r:3 * r + 3].clone(), "exp_avg_sq": tensors[2][3 * r:3 * r + 3].clone(),
                     "step": torch.tensor(7.0)}} for r in range(2)}}}
        dcp.save(state, checkpoint_id=path, no_dist=True)
        return _SavedState(path, {fmt.SEGMENTS: {}, "ep": 2})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = save(tmp_path / "ok")
        *rows, step = saved.rows(f"{layer}.up_proj", (4, 3, 5), [3, 1, 2])
        assert step == 7.0
        for got, t in zip(rows, tensors):
            assert torch.equal(got, slots_to_logical(t, phy2log, 4, check_replicas=True)[[3, 1, 2]])
        tensors[2][4] += 1.0  # a replica's second moment differs
        with pytest.raises(CheckpointError, match=r"logical expert 1: slots 1 and 4 \(replicas\) differ"):
            save(tmp_path / "bad").rows(f"{layer}.up_proj", (4, 3, 5), [1])
