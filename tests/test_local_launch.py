import pytest
import torch
import torch.distributed as dist

from twinpipe.parallel.local import run_local


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item() * scale


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def test_run_local_collects_results_by_rank():
    assert run_local(_sum_ranks, 3, 2.0) == [6.0, 6.0, 6.0]


def test_run_local_reraises_with_rank_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*boom on rank 1"):
        run_local(_fail_on_one, 2, timeout_s=60)


def _return_tensor(rank, world_size):
    return {"rank": rank, "t": torch.full((1000,), float(rank))}


def test_run_local_returns_tensors_by_value():
    # Tensors must survive the rank's exit (storage is copied, not shared by file descriptor).
    for _ in range(5):
        out = run_local(_return_tensor, 2)
        assert [o["rank"] for o in out] == [0, 1]
        assert torch.equal(out[1]["t"], torch.ones(1000))
