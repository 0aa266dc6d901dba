"""``samprobe features export``: cached features with labels and split, for other tools."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from samprobe.config import Config
from samprobe.data.records import Record
from samprobe.errors import ConfigError, DataError
from samprobe.features.extract import Extractor, load_features, load_grid
from samprobe.io import atomic_open, ensure_writable_file

log = logging.getLogger("samprobe")


def check_export_path(out: Path, split: str) -> None:
    """ConfigError / CacheError for an --out that cannot be written, before any work."""
    ensure_writable_file(out, "--out", f"{split}_features{out.suffix or '.npz'}")
    if out.suffix not in (".npz", ".parquet"):
        raise ConfigError(
            f"--out {out} must end in .npz or .parquet", fix="e.g. --out train_features.npz"
        )


def export_features(cfg: Config, *, records: list[Record], split: str, out: Path) -> Path:
    """The cached features of ``records`` (validated, without extract failures) with their path,
    label, split and sha256 to ``out`` (.npz, or .parquet with pyarrow)."""
    recs = records
    extractor = Extractor.from_config(cfg, on_device=False)  # reads the cache only
    with extractor.open_cache(cfg.features.cache_dir, readonly=True) as cache:
        missing = extractor.missing(cache, (r.sha256 for r in recs))
        if missing:
            raise DataError(
                f"{len(missing)} images of split {split} are not in the cache"
                + (
                    f" with their {cfg.features.spatial}x{cfg.features.spatial} grid"
                    if cfg.features.spatial
                    else ""
                ),
                fix="run `samprobe extract -c CONFIG` first",
            )
        x = load_features(cache, recs)
        # [N, T, C] float32, only when features.spatial is set
        grid = load_grid(cache, recs, cfg.features.spatial) if cfg.features.spatial else None
    paths = np.array([r.path for r in recs])
    labels = np.array([r.label for r in recs])
    splits = np.array([r.split or "" for r in recs])
    if out.suffix == ".npz":
        with atomic_open(out, "wb") as f:
            extra = {} if grid is None else {"spatial": grid}
            np.savez(
                f,
                features=x,
                path=paths,
                label=labels,
                split=splits,
                sha256=np.array([r.sha256 for r in recs]),
                **extra,
            )
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                "parquet export needs pyarrow",
                fix="pip install 'samprobe[parquet]' or export to .npz",
            ) from None
        columns = {"path": paths, "label": labels, "split": splits, "features": list(x)}
        # parquet has no 3-d cells: each row's grid flattened, token-major [T*C]
        if grid is not None:
            columns["spatial"] = list(grid.reshape(len(recs), -1))
        table = pa.table(columns)
        with atomic_open(out, "wb") as f:
            pq.write_table(table, f)
    log.info(
        f"exported {len(recs)} x {x.shape[1]} features"
        + ("" if grid is None else f" + {grid.shape[1]}x{grid.shape[2]} grids")
        + f" ({split}) to {out}"
    )
    return out
