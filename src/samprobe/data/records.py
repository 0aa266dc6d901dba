"""What validation produces: ``Record`` (a usable image), ``Problem`` (a rejected row of one of
``PROBLEM_KINDS``), ``Dataset`` (both, with the taxonomy); and splits.csv, the records of a run.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samprobe.errors import DataError
from samprobe.io import atomic_open

PROBLEM_KINDS = (
    "bad_path",  # empty / NaN path
    "outside_root",  # resolved path (through .. or a symlink) leaves the image root
    "missing",  # file does not exist
    "unreadable",  # zero bytes, truncated, not an image, over the pixel limit
    "unknown_label",  # empty label, or not in the taxonomy
    "bad_split",  # split column value not train/val/test
    "duplicate",  # same image bytes listed again with the same label
    "label_conflict",  # same image bytes under two different labels
    "malformed",  # the row itself could not be parsed
)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Record:
    row: int  # 1-based data row in the metadata (folder layout: enumeration order)
    path: str  # as written in the metadata
    file: str  # resolved absolute path
    label: str  # class name in the taxonomy
    split: str | None
    sha256: str


@dataclass(frozen=True)
class Problem:
    row: int
    path: str
    label: str
    kind: str
    detail: str


@dataclass
class Dataset:
    records: list[Record]
    problems: list[Problem]
    taxonomy: list[str]
    total: int
    encoding: str = "utf-8"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c.get(k, 0) for k in PROBLEM_KINDS}


def write_splits(records: list[Record], path: Path) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label", "split", "sha256", "file"])
        for r in records:
            w.writerow([r.row, r.path, r.label, r.split, r.sha256, r.file])


def read_splits(path: Path) -> list[Record]:
    if not path.is_file():
        raise DataError(f"{path} does not exist", fix="run `samprobe validate -c CONFIG` first")
    with open(path, encoding="utf-8", newline="") as f:
        return [
            Record(int(r["row"]), r["path"], r["file"], r["label"], r["split"], r["sha256"])
            for r in csv.DictReader(f)
        ]


def as_dicts(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
