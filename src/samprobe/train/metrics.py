"""Classification metrics over the full taxonomy (untrained classes included)."""

from __future__ import annotations

from typing import Any

import numpy as np

# sklearn.metrics is imported where a metric is computed: at module level it was 1.3 s of every
# command's start (`python -X importtime -c "import samprobe.pipeline"`: 3.6 s in all), and most
# commands (validate, extract on every torchrun rank, cache, doctor) compute none.


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    taxonomy: list[str],
    active: list[int],
    topk_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """y_true, y_pred: taxonomy indices [N]; topk_pred: taxonomy indices [N, k] (best first)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if len(y_true) == 0:
        return {"n": 0}
    present = sorted(set(y_true.tolist()))
    trained = set(active)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "n_not_trained": int(sum(t not in trained for t in y_true.tolist())),
    }
    if topk_pred is not None:
        for k in sorted({1, min(3, topk_pred.shape[1]), min(5, topk_pred.shape[1])}):
            out[f"top{k}_accuracy"] = float((topk_pred[:, :k] == y_true[:, None]).any(1).mean())
    return out


def per_class_table(
    y_true: np.ndarray, y_pred: np.ndarray, taxonomy: list[str], active: list[int]
) -> list[dict[str, Any]]:
    labels = list(range(len(taxonomy)))
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    trained = set(active)
    return [
        {
            "class": taxonomy[i],
            "trained": i in trained,
            "status": "trained" if i in trained else "not trained",
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i in labels
    ]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
