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


_JOBS = """
import os, sys, torch, torch.distributed as dist
from twinpipe.parallel.local import run_local

def job(rank, world, tag):
    # a rank that met another job's store would see its key missing or foreign, or a wrong sum
    store = dist.distributed_c10d._get_default_store()
    store.set(f"tag{rank}", tag)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return [store.get(f"tag{r}").decode() for r in range(world)], t.item(), os.environ["MASTER_PORT"]

for i in range(int(sys.argv[1])):
    tag = f"{os.getpid()}-{i}"
    out = run_local(job, 2, tag, timeout_s=120)
    assert all(o[0] == [tag, tag] and o[1] == 3.0 for o in out), out
    assert out[0][2] == out[1][2] != "0", out
print("ok")
"""


def test_concurrent_run_local_jobs_do_not_meet():
    """Two processes start run_local jobs at the same time, four each: every job's ranks join their own
    store (rank 0 binds it on an OS-assigned port; no probed port another job could take)."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _JOBS, "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(o.strip().endswith("ok") for o in outs), outs
