"""Shared fixtures: small real-image datasets written on the fly."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image


def write_digits(root: Path, per_class: int = 20, classes: tuple[int, ...] = (0, 1, 2, 3),
                 names: list[str] | None = None) -> Path:
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
        "data": {"metadata": "data/metadata.csv", "image_root": "data/images", "val_fraction": 0.2, "test_fraction": 0.2},
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


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (oneDNN results depend on the thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def digits_project(tmp_path: Path) -> Path:
    """tmp_path with data/ (4 digit classes x 20 real scans) and samprobe.yaml (efficientnet_lite0 @96px)."""
    write_digits(tmp_path / "data")
    write_config(tmp_path / "samprobe.yaml")
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """Weights hashes are remembered under $XDG_CACHE_HOME: tests use their own, never the user's
    (session scope: set before any module-scoped fixture extracts features)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    yield
    patch.undo()
