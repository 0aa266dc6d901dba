"""A feature cache of real data for the streaming tests (export, evaluate): sklearn's digit
scans, 8 of them side by side per row (512 pixel values), stored through the cache's own API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samprobe.backbones.registry import grid_array
from samprobe.data.records import Record
from samprobe.features.cache import FeatureCache
from samprobe.io import sha256_bytes

DIM = 512
SPATIAL = 2  # a 2x2 grid of 128-d tokens beside the pooled rows: the digits' four quadrants


def digit_rows(n: int) -> np.ndarray:
    """[n, 512] float32: row i is digits i..i+7 (mod 1797) side by side, real pixel values."""
    from sklearn.datasets import load_digits

    d = load_digits().data.astype(np.float32)
    idx = (np.arange(n)[:, None] + np.arange(8)[None, :]) % len(d)
    return d[idx].reshape(n, DIM) + (np.arange(n) // len(d))[:, None]  # distinct past 1797


def digit_labels(n: int) -> np.ndarray:
    """[n] the digit of each row's first scan."""
    from sklearn.datasets import load_digits

    return load_digits().target[np.arange(n) % 1797]


def build_cache(root: Path, n: int, *, grid: bool) -> list[Record]:
    """A cache of ``n`` digit rows (fp16, in shards of 4096 rows as extract writes them) and
    their records in cache order."""
    x = digit_rows(n)
    keys = [sha256_bytes(row.tobytes()) for row in x]
    with FeatureCache(root, "fp", DIM, "float16") as cache:
        for s in range(0, n, 4096):
            cache.put(keys[s : s + 4096], x[s : s + 4096])
            if grid:
                cache.put(keys[s : s + 4096], x[s : s + 4096], array=grid_array(SPATIAL))
    return [
        Record(i + 1, f"digits/{i:06d}.png", f"/data/digits/{i:06d}.png", str(i % 10), "train", k)
        for i, k in enumerate(keys)
    ]
