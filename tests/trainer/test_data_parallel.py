"""ZeRO-1 data parallelism (gloo, forked ranks) reproduces one process on the same global batch.

Tolerance: the arithmetic differs only in the order of fp32 additions — one process accumulates the
gradient over 4 micro-batches, dp ranks accumulate their share and all-reduce the sums (and the
logged loss is a sum of rank shares). `one_process.assert_matches_one_process` compares exactly what
is identical (step 1's expert loads, every step's load totals) and the rest within the tolerances
measured and explained there (step 1 rel 1e-6; later losses rel 1e-5 while the routing agrees); any
real bug (a missing rank, a wrong scale, a stale shard) moves the loss by > 1e-3.
"""

import pytest
import torch

from twinpipe.parallel.local import run_local
from twinpipe.trainer.loop import train
from twinpipe.trainer.metrics import read_metrics
from one_process import assert_matches_one_process
from trainer_recipe import make_cfg

STEPS = 3
COMMON = [f"train.steps={STEPS}", "checkpoint.every=0", "checkpoint.at_end=false", "resume=never"]


def _rank(rank, world, data_dir, run_dir):
    summary = train(make_cfg(data_dir, run_dir, f"parallel.dp={world}", *COMMON))
    return summary["optimizer_state_bytes"], summary["num_params"]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp1")
    summary = train(make_cfg(data_dir, run_dir, *COMMON))
    return summary, read_metrics(run_dir)


def _matches_single(ref: list[dict], run_dir) -> list[dict]:
    """The run's metrics, step for step as the one-process reference (`assert_matches_one_process`)."""
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert_matches_one_process(ref, got, later_grad=1e-5)
    return got


@pytest.mark.parametrize("world", [2, 4])
def test_dp_equals_single_process(world, single, data_dir, tmp_path):
    ref_summary, ref = single
    out = run_local(_rank, world, data_dir, tmp_path)
    got = _matches_single(ref, tmp_path)
    for a, b in zip(ref, got):
        assert b["lr"] == a["lr"]
    assert ref[-1]["loss"] < ref[0]["loss"]
    # optimizer state: 3 fp32 values (master, exp_avg, exp_avg_sq) per parameter, split over ranks
    numel = ref_summary["num_params"]
    assert ref_summary["optimizer_state_bytes"] == 12 * numel
    per_rank = [b for b, _ in out]
    assert sum(per_rank) == 12 * numel
    assert max(per_rank) <= 12 * (numel // world + 1)


def _deepspeed_rank(rank, world, data_dir, run_dir, steps, resume):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = make_cfg(data_dir, run_dir, f"parallel.dp={world}", "optim.zero=deepspeed", f"train.steps={steps}",
                   "checkpoint.every=2", f"resume={resume}")
    return train(cfg)["optimizer_state_bytes"]


def test_deepspeed_zero1_matches_ours_and_resumes(single, data_dir, tmp_path):
    """DeepSpeed's ZeRO-1 driven like its pipeline engine (dp=2, gloo): same losses as one process
    (tolerance as above), half the optimizer state per rank, and an exact resume at the same dp."""
    _, ref = single
    run_local(_deepspeed_rank, 2, data_dir, tmp_path, 2, "never")
    out = run_local(_deepspeed_rank, 2, data_dir, tmp_path, STEPS, "auto")  # resumes at step 2
    _matches_single(ref, tmp_path)
    numel = single[0]["num_params"]
    # master + exp_avg + exp_avg_sq of a half (DeepSpeed pads partitions to an alignment)
    assert all(12 * numel / 2 <= b <= 12 * (numel / 2 + 64) for b in out), (out, numel)


def _ep_rank(rank, world, data_dir, run_dir, steps, resume):
    cfg = make_cfg(data_dir, run_dir, f"parallel.dp={world}", "parallel.ep=2", "eplb.every=2",
                   "eplb.replicas=12", f"train.steps={steps}", "checkpoint.every=2", f"resume={resume}")
    return train(cfg)["last"]


def test_expert_parallel_with_eplb_matches_and_resumes(single, data_dir, tmp_path):
    """dp=2 with the experts split over ep=2 (12 slots for 8 experts, an EPLB re-plan after step 2
    that moves weights and AdamW state), stopped at step 2 and resumed: the same losses and exactly
    the same expert counts as one process without expert parallelism (tolerance as above)."""
    _, ref = single
    last = run_local(_ep_rank, 2, data_dir, tmp_path, 2, "never")
    assert "eplb/slots_received" in last[0]
    run_local(_ep_rank, 2, data_dir, tmp_path, STEPS, "auto")
    _matches_single(ref, tmp_path)


def _resharded_rank(rank, world, data_dir, run_dir, steps, resume):
    cfg = make_cfg(data_dir, run_dir, f"parallel.dp={world}", f"train.steps={steps}", "checkpoint.every=2",
                   f"resume={resume}")
    return train(cfg)["step"]


def test_resume_with_another_dp_size(single, data_dir, tmp_path):
    """Saved at step 2 by 2 ranks, resumed by 4: ZeRO shards re-split by torch.distributed.checkpoint,
    the loader continues at the next global sample; losses as one process (tolerance as above)."""
    _, ref = single
    run_local(_resharded_rank, 2, data_dir, tmp_path, 2, "never")
    assert run_local(_resharded_rank, 4, data_dir, tmp_path, STEPS, "auto") == [STEPS] * 4
    _matches_single(ref, tmp_path)
