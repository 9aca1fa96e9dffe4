"""Splitting a data set across nodes, reproducibly from (seed, index, count).

Every node computes the whole partition with ``numpy.random.default_rng(seed)`` and keeps
its own part, so shards are disjoint and cover the data without any coordination.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet")


def partition_indices(labels: np.ndarray, num_partitions: int, index: int, *,
                      scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                      min_size: int = 10, max_tries: int = 100) -> np.ndarray:
    """Sorted indices of shard ``index`` of ``num_partitions``.

    ``iid``: a seeded shuffle split evenly. ``dirichlet``: for each class, proportions
    drawn from Dir(alpha) over the shards (label skew; small alpha = strong skew), redrawn
    until every shard has at least ``min_size`` examples.
    """
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if not 0 <= index < num_partitions:
        raise ValueError(f"partition index {index} not in 0..{num_partitions - 1}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: iid, dirichlet")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    n = len(labels)
    if n < num_partitions:
        raise ValueError(f"{n} examples cannot be split into {num_partitions} partitions")
    rng = np.random.default_rng(seed)
    if scheme == "iid" or num_partitions == 1:
        order = rng.permutation(n)
        return np.sort(np.array_split(order, num_partitions)[index])
    classes = np.unique(labels)
    min_size = min(min_size, n // num_partitions)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return np.sort(np.array(shards[index], dtype=np.int64))
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every one of {num_partitions}"
                     f" partitions {min_size} examples in {max_tries} tries; raise alpha"
                     " or lower the partition count")
