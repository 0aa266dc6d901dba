"""Seeded, stratified splits: reproducible, per class, small classes stay in train."""
from __future__ import annotations

import dataclasses
from collections import Counter

from samprobe.data.metadata import Record, read_splits, write_splits
from samprobe.data.splits import assign_splits


def _records(counts: dict[str, int]) -> list[Record]:
    out, row = [], 0
    for label, n in counts.items():
        for k in range(n):
            row += 1
            out.append(Record(row, f"{label}/{k}.jpg", f"/x/{label}/{k}.jpg", label, None, f"{label}{k:04d}"))
    return out


def test_same_seed_same_splits_and_order_does_not_matter() -> None:
    recs = _records({"a": 40, "b": 20, "c": 3, "d": 1})
    s1 = assign_splits(recs, 0.2, 0.1, seed=7)
    s2 = assign_splits(list(reversed(recs)), 0.2, 0.1, seed=7)
    assert {r.row: r.split for r in s1} == {r.row: r.split for r in s2}
    assert {r.row: r.split for r in s1} != {r.row: r.split for r in assign_splits(recs, 0.2, 0.1, seed=8)}
    per = Counter((r.label, r.split) for r in s1)
    assert (per["a", "val"], per["a", "test"], per["a", "train"]) == (8, 4, 28)
    assert (per["b", "val"], per["b", "test"], per["b", "train"]) == (4, 2, 14)
    assert per["c", "train"] == 1 and per["c", "val"] == 1 and per["c", "test"] == 1
    assert per["d", "train"] == 1  # too small to split: stays in train


def test_split_column_wins_and_round_trips(tmp_path) -> None:
    recs = _records({"a": 10})
    recs[0] = dataclasses.replace(recs[0], split="test")
    out = assign_splits(recs, 0.3, 0.0, seed=0)
    assert out[0].split == "test" and Counter(r.split for r in out[1:]) == {"train": 6, "val": 3}
    write_splits(out, tmp_path / "splits.csv")
    assert read_splits(tmp_path / "splits.csv") == out
