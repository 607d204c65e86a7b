"""A training step waits for the device once, and once more per expert-parallel dispatch: the host syncs
and object collectives of one step.

Counted with `host_syncs.HostSyncs` (see there for what counts and how values already on the host are
told apart) around a 3-step run of the tiny recipe, at step 2 (a steady, unlogged step), on every rank
of pp=1, pp=2 DualPipeV and dp=2 x ep=2, at every call site in the repository. The trainer waits once
per step: `step.to_host`, the one transfer of the loss, grad norm, balance loss, expert counts and stop
flag, which whether to step and the clip coefficient need. Under expert parallelism each MoE layer's
dispatch also reads its all-to-all split sizes (one `tolist`, both directions), which the collective
takes on the host. Nothing else syncs: the MoE layers count their picks without `bincount`, the
dispatch's permutation is sized from the split sizes, and the experts' squared grad norm stays on the
device. No step makes a Python-object collective.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import HostSyncs, count_layout, is_sync  # noqa: E402

# reads of tensors made on the host (no device copy on a GPU either), which the harness cannot tell
# from device tensors: the pipeline's micro-batch indices and ExpertAdamW's step counter
HOST_MADE = {("int", "parallel/pipeline/runner.py", "__call__"), ("int", "trainer/optim/zero.py", "step")}
TO_HOST = ("cpu", "trainer/step.py (to_host)")
# the tiny recipe's MoE layers (1 block + the MTP block) times a dp=2 rank's micro-batches (8 / 2 / 2)
DISPATCHES = 2 * 2
# the syncs of one step on each rank, by (kind, file (function))
EXPECTED = {
    "pp1": {TO_HOST: 1},
    "pp2-dualpipev": {TO_HOST: 1},
    "dp2-ep2": {TO_HOST: 1, ("tolist", "parallel/experts/dispatch.py (dispatch)"): DISPATCHES},
}


def _syncs(records: dict) -> dict[tuple[str, str], int]:
    """The syncs at every site but the reads of host-made tensors, by (kind, file (function))."""
    out: dict[tuple[str, str], int] = {}
    for (kind, site), n in records.items():
        path, _, func = site.partition(" ")
        file = path.rsplit(":", 1)[0]
        if is_sync(kind) and (kind, file, func.strip("()")) not in HOST_MADE:
            out[(kind, f"{file} {func}")] = out.get((kind, f"{file} {func}"), 0) + n
    return out


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_one_wait_per_step_and_per_dispatch(layout, data_dir, tmp_path):
    ranks = count_layout(layout, data_dir, tmp_path)
    for rank, by_step in enumerate(ranks):
        step = by_step[2]
        collectives = {site: n for (kind, site), n in step.items() if kind.endswith("_object")
                       or kind.endswith("object_list")}
        assert not collectives, (layout, rank, collectives)
        # the recipe gives no position_ids: no stage reads them back for a document mask
        masks = {site: n for (kind, site), n in step.items() if "document_causal_mask" in site}
        assert not masks, (layout, rank, masks)
        assert _syncs(step) == EXPECTED[layout], (layout, rank, step)


def test_the_harness_tells_syncs_from_host_reads():
    """A read of a tensor is a sync; a read of what `.cpu()` returned, or of what was computed from
    it, is not."""
    from twinpipe.trainer.step import to_host

    x = torch.arange(4.0)
    with HostSyncs() as h:
        x.sum().item()                # a sync
        y = (x * 2).cpu()             # a sync; y is on the host
        (y + 1).tolist()              # a host read
        float(to_host(x.sum())[0])    # to_host's transfer (a sync), then a host read
    kinds: dict[str, int] = {}
    for (kind, _site), n in h.by_step[0].items():
        kinds[kind] = kinds.get(kind, 0) + n
    assert kinds == {"item": 1, "cpu": 2, "host tolist": 1, "host float": 1}, kinds
