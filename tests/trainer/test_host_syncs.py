"""A training step waits for the device once: the host syncs and object collectives of one step.

Counted with `host_syncs.HostSyncs` (see there for what counts and how values already on the host are
told apart) around a 3-step run of the tiny recipe, at step 2 (a steady, unlogged step), on every rank
of pp=1, pp=2 DualPipeV and dp=2 x ep=2. The trainer's own code (trainer/, the pipeline runner) waits
for the device once per step: `step.to_host`, the one transfer of the loss, grad norm, balance loss,
expert counts and stop flag, which whether to step and the clip coefficient need. No step makes a
Python-object collective. Syncs elsewhere (the MoE layers' `bincount`s, expert dispatch's split sizes,
`expert_grad_sq`) are listed by `python tests/trainer/host_syncs.py` and not held here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import HostSyncs, count_layout, is_sync  # noqa: E402

# the trainer's sites: trainer/ and the pipeline runner
OURS = ("trainer/", "parallel/pipeline/")
# reads of tensors made on the host (no device copy on a GPU either), which the harness cannot tell
# from device tensors: the pipeline's micro-batch indices and ExpertAdamW's step counter
HOST_MADE = {("int", "parallel/pipeline/runner.py", "__call__"), ("int", "trainer/optim/zero.py", "step")}


def _ours(records: dict) -> dict[tuple[str, str], int]:
    """The syncs at the trainer's own sites, by (kind, file (function))."""
    out: dict[tuple[str, str], int] = {}
    for (kind, site), n in records.items():
        path, _, func = site.partition(" ")
        file = path.rsplit(":", 1)[0]
        if is_sync(kind) and file.startswith(OURS) and (kind, file, func.strip("()")) not in HOST_MADE:
            out[(kind, f"{file} {func}")] = out.get((kind, f"{file} {func}"), 0) + n
    return out


@pytest.mark.parametrize("layout", ["pp1", "pp2-dualpipev", "dp2-ep2"])
def test_one_wait_per_step_and_no_object_collectives(layout, data_dir, tmp_path):
    ranks = count_layout(layout, data_dir, tmp_path)
    for rank, by_step in enumerate(ranks):
        step = by_step[2]
        collectives = {site: n for (kind, site), n in step.items() if kind.endswith("_object")
                       or kind.endswith("object_list")}
        assert not collectives, (layout, rank, collectives)
        # the recipe gives no position_ids: no stage reads them back for a document mask
        masks = {site: n for (kind, site), n in step.items() if "document_causal_mask" in site}
        assert not masks, (layout, rank, masks)
        assert _ours(step) == {("cpu", "trainer/step.py (to_host)"): 1}, (layout, rank, step)


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
