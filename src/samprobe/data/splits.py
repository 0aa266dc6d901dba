"""Train/val/test assignment that never moves an image once it has a split.

An image's split is, in order: the metadata's split column; the split already recorded for its
content (sha256) in the run's ledger of earlier validations; else it is new and fills its class's
quotas. New images of a class are ranked by sha256(seed, image sha256) (a pure function of the
content and the seed: the row order and the other images do not matter) and take the places each
split still lacks of its target, round(fraction x class size). So adding or removing other images
never moves an image, and a class keeps its proportions as it grows.

Metadata whose split column has no val rows gets a stratified val split carved from its train
rows the same way (``data.val_fraction``), so heads are never selected on training data.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from samprobe.data.records import SPLITS, Record


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for one class; a class too small to give every split one image stays in train."""
    want_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    want_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    want_val = max(want_val, 1 if val_fraction > 0 else 0)
    want_test = max(want_test, 1 if test_fraction > 0 else 0)
    if n - want_val - want_test < 1:
        return 0, 0
    return want_val, want_test


def rank_key(sha256: str, seed: int) -> str:
    """Where a new image ranks among its class's new images: content and seed only."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def _fill_quotas(
    new: list[Record], have: Counter, targets: dict[str, int], seed: int
) -> dict[int, str]:
    """Row -> split for a class's ``new`` records, given the counts it already ``have``s per split.

    Each split gets what it lacks of its target; when removals left a split above its target the
    lacks add up to more than the new images, which are then shared in proportion to the lacks
    (largest remainder), so no new image goes to a split that already has too many."""
    lack = {s: max(0, targets[s] - have[s]) for s in SPLITS}
    total = sum(lack.values())
    if total > len(new):
        exact = {s: lack[s] * len(new) / total for s in SPLITS}
        share = {s: int(exact[s]) for s in SPLITS}
        for s in sorted(SPLITS, key=lambda s: (share[s] - exact[s], SPLITS.index(s)))[
            : len(new) - sum(share.values())
        ]:
            share[s] += 1
        lack = share
    ordered = sorted(new, key=lambda r: (rank_key(r.sha256, seed), r.row))
    out: dict[int, str] = {}
    it = iter(ordered)
    for split in ("val", "test", "train"):
        for _ in range(lack[split]):
            out[next(it).row] = split
    for r in it:  # cannot happen (the lacks cover every new image); train is the safe place
        out[r.row] = "train"
    return out


def carves_val(records: list[Record]) -> bool:
    """Whether the metadata gives every split itself but no val rows (val is then carved from train)."""
    return (
        bool(records)
        and all(r.split is not None for r in records)
        and not any(r.split == "val" for r in records)
    )


def assign_splits(
    records: list[Record],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    previous: Mapping[str, str] | None = None,
) -> list[Record]:
    """Records with ``split`` set. Rows whose metadata gives a split keep it; rows whose image has
    a split in ``previous`` (sha256 -> split) keep that; the others fill their class's quotas.
    When the split column has no val rows, val is carved from the train rows (``val_fraction``)."""
    previous = previous or {}
    carve = carves_val(records) and val_fraction > 0
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[r.label].append(r)
    assigned: dict[int, str] = {}
    for label in sorted(by_class):
        group = by_class[label]
        have: Counter = Counter()
        new: list[Record] = []
        for r in group:
            if carve:
                fixed = (
                    r.split
                    if r.split != "train"
                    else previous.get(r.sha256)
                    if previous.get(r.sha256) in ("train", "val")
                    else None
                )
            else:
                fixed = r.split or previous.get(r.sha256)
            if fixed is None:
                new.append(r)
            else:
                have[fixed] += 1
                assigned[r.row] = fixed
        if not new:
            continue
        n = len(group)
        if carve:
            n_val = _split_sizes(n, val_fraction, 0.0)[0]
            # at least one image left to train on
            n_val = n_val if n - have["test"] - n_val >= 1 else 0
            targets = {"val": n_val, "test": have["test"], "train": n - have["test"] - n_val}
        else:
            n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
            targets = {"val": n_val, "test": n_test, "train": n - n_val - n_test}
        assigned.update(_fill_quotas(new, have, targets, seed))
    # Record(...) rather than dataclasses.replace: 0.8 us a record instead of 1.8
    return [
        r
        if r.split == assigned[r.row]
        else Record(r.row, r.path, r.file, r.label, assigned[r.row], r.sha256)
        for r in records
    ]


def content_keys(sha256s: Iterable[str]) -> np.ndarray:
    """int64 keys (the first 60 bits of each sha256) for fast membership tests; two different images
    share one with probability ~1e-6 even for a million train x a million test images."""
    return np.array(sorted({int(s[:15], 16) for s in sha256s}), dtype=np.int64)


def image_set(sha256s: Iterable[str]) -> dict[str, Any]:
    """What a checkpoint records of a split's images: count, digest of the sorted set, and the
    content keys (so evaluate can tell which evaluated images it was trained on)."""
    uniq = sorted(set(sha256s))
    return {
        "n": len(uniq),
        "digest": hashlib.sha256("\n".join(uniq).encode()).hexdigest(),
        "keys": content_keys(uniq),
    }
