"""Partitioning: every node computes the same split from (seed, index, count)."""

from __future__ import annotations

import numpy as np
import pytest

from ml.partition import partition_indices

LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))


def all_shards(count: int, **kw) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [partition_indices(LABELS, count, i, **kw) for i in range(count)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_example(scheme: str, count: int) -> None:
    shards = all_shards(count, scheme=scheme, alpha=0.5, seed=5)
    assert sum(len(s) for s in shards) == len(LABELS)
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(len(LABELS)))
    for s in shards:
        assert np.all(np.diff(s) > 0)  # sorted, no duplicates
        assert np.issubdtype(s.dtype, np.integer)


def test_iid_shards_are_balanced() -> None:
    sizes = sorted(len(s) for s in all_shards(3, scheme="iid", seed=0))
    assert sizes == [333, 333, 334]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_reproducible_from_seed_index_and_count(scheme: str) -> None:
    a = partition_indices(LABELS, 4, 2, scheme=scheme, alpha=0.3, seed=11)
    b = partition_indices(LABELS.copy(), 4, 2, scheme=scheme, alpha=0.3, seed=11)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_different_seeds_give_different_shards(scheme: str) -> None:
    a = partition_indices(LABELS, 4, 0, scheme=scheme, alpha=0.5, seed=0)
    b = partition_indices(LABELS, 4, 0, scheme=scheme, alpha=0.5, seed=1)
    assert not np.array_equal(a, b)


def mean_largest_class_share(shards: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[s], minlength=10).max() / len(s) for s in shards]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_alpha_skews_labels_much_more_than_iid(seed: int) -> None:
    iid = mean_largest_class_share(all_shards(5, scheme="iid", seed=seed))
    skewed = mean_largest_class_share(all_shards(5, scheme="dirichlet", alpha=0.1, seed=seed))
    assert iid < 0.2  # about 1/10 per class
    assert skewed > 0.4
    assert skewed > 2 * iid


def test_large_alpha_is_close_to_iid() -> None:
    share = mean_largest_class_share(all_shards(5, scheme="dirichlet", alpha=1000.0, seed=0))
    assert share < 0.2


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5])
def test_every_dirichlet_shard_has_at_least_min_size(alpha: float) -> None:
    for seed in range(3):
        shards = all_shards(10, scheme="dirichlet", alpha=alpha, seed=seed, min_size=20)
        assert min(len(s) for s in shards) >= 20


def test_impossible_dirichlet_split_is_a_clear_error() -> None:
    # Ten classes cannot fill twenty shards when each class lands almost entirely in one.
    with pytest.raises(ValueError, match="raise alpha or lower the partition count"):
        partition_indices(LABELS, 20, 0, scheme="dirichlet", alpha=0.001, seed=0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_partitions": 3, "index": 3}, r"partition index 3 not in 0\.\.2"),
    ({"num_partitions": 3, "index": -1}, r"partition index -1 not in 0\.\.2"),
    ({"num_partitions": 0, "index": 0}, "num_partitions must be >= 1"),
    ({"num_partitions": 2, "index": 0, "scheme": "shards"}, "unknown partition scheme 'shards'"),
    ({"num_partitions": 2, "index": 0, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ({"num_partitions": 2, "index": 0, "scheme": "dirichlet", "alpha": -1.0}, "alpha must be > 0"),
    ({"num_partitions": 2000, "index": 0}, "cannot be split into 2000"),
])
def test_bad_partition_arguments_are_value_errors(kwargs: dict, match: str) -> None:
    count, index = kwargs.pop("num_partitions"), kwargs.pop("index")
    with pytest.raises(ValueError, match=match):
        partition_indices(LABELS, count, index, **kwargs)
