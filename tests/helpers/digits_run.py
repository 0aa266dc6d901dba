"""A tiny real-image run for tracking/report/doctor tests: sklearn digits as PNGs +
efficientnet_lite0 at 64 px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("zero", "one", "two")
EMPTY_CLASS = "never_seen"


def write_digits_project(root: Path, per_class: int = 10, epochs: int = 4, extra: str = "") -> Path:
    """images/, metadata.csv, classes.txt (with one class that has no images) and samprobe.yaml;
    returns the config path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = root / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for target, name in enumerate(CLASSES):
        idx = np.flatnonzero(digits.target == target)[:per_class]
        for i in idx:
            grey = np.clip(np.rint(digits.images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            file = f"d{i:04d}.png"
            Image.fromarray(grey, mode="L").save(images / file)
            rows.append(f"{file},{name}")
    (root / "data" / "metadata.csv").write_text(
        "path,label\n" + "\n".join(rows) + "\n", encoding="utf-8"
    )
    (root / "data" / "classes.txt").write_text(
        "\n".join([*CLASSES, EMPTY_CLASS]) + "\n", encoding="utf-8"
    )
    cfg = root / "samprobe.yaml"
    cfg.write_text(
        f"""\
run_dir: run
device: cpu
precision: fp32
data:
  metadata: data/metadata.csv
  image_root: data/images
  classes_file: data/classes.txt
  val_fraction: 0.25
  test_fraction: 0.25
backbone:
  name: efficientnet_lite0
  img_size: 64
features:
  cache_dir: cache
  batch_size: 32
  num_workers: 0
train:
  epochs: {epochs}
  patience: 50
{extra}""",
        encoding="utf-8",
    )
    return cfg
