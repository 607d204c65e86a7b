"""The loader: dp sharding gives the dp=1 global batch, exact resume (also across dp sizes), epochs,
held-out evaluation, and the embedded corpus end to end."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from twinpipe.data.loader import PackedDataset, PackedLoader, eval_batches
from twinpipe.data.packing import IGNORE_INDEX, TokenArray
from twinpipe.data.tokenizer import default_tokenizer
from twinpipe.parallel.local import run_local

SEQ = 16


def synthetic_dataset(num_docs=60, seed=0, **kwargs):
    """Documents of 3..40 tokens; token values encode (document, position) so samples are distinct."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 41, size=num_docs)
    docs = [np.append(np.arange(2 + 100 * i, 2 + 100 * i + n - 1) % 60000, 1) for i, n in
            enumerate(lengths)]
    tokens = np.concatenate(docs).astype(np.uint16)  # [num_tokens]
    return PackedDataset(TokenArray(tokens, np.cumsum(lengths), f"synthetic-{seed}"), SEQ, pad_id=2,
                         eos_id=1, **kwargs)


def cat_step(micro_batches):
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def global_batches(dataset, steps, dp_size, micro_batch, global_batch=8, seed=3, state=None):
    """Per step, the concatenation over dp ranks (in rank order) of their micro-batches."""
    loaders = [PackedLoader(dataset, global_batch, micro_batch, r, dp_size, seed) for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        per_rank = [cat_step(loader.next_step()) for loader in loaders]
        out.append({k: torch.cat([p[k] for p in per_rank]) for k in per_rank[0]})
    return out, loaders[0].state_dict()


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_micro_batch_shapes_and_counts():
    ds = synthetic_dataset(reset_position_ids=True)
    loader = PackedLoader(ds, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, seed=0)
    mbs = loader.next_step()
    assert len(mbs) == loader.num_micro_batches == 2
    for mb in mbs:
        # position_ids only when some row restarts (after an eos): otherwise the causal path, no sync
        assert {"input_ids", "labels"} <= set(mb) <= {"input_ids", "labels", "position_ids"}
        assert "position_ids" not in mb or (mb["position_ids"][:, 1:] == 0).any()
        assert all(v.shape == (2, SEQ) and v.dtype == torch.int64 for v in mb.values())
    assert loader.state_dict()["next_sample"] == 8


def test_position_ids_only_when_documents_restart():
    flat = PackedLoader(synthetic_dataset(), global_batch=8, micro_batch=8, seed=0).next_step()[0]
    assert set(flat) == {"input_ids", "labels"}  # reset_position_ids=False: every row counts 0..T-1
    reset = synthetic_dataset(reset_position_ids=True)
    batch = reset.batch(list(range(len(reset))))
    assert (batch["position_ids"][:, 1:] == 0).any()
    plain = [i for i in range(len(reset)) if reset.sample(i)["position_ids"][-1] == SEQ - 1]
    assert plain and set(reset.batch(plain[:1])) == {"input_ids", "labels"}


@pytest.mark.parametrize("dp_size,micro_batch", [(2, 2), (4, 1), (2, 4)])
def test_dp_ranks_concatenate_to_the_dp1_batch(dp_size, micro_batch):
    ds = synthetic_dataset()
    reference, _ = global_batches(ds, steps=5, dp_size=1, micro_batch=8)
    sharded, _ = global_batches(ds, steps=5, dp_size=dp_size, micro_batch=micro_batch)
    assert_same(sharded, reference)


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 4), (4, 1)])
def test_resume_continues_at_the_next_sample(dp_before, dp_after):
    ds = synthetic_dataset(num_docs=30, packing="pad")
    straight, _ = global_batches(ds, steps=12, dp_size=1, micro_batch=4)  # crosses epochs
    assert len(ds) < 12 * 8
    first, state = global_batches(ds, steps=5, dp_size=dp_before, micro_batch=2)
    state = {k: v for k, v in state.items()}  # what a checkpoint would hold (plain Python)
    rest, _ = global_batches(ds, steps=7, dp_size=dp_after, micro_batch=1, state=state)
    assert_same(first + rest, straight)


def test_batch_size_schedule_keeps_the_sample_stream_and_resumes():
    ds = synthetic_dataset()
    straight = PackedLoader(ds, 4, 2, seed=1)
    stream = [cat_step(straight.next_step())["input_ids"] for _ in range(6)]  # 24 samples
    schedule = [4, 8, 12]  # sums to 24; each a multiple of micro_batch × dp = 2 × 2
    ranks = [PackedLoader(ds, 4, 1, r, 2, seed=1) for r in range(2)]
    got = []
    for i, size in enumerate(schedule):
        if i == 2:  # resume the last step from a checkpoint, with micro-batch 2
            state = ranks[0].state_dict()
            ranks = [PackedLoader(ds, 4, 2, r, 2, seed=1) for r in range(2)]
            for loader in ranks:
                loader.load_state_dict(state)
        for loader in ranks:
            loader.global_batch = size
        got.extend(cat_step(loader.next_step())["input_ids"] for loader in ranks)
    assert torch.equal(torch.cat(got), torch.cat(stream))
    with pytest.raises(ValueError, match="train.global_batch=6"):
        ranks[0].global_batch = 6


def test_epochs_are_permutations_seeded_by_seed_and_epoch():
    ds = synthetic_dataset()
    n = len(ds)
    loader = PackedLoader(ds, 1, 1, seed=5)
    epoch0, epoch1 = loader.sample_indices(0, n), loader.sample_indices(n, n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert PackedLoader(ds, 1, 1, seed=5).sample_indices(0, n) == epoch0
    assert PackedLoader(ds, 1, 1, seed=6).sample_indices(0, n) != epoch0
    assert PackedLoader(ds, 1, 1, shuffle=False).sample_indices(0, 4) == [0, 1, 2, 3]


def test_bad_batch_sizes_and_state_mismatch_are_named():
    ds = synthetic_dataset()
    with pytest.raises(ValueError, match=r"train.global_batch=10.*2 × 4"):
        PackedLoader(ds, 10, 2, 0, 4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedLoader(ds, 8, 2, 2, 2)
    state = PackedLoader(ds, 8, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 in the checkpoint but 2"):
        PackedLoader(ds, 8, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset="):
        PackedLoader(synthetic_dataset(reset_position_ids=True), 8, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples="):
        PackedLoader(synthetic_dataset(num_docs=30), 8, 2, seed=1).load_state_dict(state)


def test_eval_batches_cover_the_dataset_once_in_order():
    ds = synthetic_dataset()
    whole = torch.cat([b["input_ids"] for b in eval_batches(ds, micro_batch=3)])
    assert whole.shape == (len(ds), SEQ)
    per_rank = [torch.cat([b["input_ids"] for b in eval_batches(ds, 2, r, 3)]) for r in range(3)]
    for r, rows in enumerate(per_rank):
        assert torch.equal(rows, whole[r::3])
    assert sum(b["input_ids"].shape[0] for b in eval_batches(ds, 4, max_samples=5)) == 5


def _rank_builds_and_loads(rank, world_size, cache_dir, steps):
    """Each rank asks for the default tokenizer and the packed corpus at the same time (one builds
    each cache, the other waits on its lock), then loads its shard; the ranks' micro-batches are
    gathered to rank order as dp=1 would see them."""
    tok = default_tokenizer(512, cache_dir, sample_bytes=300_000)
    ds = PackedDataset.from_embedded(tok, "heldout", 64, cache_dir)
    loader = PackedLoader(ds, global_batch=4, micro_batch=1, dp_rank=rank, dp_size=world_size, seed=7)
    mine = torch.stack([cat_step(loader.next_step())["input_ids"] for _ in range(steps)])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)  # [steps, per_rank, T] from each rank
    # numpy, not a tensor: torch's queue shares tensor storage through fds that vanish with the rank
    return torch.cat(gathered, dim=1).numpy(), ds.tokens.fingerprint, tok.fingerprint()


def test_embedded_heldout_two_real_ranks_match_one(small_tokenizer, tmp_path):
    results = run_local(_rank_builds_and_loads, 2, str(tmp_path / "cache"), 3)
    assert results[0][1:] == results[1][1:]  # one token cache and one tokenizer, shared
    assert results[0][2] == small_tokenizer.fingerprint()  # the same BPE as trained elsewhere
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 1
    assert np.array_equal(results[0][0], results[1][0])
    ds = PackedDataset.from_embedded(small_tokenizer, "heldout", 64, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.meta.json"))) == 1
    single = PackedLoader(ds, global_batch=4, micro_batch=4, seed=7)
    reference = torch.stack([single.next_step()[0]["input_ids"] for _ in range(3)])
    assert np.array_equal(results[0][0], reference.numpy())
    # the packed samples decode back to corpus text, eos between files
    batch = ds.batch([0])
    labels = batch["labels"][0]
    assert (labels != IGNORE_INDEX).all()
    text = small_tokenizer.decode(batch["input_ids"][0].tolist())
    assert text and "\ufffd" not in text[4:-4]
