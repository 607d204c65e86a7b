"""Counting the host synchronisations and Python-object collectives of a training step.

On a GPU the host runs ahead of the device until it needs a value the device computes: `.item()`,
`.tolist()`, `.cpu()`, `float/int/bool(tensor)` and the data-dependent shapes (`nonzero`, `bincount`,
`unique`, `repeat_interleave` without `output_size`, boolean-mask indexing) each wait for the device to
drain its queue, which stalls a pipeline schedule whose overlap relies on the host being ahead. A
Python-object collective (`all_gather_object`, ...) pickles and runs two collectives, one of them a
host sync for the sizes.

`HostSyncs` records every such call while it is active, by call site (the innermost frame in
twinpipe, as `path:line (function)`), and by training step: `TrainStep.__call__` is wrapped so that
a call made during or after step k's call (and before step k+1's) counts for step k. On a CPU run every
tensor is on the host, so a recorded call is one that *would* sync where the tensor lives on a GPU.
Values already copied to the host are told apart: a tensor `.cpu()` returned, and every tensor an op
computes from one (not in place), is marked, and reading it is recorded as `host <method>` (no sync
on any device).
Tensors made on the host from the start (an optimizer's CPU step counter, the pipeline's micro-batch
indices) are not marked: their reads show as syncs here, and the report names them.

Run `python tests/trainer/host_syncs.py` for the per-step counts of the tiny recipe at pp=1, pp=2
DualPipeV and dp=2 x ep=2 (tests/trainer/test_host_syncs.py holds the step to them).
"""

from __future__ import annotations

import collections
import sys
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = str(Path(__file__).resolve().parents[2])
HERE = str(Path(__file__).resolve())

# Tensor methods that return a host value (each a device -> host copy and a wait on a GPU tensor)
TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# Python-object collectives (pickle + a size exchange + the payload)
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
# ops whose output shape depends on the values (the host waits for them on a GPU)
DATA_DEPENDENT = {"nonzero", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
                  "unique_dim", "masked_select", "repeat_interleave"}


def call_site() -> str:
    """The innermost frame of the repository outside this file: `path:line (function)`."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(REPO) and frame.filename != HERE and "/.venv/" not in frame.filename:
            return f"{frame.filename[len(REPO) + 1:]}:{frame.lineno} ({frame.name})"
    return "<outside twinpipe>"


class _Dispatch(TorchDispatchMode):
    """Records the ops with data-dependent shapes and marks what is computed from host values."""

    def __init__(self, harness: "HostSyncs") -> None:
        super().__init__()
        self.harness = harness

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in DATA_DEPENDENT and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.harness.record(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else ()) if i is not None):
            self.harness.record("bool-mask index")
        out = func(*args, **kwargs)
        # an in-place op leaves its tensor where it is (e.g. a router bias updated from host counts: on
        # the host here, where `.to(device)` returns the same tensor, but on a GPU a device tensor)
        if not func._schema.is_mutable and any(self.harness.on_host(t) for t in tree_leaves((args, kwargs))):
            for t in tree_leaves(out):
                self.harness.mark_host(t)
        return out


class HostSyncs:
    """`with HostSyncs() as h: train(cfg)`; then `h.by_step[k]` is a Counter of (kind, site) for step k
    (0: before the first step)."""

    def __init__(self) -> None:
        self.by_step: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.step = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self._busy = False
        self._host: set[int] = set()  # ids of the tensors holding values already on the host

    def mark_host(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in self._host:
            self._host.add(id(t))
            weakref.finalize(t, self._host.discard, id(t))

    def on_host(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self._host

    def record(self, kind: str) -> None:
        if self._busy:  # a sync inside a recorded call (e.g. tolist's own conversions)
            return
        self._busy = True
        try:
            self.by_step[self.step][(kind, call_site())] += 1
        finally:
            self._busy = False

    def _patch(self, owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)
        harness = self

        def counted(*args, **kwargs):
            harness.record(f"host {kind}" if args and harness.on_host(args[0]) else kind)
            if harness._busy:
                return original(*args, **kwargs)
            harness._busy = True  # nested calls (tolist -> __float__, all_gather_object -> all_gather) are one
            try:
                out = original(*args, **kwargs)
            finally:
                harness._busy = False
            if kind == "cpu":
                harness.mark_host(out)
            return out

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self) -> "HostSyncs":
        from twinpipe.trainer.step import TrainStep

        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name, name.strip("_"))
        for name in OBJECT_COLLECTIVES:
            self._patch(dist, name, name)
        call, harness = TrainStep.__call__, self

        def step_call(step_self, *args, **kwargs):
            harness.step += 1
            return call(step_self, *args, **kwargs)

        self._saved.append((TrainStep, "__call__", call))
        TrainStep.__call__ = step_call
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)



# (name, world size, overrides) of the layouts counted; 4 layers so each pipeline stage has a block
LAYOUTS = {
    "pp1": (1, []),
    "pp2-dualpipev": (2, ["parallel.pp=2", "parallel.schedule=dualpipev", "model.num_hidden_layers=4"]),
    "dp2-ep2": (2, ["parallel.dp=2", "parallel.ep=2"]),
}
STEPS = 3  # step 2 is a steady, unlogged step; step 3 (the last) is logged
COMMON = [f"train.steps={STEPS}", "checkpoint.every=0", "checkpoint.at_end=false", "resume=never",
          "logging.every=100"]


def _count_rank(rank: int, world: int, data_dir: Path, run_dir: Path, overrides: list[str]) -> dict:
    sys.path.insert(0, str(Path(HERE).parent))
    from trainer_recipe import make_cfg

    from twinpipe.trainer.loop import train

    cfg = make_cfg(data_dir, run_dir, *COMMON, *overrides)
    with HostSyncs() as h:
        train(cfg)
    return {k: dict(v) for k, v in h.by_step.items()}


def count_layout(name: str, data_dir: Path, run_dir: Path) -> list[dict]:
    """Each rank's {step: {(kind, site): count}} for one training run of layout `name`."""
    from twinpipe.parallel.local import run_local

    world, overrides = LAYOUTS[name]
    return run_local(_count_rank, world, data_dir, run_dir, overrides)


def is_sync(kind: str) -> bool:
    """A record that waits for the device (all but the reads of values already on the host)."""
    return not kind.startswith("host ")


def main() -> None:
    import tempfile

    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        train_bpe(corpus_sample(200_000), 512).save(data_dir / "tok")
        for name in LAYOUTS:
            ranks = count_layout(name, data_dir, Path(tmp) / name)
            for step, label in ((2, "steady step"), (STEPS, "logged step")):
                per_rank = [sum(n for (kind, _), n in r.get(step, {}).items() if is_sync(kind)) for r in ranks]
                print(f"== {name}, {label} {step}: syncs + object collectives per rank {per_rank}")
                sites = collections.Counter()
                for r in ranks:
                    sites.update(r.get(step, {}))
                for (kind, site), n in sorted(sites.items(), key=lambda kv: kv[0][1]):
                    print(f"  {n:4d}  {kind:20s} {site}")


if __name__ == "__main__":
    main()
