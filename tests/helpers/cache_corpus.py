"""For the feature cache / extract tests: a small corpus of real images (folder layout), its
config, the CLI in a subprocess, and the samprobe log lines of a test."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def make_corpus(root: Path, n_digits: int = 20, crops: int = 4) -> Path:
    """root/images/<label>/*.png: crops of skimage photos and upsampled sklearn digits (real
    pixels)."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    images = root / "images"
    for name in ("astronaut", "chelsea", "coffee", "camera", "rocket"):
        photo = getattr(skdata, name)()
        h, w = photo.shape[:2]
        for i in range(crops):
            y, x = (h // 5) * (i % 3), (w // 6) * i
            crop = np.ascontiguousarray(photo[y : y + h // 2, x : x + w // 2])
            (images / "photo").mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).resize((96, 80)).save(images / "photo" / f"{name}_{i}.png")
    digits = load_digits()
    (images / "digit").mkdir(parents=True, exist_ok=True)
    for i in range(n_digits):
        px = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(px).resize((32, 32), Image.NEAREST).save(
            images / "digit" / f"d{i:03d}_{digits.target[i]}.png"
        )
    return images


def write_config(root: Path, images: Path, cache_dir: Path | str = "cache", **features) -> Path:
    cfg = {
        "run_dir": str(root / "run"),
        "device": "cpu",
        "precision": "fp32",
        "data": {
            "image_root": str(images),
            "format": "folder",
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
        "backbone": {"name": "efficientnet_lite0", "img_size": 64},
        "features": {"cache_dir": str(cache_dir), "batch_size": 4, "num_workers": 0, **features},
    }
    path = root / "samprobe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run(
        [PY, "-m", "samprobe", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=300,
    )


def index_count(fp_dir: Path) -> int:
    db = sqlite3.connect(fp_dir / "index.sqlite", timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


class LogLines:
    """Messages of the "samprobe" logger during a test (the console handler keeps the first
    stdout it saw)."""

    def __init__(self) -> None:
        import logging

        self.lines: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())  # type: ignore[method-assign]
        self.logger = logging.getLogger("samprobe")

    def __enter__(self) -> LogLines:
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)

    def take(self) -> str:
        out, self.lines = "\n".join(self.lines), []
        return out
