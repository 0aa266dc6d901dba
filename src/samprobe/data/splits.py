"""Train/val/test assignment: from the split column, or stratified by class with a seed."""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from samprobe.data.metadata import Record


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for one class; a class too small to give every split one image stays in train."""
    want_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    want_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    want_val = max(want_val, 1 if val_fraction > 0 else 0)
    want_test = max(want_test, 1 if test_fraction > 0 else 0)
    if n - want_val - want_test < 1:
        return 0, 0
    return want_val, want_test


def assign_splits(records: list[Record], val_fraction: float, test_fraction: float, seed: int) -> list[Record]:
    """Records with ``split`` set. Rows that already have a split keep it; the others are
    split per class. Order-independent: rows are sorted by image hash before the seeded shuffle."""
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.split is None:
            by_class[r.label].append(r)
    assigned: dict[int, str] = {}
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda r: (r.sha256, r.row))
        rng = np.random.default_rng([seed, len(group), *label.encode()])
        order = rng.permutation(len(group))
        n_val, n_test = _split_sizes(len(group), val_fraction, test_fraction)
        for rank, idx in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            assigned[group[idx].row] = split
    return [r if r.split is not None else dataclasses.replace(r, split=assigned[r.row]) for r in records]
