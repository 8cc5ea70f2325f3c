"""Packing examples into rows of at most `capacity` tokens (pure functions, no torch or datasets).

`pack_bfd` is best-fit-decreasing over the whole data set at once. TRL packs each 1,000-row `map`
batch separately, which leaves a partly filled row per batch; over the whole set, BFD with many
small items lands within a few rows of the lower bound ceil(sum / capacity).
"""

from __future__ import annotations

import numpy as np


class _FreeSpaceTree:
    """Max segment tree over free capacities 0..capacity; a leaf holds its capacity while some open row
    has exactly that much room left, else 0. `smallest_at_least(n)` is then the best fit for an item of
    n tokens, in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1 << capacity.bit_length()  # leaves 0..size-1 cover 0..capacity
        self.tree = [0] * (2 * self.size)

    def set(self, space: int, present: bool) -> None:
        tree = self.tree
        i = self.size + space
        tree[i] = space if present else 0
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            new = left if left >= right else right  # plain comparison: max() is the hot spot otherwise
            if tree[i] == new:
                break  # ancestors already agree
            tree[i] = new
            i >>= 1

    def smallest_at_least(self, n: int) -> int:
        """The smallest free capacity >= n, or 0 when no open row has room (n >= 1)."""
        tree = self.tree
        if tree[1] < n:
            return 0
        i = 1
        while i < self.size:
            i <<= 1
            if tree[i] < n:  # the left half has no capacity >= n: go right
                i += 1
        return tree[i]


def _check(lengths: np.ndarray, capacity: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64).ravel()
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"lengths must lie in [1, {capacity}] (truncate or drop longer examples first); "
                         f"got min {lengths.min()} max {lengths.max()}")
    return lengths


def pack_bfd(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indices of `lengths` per row, rows in the order they were opened.

    Items go longest first (ties by index, so the result is deterministic); each goes into the open row
    whose free space is the smallest that still fits it, the most recently filled such row on ties.
    """
    lengths = _check(lengths, capacity)
    order = np.lexsort((np.arange(lengths.size), -lengths))  # longest first, then by index
    tree = _FreeSpaceTree(capacity)
    rows_by_space: dict[int, list[int]] = {}  # free space -> stack of row numbers with exactly that room
    bins: list[list[int]] = []
    free: list[int] = []
    for idx, n in zip(order.tolist(), lengths[order].tolist()):
        space = tree.smallest_at_least(n)
        if space:
            stack = rows_by_space[space]
            row = stack.pop()
            if not stack:
                tree.set(space, False)
        else:
            row = len(bins)
            bins.append([])
            free.append(capacity)
        bins[row].append(idx)
        left = free[row] - n
        free[row] = left
        if left:
            stack = rows_by_space.setdefault(left, [])
            if not stack:
                tree.set(left, True)
            stack.append(row)
    return bins


def pack_next_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Next-fit in the given order: start a new row when the item does not fit (the baseline)."""
    lengths = _check(lengths, capacity)
    bins: list[list[int]] = []
    room = 0
    for idx, n in enumerate(lengths.tolist()):
        if n > room:
            bins.append([])
            room = capacity
        bins[-1].append(idx)
        room -= n
    return bins


def lower_bound(lengths: np.ndarray, capacity: int) -> int:
    """No packing can use fewer rows than ceil(total tokens / capacity)."""
    return int(-(-int(np.asarray(lengths, dtype=np.int64).sum()) // capacity))
