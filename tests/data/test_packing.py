import numpy as np
import pytest

from distsft.data.packing import lower_bound, pack_bfd, pack_next_fit


def _check_valid(bins, lengths, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every index exactly once
    assert all(0 < lengths[b].sum() <= capacity for b in bins)


@pytest.mark.parametrize("pack", [pack_bfd, pack_next_fit])
def test_every_index_once_and_no_bin_over_capacity(pack):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=2_000)
    _check_valid(pack(lengths, 300), lengths, 300)


@pytest.mark.parametrize("mu,sigma,cap", [(5.5, 0.8, 2048), (4.8, 0.6, 2048)])
def test_bfd_within_a_tenth_of_a_percent_of_the_lower_bound(mu, sigma, cap):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mu, sigma, 30_000).astype(np.int64), 8, cap)
    bins = pack_bfd(lengths, cap)
    _check_valid(bins, lengths, cap)
    lb = lower_bound(lengths, cap)
    assert len(bins) <= lb * 1.001 + 1, (len(bins), lb)
    assert len(bins) < len(pack_next_fit(lengths, cap))


def test_bfd_is_best_fit_and_deterministic():
    # 6 opens row 0 (4 free), 5 opens row 1 (5 free), 4 fills row 0, the first 3 (index 0) goes to
    # row 1 (2 free), the second 3 opens row 2 (7 free), and 1 takes the tightest fit: row 1.
    lengths = np.array([3, 6, 5, 4, 1, 3])
    assert pack_bfd(lengths, 10) == [[1, 3], [2, 0, 4], [5]]
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 100, size=5_000)
    assert pack_bfd(lengths, 128) == pack_bfd(lengths.copy(), 128)


def test_exact_fits_and_edge_cases():
    assert pack_bfd(np.array([], dtype=np.int64), 8) == []
    assert pack_bfd(np.array([8, 8, 8]), 8) == [[0], [1], [2]]
    assert len(pack_bfd(np.array([5, 3, 5, 3]), 8)) == 2
    with pytest.raises(ValueError, match="lengths must lie in"):
        pack_bfd(np.array([9]), 8)
    with pytest.raises(ValueError, match="lengths must lie in"):
        pack_bfd(np.array([0, 3]), 8)
