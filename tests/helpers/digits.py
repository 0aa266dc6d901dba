"""The digits project most pipeline tests start from: sklearn's real digit scans as PNGs, a
metadata.csv, and a samprobe.yaml (efficientnet_lite0 at 96 px on the CPU)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def write_digits(
    root: Path,
    per_class: int = 20,
    classes: tuple[int, ...] = (0, 1, 2, 3),
    names: list[str] | None = None,
) -> Path:
    """sklearn's real digit scans as PNGs + metadata.csv; returns the metadata path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = names or [f"d{c}" for c in range(10)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for c in classes:
        idx = np.flatnonzero(digits.target == c)[:per_class]
        for i in idx:
            name = f"img_{i:04d}.png"
            grey = np.clip(np.rint(digits.images[i] * 255 / 16), 0, 255).astype(np.uint8)
            Image.fromarray(grey, mode="L").save(root / "images" / name)
            rows.append((name, names[c]))
    meta = root / "metadata.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return meta


def write_config(path: Path, **sections: dict) -> Path:
    base = {
        "run_dir": "run",
        "device": "cpu",
        "precision": "fp32",
        "data": {
            "metadata": "data/metadata.csv",
            "image_root": "data/images",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
        "backbone": {"name": "efficientnet_lite0", "img_size": 96},
        "features": {"cache_dir": "cache", "batch_size": 16, "num_workers": 0},
        "train": {"epochs": 40, "lr": 0.003, "patience": 40},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path.write_text(yaml.safe_dump(base))
    return path
