"""Resume under another parallel layout: parallel.pp, parallel.schedule, parallel.ep (and the EPLB
slot count eplb.replicas) may all differ from the saved run, and parallel.dp with them.

Under the saved pp, schedule and ep the checkpoint's keys are this run's keys and
`checkpoint.load_checkpoint` loads them in one DCP read (DCP re-splits the ZeRO shards over another
dp): that fast path is unchanged. Otherwise a rank's ZeRO bucket (`dense_pp{r}_of{pp}`) holds other
parameters than any saved bucket, and its expert slots other experts, so `load_resharded` rebuilds
this rank's state parameter by parameter:

  dense parameters   meta.json's `segments` (bucket key -> [[parameter, offset, numel], ...], written
                     by every run since) locates each parameter in a saved bucket; the first saved
                     bucket holding it gives the parameter's range (master, exp_avg, exp_avg_sq: the
                     part this rank's shard holds, read alone) for this rank's shard. DualPipe's
                     copies of a stage sit in two buckets with identical state.
  expert parameters  saved under ep > 1: each EP rank's slots (weights `model_experts_ep{r}_of{ep}`,
                     AdamW moments and step `optim.experts_ep{r}`) give each logical expert through the
                     layer's saved `phy2log`: its first slot, its replicas checked equal bit for bit;
                     saved under ep = 1 they are bucket segments like the rest. This run's slots read
                     the rows of their experts (`layer.local_logical_ids`) alone (with
                     optim.shard_experts, saved or now, each slot's state is a DTensor Shard(1) of the
                     same tensor: read the same way, and a rank keeps its chunk), under its fresh
                     placement (`apply_expert_parallel`'s: a function-equal placement, EPLB re-plans
                     it at its next interval), or the saved placement when ep and the slot count are
                     the saved ones (a pp or schedule change only).
  the rest           model buffers (router biases) by name from "model", the optimizer step, and
                     the rank state (loader position, RNG) as in the fast path. Moments are cast to
                     this run's optim.moment_dtype (exact when it is the saved one), bucket
                     segments and expert slots (`zero.ExpertAdamW`) alike.

Memory: reads are ranged (`ranged.py`): a dense parameter's part of this rank's shard is read alone
out of the saved bucket (master and moments: 12 bytes per element with fp32 moments), never the
bucket; an expert's rows are read one expert at a time. So the peak beyond this rank's own state is
one parameter's part of its shard, or one expert's (tests/trainer/test_ranged_reads.py measures it).

Still refused, with the key and what is allowed: a checkpoint without a segment table (written before
this existed, or by optim.zero=deepspeed, which resumes only under its saved layout and dp), another
optim.zero, another model config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from twinpipe.model.safetensors_io import CheckpointError
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer.checkpoint import format as fmt
from twinpipe.trainer.checkpoint.ranged import RangedReader, read_flat

def run_layout(cfg: DictConfig, grid: Any, num_experts: int) -> dict[str, Any]:
    """This run's layout as meta.json records it."""
    values = (grid.pp, grid.dp, grid.ep, cfg.parallel.schedule,
              (cfg.eplb.replicas or num_experts) if grid.ep > 1 else None, cfg.optim.zero)
    return dict(zip(fmt.LAYOUT, values))


def gather_segments(optimizer: Any) -> dict[str, list[list[Any]]] | None:
    """Every rank's bucket segment tables, merged (collective over the world); None for an optimizer
    without them (DeepSpeed's)."""
    if not hasattr(optimizer, "segment_table"):
        return None
    table = optimizer.segment_table()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return table
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, table)
    return {key: segments for part in parts for key, segments in part.items()}


def layout_changes(path: Path, meta: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """What differs between the saved layout and this run's, as `key=saved -> now` (empty: the fast
    path applies; dp alone is no change). Another optim.zero is refused here."""
    zero = meta.get("zero", layout["zero"])
    if zero != layout["zero"]:
        raise ValueError(f"{path}: saved with optim.zero={zero}, resuming with optim.zero={layout['zero']}: "
                         f"their optimizer states have different formats; resume with optim.zero={zero}")
    saved = {"pp": int(meta.get("pp", 1)), "ep": int(meta.get("ep", 1)), "schedule": meta.get("schedule"),
             "expert_slots": meta.get("expert_slots", layout["expert_slots"])}
    changes = [f"parallel.{k}={saved[k]} -> {layout[k]}" for k in ("pp", "ep") if saved[k] != layout[k]]
    if (max(saved["pp"], layout["pp"]) > 1 and saved["schedule"] is not None
            and saved["schedule"] != layout["schedule"]):
        changes.append(f"parallel.schedule={saved['schedule']} -> {layout['schedule']}")
    if saved["ep"] == layout["ep"] and saved["expert_slots"] != layout["expert_slots"]:
        changes.append(f"expert slots (eplb.replicas) {saved['expert_slots']} -> {layout['expert_slots']}")
    return changes


class _SavedState:
    """The saved optimizer state per parameter in the plain (ep = 1) model's names and shapes: a
    parameter's range of a saved bucket is read alone (`ranged.read_flat`), expert slots per (layer,
    parameter)."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.ep = path, int(meta.get("ep", 1))
        self.reader = RangedReader(path)
        self.saved = self.reader.read_metadata().state_dict_metadata
        self.where: dict[str, tuple[str, int, int]] = {}  # parameter -> (bucket key, offset, numel)
        for key, table in meta[fmt.SEGMENTS].items():
            for name, start, numel in table:
                self.where.setdefault(name, (key, int(start), int(numel)))
        self.step = int(self.read({fmt.OPTIM: {fmt.OPTIM_STEP: 0}})[fmt.OPTIM][fmt.OPTIM_STEP])

    def read(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fill a nested state dict from the checkpoint, in this process alone."""
        with ckpt.single_process_quiet():
            dcp.load(state, storage_reader=self.reader, no_dist=True)
        return state

    def empty(self, flat: str) -> torch.Tensor:
        return ckpt.empty_saved(self.path, self.saved, flat)

    def part(self, name: str, shape: tuple[int, ...], lo: int, hi: int) -> list[torch.Tensor]:
        """Elements [lo, hi) of [master, exp_avg, exp_avg_sq] of parameter `name` (flattened): read
        alone from its saved bucket, or from the expert rows they cover of a saved EP layer."""
        if name in self.where:
            key, start = self._located(name, shape)
            return [read_flat(self.reader, f"{fmt.OPTIM}.{key}.{k}", start + lo, start + hi)
                    for k in fmt.BUCKET_TENSORS]
        row = math.prod(shape[1:])
        first, last = lo // row, -(-hi // row)
        rows = self.rows(name, shape, list(range(first, last)))[:3]
        return [t.reshape(-1)[lo - first * row:hi - first * row] for t in rows]

    def _located(self, name: str, shape: tuple[int, ...]) -> tuple[str, int]:
        key, start, saved_numel = self.where[name]
        if saved_numel != torch.Size(shape).numel():
            raise CheckpointError(f"{self.path}: {name} has {saved_numel} elements in bucket {key}, "
                                  f"{torch.Size(shape).numel()} {list(shape)} here: saved under a different "
                                  "model config?")
        return key, start

    def rows(self, name: str, shape: tuple[int, ...], experts: list[int]) -> list[Any]:
        """[master, exp_avg, exp_avg_sq] of logical experts `experts` of the stacked expert parameter
        `name` (plain model's name, shaped `shape` = [E, ...]), [len(experts), ...] each, then its
        AdamW step: read row by row from its saved bucket, or from the slots of a saved EP layer."""
        if name in self.where:
            key, start = self._located(name, shape)
            keys = [f"{fmt.OPTIM}.{key}.{k}" for k in fmt.BUCKET_TENSORS]
            row = math.prod(shape[1:])
            return self._gather(shape, experts, lambda e: [
                read_flat(self.reader, k, start + e * row, start + (e + 1) * row) for k in keys]) + [float(self.step)]
        layer, _, param = name.rpartition(".")
        from twinpipe.parallel.experts.logical_state import PLACEMENT

        if self.ep > 1 and f"{fmt.MODEL}.{layer}.{PLACEMENT}" in self.saved:
            return self._expert_rows(layer, param, shape, experts)
        raise CheckpointError(f"{self.path}: no optimizer state for parameter {name}: in none of the saved "
                              f"buckets ({', '.join(sorted({k for k, _, _ in self.where.values()}))}) and "
                              "not an expert slot tensor of the saved run; saved under a different model "
                              "config?")

    @staticmethod
    def _gather(shape: tuple[int, ...], experts: list[int], read: Any) -> list[torch.Tensor]:
        """[len(experts), *shape[1:]] for each tensor `read(expert)` gives (flat rows)."""
        out: list[torch.Tensor] = []
        for i, e in enumerate(experts):
            for j, value in enumerate(read(e)):
                if i == 0:
                    out.append(torch.empty(len(experts), *shape[1:], dtype=value.dtype))
                out[j][i] = value.view(shape[1:])
        return out

    def _expert_master_key(self, ep_rank: int, slot: str) -> str:
        master = f"{fmt.OPTIM}.{fmt.expert_optim_key(ep_rank)}.{slot}.{fmt.BUCKET_TENSORS[0]}"
        return master if master in self.saved else f"{fmt.expert_weights_key(ep_rank, self.ep)}.{slot}"

    def _expert_rows(self, layer: str, param: str, shape: tuple[int, ...], experts: list[int]) -> list[Any]:
        """`rows` of a layer saved under ep > 1: each expert's weights and moments from its first slot;
        its other slots (EPLB replicas) must hold the same bits (checked)."""
        from twinpipe.parallel.experts.logical_state import LOCAL, PLACEMENT
        from twinpipe.parallel.experts.slots import placement_tables

        slot = f"{layer}.{LOCAL}{param}"
        ranks = range(self.ep)
        # the weights: the slots' FP32 master where the run kept one (optim.param_dtype=bf16), else the model's
        keys = [[self._expert_master_key(r, slot)]
                + [f"{fmt.OPTIM}.{fmt.expert_optim_key(r)}.{slot}.{k}" for k in fmt.MOMENTS] for r in ranks]
        for k in [f"{fmt.OPTIM}.{fmt.expert_optim_key(r)}.{slot}.{fmt.OPTIM_STEP}" for r in ranks] + sum(keys, []):
            self.empty(k)  # a CheckpointError naming a missing key
        placement = f"{fmt.MODEL}.{layer}.{PLACEMENT}"
        num_slots, per_rank = self.saved[placement].size[0], self.saved[keys[0][0]].size[0]
        saved_shape = tuple(self.saved[keys[0][0]].size[1:])
        if per_rank * self.ep != num_slots or saved_shape != tuple(shape[1:]):
            raise CheckpointError(f"{self.path}: {slot} gives experts of shape {[num_slots, *saved_shape]} "
                                  f"({per_rank} slots per EP rank), {list(shape)} here: saved under a "
                                  "different model config?")
        steps = {float(read_flat(self.reader, f"{fmt.OPTIM}.{fmt.expert_optim_key(r)}.{slot}.{fmt.OPTIM_STEP}", 0, 1))
                 for r in ranks}
        if len(steps) != 1:
            raise CheckpointError(f"{self.path}: {slot}: the EP ranks saved different AdamW steps "
                                  f"{sorted(steps)}")
        try:
            log2phy, _ = placement_tables(read_flat(self.reader, placement, 0, num_slots).to(torch.int64), shape[0])
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {placement}: {exc}") from exc
        row = math.prod(saved_shape)

        def read(p: int) -> list[torch.Tensor]:  # weights, exp_avg, exp_avg_sq of physical slot p
            r, local = divmod(p, per_rank)
            return [read_flat(self.reader, k, local * row, (local + 1) * row) for k in keys[r]]

        def first_slot(e: int) -> list[torch.Tensor]:
            first, *replicas = [p for p in log2phy[e].tolist() if p >= 0]
            values = read(first)
            for p in replicas:
                if not all(torch.equal(a, b) for a, b in zip(read(p), values)):
                    raise CheckpointError(f"{self.path}: {slot}: logical expert {e}: slots {first} and {p} "
                                          "(replicas) differ")
            return values
        return self._gather(shape, experts, first_slot) + [steps.pop()]


def _check_model_config(path: Path, model_cfg: DictConfig) -> None:
    saved = OmegaConf.to_container(OmegaConf.load(Path(path) / fmt.CONFIG).model, resolve=True)
    now = OmegaConf.to_container(model_cfg, resolve=True)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        was = ", ".join(f"model.{k}={saved.get(k)}" for k in differ)
        now_set = ", ".join(f"model.{k}={now.get(k)}" for k in differ)
        raise ValueError(f"{path}: saved with another model config ({was}, here {now_set}); a resume needs "
                         "the saved model (the layout may change)")


@torch.no_grad()
def _load_model_state(path: Path, model: nn.Module, saved: _SavedState) -> None:
    """Buffers (router biases) and dense weights by name from "model"; the parameters it lacks (expert
    slots) come from the optimizer's master weights, placements are set by the caller."""
    from twinpipe.parallel.experts.logical_state import PLACEMENT

    params = {n for n, _ in model.named_parameters()}
    want, absent = {}, []
    for key, value in model.state_dict().items():
        flat = f"{fmt.MODEL}.{key}"
        if value.is_meta or key.endswith("." + PLACEMENT):
            continue
        if flat in saved.saved:
            if tuple(saved.saved[flat].size) != tuple(value.shape):
                raise CheckpointError(f"{path}: {flat} is {list(saved.saved[flat].size)} in the checkpoint, "
                                      f"{list(value.shape)} here: saved under a different model config?")
            want[key] = value
        elif key not in params:
            absent.append(flat)
    if absent:
        raise CheckpointError(f"{path}: no key {absent[0]} ({len(absent)} buffers missing); saved under a "
                              "different model config?")
    saved.read({fmt.MODEL: want})
    model.load_state_dict(want, strict=False)


@torch.no_grad()
def load_resharded(path: Path, model: nn.Module, optimizer: Any, changes: list[str],
                   model_cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill this rank's model and optimizer (`trainer.zero.ZeroAdamW`) from checkpoint `path` saved under
    another layout (`changes`, from `layout_changes`); return (meta, this rank's rank state). All ranks
    call it together (the buckets' all-gather)."""
    from twinpipe.parallel.experts.logical_state import PLACEMENT, split_slot_name
    from twinpipe.parallel.experts.layer import ExpertParallelExperts

    meta = ckpt.read_meta(path)
    if fmt.SEGMENTS not in meta or not hasattr(optimizer, "segment_table"):
        raise ValueError(f"{path}: resuming with {', '.join(changes)}, but the checkpoint has no parameter "
                         "segment table in meta.json (saved before resumes across layouts existed, or with "
                         "optim.zero=deepspeed): resume with the saved parallel.pp, parallel.schedule and "
                         "parallel.ep (the model weights alone load anywhere with load_model_for_inference)")
    _check_model_config(path, model_cfg)
    saved = _SavedState(path, meta)
    _load_model_state(path, model, saved)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}
    if not any(c.startswith(("parallel.ep", "expert slots")) for c in changes):
        for name, layer in layers.items():  # same ep and slots: keep the saved (EPLB) placement
            key = f"{fmt.MODEL}.{name}.{PLACEMENT}"
            layer.set_placement(saved.read({fmt.MODEL: {f"{name}.{PLACEMENT}": saved.empty(key)}})
                                [fmt.MODEL][f"{name}.{PLACEMENT}"])
    for b in optimizer.buckets:
        for s in b.segments:
            lo, hi = max(s.start, b.lo), min(s.start + s.param.numel(), b.hi)
            if lo < hi:  # this rank's shard holds [lo, hi) of the bucket, part of this parameter
                state = saved.part(s.name, tuple(s.param.shape), lo - s.start, hi - s.start)
                for dst, src in zip((b.master, b.exp_avg, b.exp_avg_sq), state):
                    dst[lo - b.lo:hi - b.lo] = src
        b.publish()
    for p, name in optimizer.expert_names.items():
        layer_name, param = split_slot_name(name)
        layer = layers[layer_name]
        master, exp_avg, exp_avg_sq, step = saved.rows(f"{layer_name}.{param}", (layer.num_experts, *p.shape[1:]),
                                                       layer.local_logical_ids().tolist())  # this rank's slots
        st, own = optimizer.expert_opt.state[p], optimizer.expert_opt.owned  # own: this rank's chunk
        p.copy_(master)                                                    # (optim.shard_experts)
        if "master" in st:  # BF16 parameters: p is the rounding of the FP32 master
            st["master"].copy_(own(p, master))
        st["exp_avg"].copy_(own(p, exp_avg))
        st["exp_avg_sq"].copy_(own(p, exp_avg_sq))
        st["step"].fill_(step)
    optimizer.step_count = saved.step
    return meta, ckpt.read_rank_state(path)
