"""Class mapping (taxonomy index <-> head index) and class weights.

The head has one output per *active* class (>= 1 training sample). A sample whose class is
not active is never remapped to another class: its head target is ``IGNORE`` (left out of the
loss) and, in metrics, it counts as an error of a class listed as "not trained".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from samprobe.errors import TrainingError

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
WEIGHT_SCHEMES = ("balanced", "sqrt", "effective_number", "none")


@dataclass(frozen=True)
class ClassMapping:
    taxonomy: tuple[str, ...]
    active: tuple[int, ...]  # taxonomy indices, in head order

    @classmethod
    def from_train_labels(
        cls, taxonomy: Sequence[str], train_labels: Sequence[str], *, min_classes: int = 2
    ) -> ClassMapping:
        """Active classes = those with training labels. ``min_classes`` 2 for a classifier; inspect
        passes 1 (one class still has near-duplicates and outliers, just no label to confuse)."""
        index = {name: i for i, name in enumerate(taxonomy)}
        unknown = sorted({lab for lab in train_labels if lab not in index})
        if unknown:
            raise TrainingError(
                f"training labels not in the taxonomy: {unknown[:5]}",
                fix="add them to data.classes_file",
            )
        seen = {index[lab] for lab in train_labels}
        if not seen:
            raise TrainingError(
                "no training samples: every class is empty",
                fix="check data_report.json and the split settings",
            )
        if len(seen) < min_classes:
            (only,) = seen
            others = [n for n in taxonomy if n != taxonomy[only]]
            raise TrainingError(
                f"only one class has training images ({taxonomy[only]!r}, {len(train_labels)} "
                f"images"
                + (
                    f"; none for {', '.join(map(repr, others[:5]))}{' ...' if len(others) > 5 else ''}"
                    if others
                    else ""
                )
                + "): a classifier needs at least 2 classes with training images",
                fix="add training images of another class (see per_class in data_report.json), or "
                "check data.label_column and the split column",
            )
        return cls(tuple(taxonomy), tuple(sorted(seen)))

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def active_names(self) -> list[str]:
        return [self.taxonomy[i] for i in self.active]

    @property
    def inactive_names(self) -> list[str]:
        act = set(self.active)
        return [n for i, n in enumerate(self.taxonomy) if i not in act]

    def taxonomy_index(self, labels: Sequence[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.taxonomy)}
        return np.array([index[lab] for lab in labels], dtype=np.int64)

    def to_head(self, labels: Sequence[str]) -> np.ndarray:
        """Head targets; IGNORE for classes without training data (never another class)."""
        lookup = {self.taxonomy[t]: h for h, t in enumerate(self.active)}
        return np.array([lookup.get(lab, IGNORE) for lab in labels], dtype=np.int64)

    def to_names(self, head_indices: np.ndarray) -> list[str]:
        return [self.taxonomy[self.active[int(h)]] for h in np.asarray(head_indices).ravel()]

    def to_dict(self) -> dict[str, Any]:
        return {"taxonomy": list(self.taxonomy), "active": list(self.active)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassMapping:
        return cls(tuple(d["taxonomy"]), tuple(int(i) for i in d["active"]))


def class_weights(counts: np.ndarray, scheme: str, beta: float = 0.999) -> np.ndarray:
    """Per active class (all counts >= 1): finite, positive, mean 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0 or (counts < 1).any():
        raise ValueError("class weights are defined over active classes only (count >= 1)")
    if scheme == "none":
        w = np.ones_like(counts)
    elif scheme == "balanced":
        w = counts.sum() / (len(counts) * counts)
    elif scheme == "sqrt":
        w = 1.0 / np.sqrt(counts)
    elif scheme == "effective_number":
        w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"unknown class weight scheme {scheme!r}; choose from {WEIGHT_SCHEMES}")
    w = w / w.mean()
    assert np.isfinite(w).all() and (w > 0).all()
    return w
