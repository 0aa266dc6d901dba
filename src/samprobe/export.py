"""``samprobe features export``: cached features with labels and split, for other tools."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from samprobe.config import Config
from samprobe.errors import ConfigError, DataError
from samprobe.features.extract import Extractor, load_features
from samprobe.io import atomic_open
from samprobe.pipeline import load_dataset

log = logging.getLogger("samprobe")


def export_features(cfg: Config, split: str, out: Path) -> Path:
    if out.suffix not in (".npz", ".parquet"):
        raise ConfigError(f"--out {out} must end in .npz or .parquet", fix="e.g. --out train_features.npz")
    records, _ = load_dataset(cfg)
    recs = records if split == "all" else [r for r in records if r.split == split]
    extractor = Extractor.from_config(cfg)
    with extractor.open_cache(cfg) as cache:
        missing = cache.missing(r.sha256 for r in recs)
        if missing:
            raise DataError(f"{len(missing)} images of split {split} are not in the cache", fix="run `samprobe extract -c CONFIG` first")
        x = load_features(cache, recs)
    paths = np.array([r.path for r in recs])
    labels = np.array([r.label for r in recs])
    splits = np.array([r.split or "" for r in recs])
    if out.suffix == ".npz":
        with atomic_open(out, "wb") as f:
            np.savez(f, features=x, path=paths, label=labels, split=splits, sha256=np.array([r.sha256 for r in recs]))
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("parquet export needs pyarrow", fix="pip install 'samprobe[parquet]' or export to .npz") from None
        table = pa.table({"path": paths, "label": labels, "split": splits, "features": list(x)})
        with atomic_open(out, "wb") as f:
            pq.write_table(table, f)
    log.info(f"exported {len(recs)} x {x.shape[1]} features ({split}) to {out}")
    return out
