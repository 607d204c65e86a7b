"""The index-wise permutation: a bijection for any n, seeded by (seed, epoch), no O(n) table."""

import numpy as np
import pytest

from twinpipe.data.shuffle import permute


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_is_a_permutation(n):
    perm = permute(np.arange(n), n, seed=0, epoch=0)
    assert sorted(perm.tolist()) == list(range(n))
    # index-wise evaluation agrees with the whole-range one
    some = np.array([0, n // 2, n - 1])
    assert np.array_equal(permute(some, n, seed=0, epoch=0), perm[some])


def test_seed_and_epoch_change_the_order_and_it_looks_shuffled():
    n = 1000
    base = permute(np.arange(n), n, seed=1, epoch=0)
    assert not np.array_equal(base, permute(np.arange(n), n, seed=1, epoch=1))
    assert not np.array_equal(base, permute(np.arange(n), n, seed=2, epoch=0))
    assert np.array_equal(base, permute(np.arange(n), n, seed=1, epoch=0))
    assert (base == np.arange(n)).sum() < 10  # a uniform shuffle fixes ~1 point
    # neighbours scatter: consecutive positions land far apart on average (uniform: ~n/3)
    assert np.abs(np.diff(base)).mean() > n / 5


def test_huge_range_without_a_table():
    n = 3_700_000_000  # ~15T tokens in 4k samples
    positions = np.array([0, 1, 2, n - 1, 123_456_789], dtype=np.int64)
    out = permute(positions, n, seed=7, epoch=3)
    assert ((out >= 0) & (out < n)).all() and len(set(out.tolist())) == 5
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        permute(np.array([10]), 10, seed=0, epoch=0)
