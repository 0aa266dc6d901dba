"""``samprobe features export``: cached features with labels and split, for other tools."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samprobe.backbones.registry import grid_array
from samprobe.config import Config
from samprobe.data.records import Record
from samprobe.errors import ConfigError, DataError
from samprobe.features.cache import FeatureCache
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
    if out.suffix == ".parquet":
        _pyarrow()


def _pyarrow() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or the ConfigError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "parquet export needs pyarrow",
            fix="pip install 'samprobe[parquet]' or export to .npz",
        ) from None
    return pa, pq


# One parquet row group (and the most export holds in memory at once): 64 MB of features, e.g.
# 13 k rows of 1280-d float32. Readers load a row group at a time too.
ROW_GROUP_BYTES = 64 << 20
FLOAT32 = np.dtype(np.float32)  # what the cache hands out (load_features, load_grid)


def export_features(cfg: Config, *, records: list[Record], split: str, out: Path) -> Path:
    """The cached features of ``records`` (validated, without extract failures) with their path,
    label, split and sha256 to ``out`` (.npz, or .parquet with pyarrow, streamed in row
    groups)."""
    recs = records
    spatial = cfg.features.spatial
    extractor = Extractor.from_config(cfg, on_device=False)  # reads the cache only
    with extractor.open_cache(cfg.features.cache_dir, readonly=True) as cache:
        missing = extractor.missing(cache, (r.sha256 for r in recs))
        if missing:
            raise DataError(
                f"{len(missing)} images of split {split} are not in the cache"
                + (f" with their {spatial}x{spatial} grid" if spatial else ""),
                fix="run `samprobe extract -c CONFIG` first",
            )
        if out.suffix == ".npz":
            dim, grid_shape = write_npz(cache, recs, out, spatial=spatial)
        else:
            dim, grid_shape = write_parquet(cache, recs, out, spatial=spatial)
    log.info(
        f"exported {len(recs)} x {dim} features"
        + ("" if grid_shape is None else f" + {grid_shape[0]}x{grid_shape[1]} grids")
        + f" ({split}) to {out}"
    )
    return out


def _text_columns(recs: Sequence[Record]) -> dict[str, list[str]]:
    return {
        "path": [r.path for r in recs],
        "label": [r.label for r in recs],
        "split": [r.split or "" for r in recs],
        "sha256": [r.sha256 for r in recs],
    }


def write_npz(
    cache: FeatureCache,
    recs: Sequence[Record],
    out: Path,
    *,
    spatial: int | None,
    chunk_bytes: int = ROW_GROUP_BYTES,
) -> tuple[int, tuple[int, int] | None]:
    """``recs``' features [N, D] (and grids [N, T, C] with ``spatial``) with their text columns
    as one .npz (what ``np.savez`` writes and ``np.load`` reads), written atomically and streamed:
    each array is one .npy entry of the zip whose rows are read from the cache about
    ``chunk_bytes`` at a time, so memory does not grow with the split. Returns (D, (T, C) or None)."""
    dim = cache.dim
    grid_shape = None
    if spatial:
        tokens = spatial * spatial
        grid_shape = (tokens, (cache.array_dim(grid_array(spatial)) or 0) // tokens)
    with (
        atomic_open(out, "wb") as f,
        zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        rows = max(1, chunk_bytes // (4 * dim))
        chunks = (load_features(cache, recs[i : i + rows]) for i in range(0, len(recs), rows))
        _write_npy_entry(zf, "features", (len(recs), dim), chunks, FLOAT32)
        if spatial:
            rows = max(1, chunk_bytes // (4 * grid_shape[0] * grid_shape[1]))
            chunks = (
                load_grid(cache, recs[i : i + rows], spatial) for i in range(0, len(recs), rows)
            )
            _write_npy_entry(zf, "spatial", (len(recs), *grid_shape), chunks, FLOAT32)
        for name, values in _text_columns(recs).items():  # fixed-width unicode, as np.savez
            dtype = np.dtype(f"<U{max(map(len, values), default=1)}")
            rows = max(1, chunk_bytes // dtype.itemsize)
            chunks = (np.array(values[i : i + rows], dtype) for i in range(0, len(values), rows))
            _write_npy_entry(zf, name, (len(values),), chunks, dtype)
    return dim, grid_shape


def _write_npy_entry(
    zf: zipfile.ZipFile,
    name: str,
    shape: tuple[int, ...],
    chunks: Iterator[np.ndarray],
    dtype: np.dtype,
) -> None:
    """One ``name.npy`` entry of ``shape`` and ``dtype``, its rows in C order from ``chunks``.
    Header first: the shape is known before any row is read."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:  # zip64: entries past 2 GiB
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).data)


def write_parquet(
    cache: FeatureCache,
    recs: Sequence[Record],
    out: Path,
    *,
    spatial: int | None,
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> tuple[int, tuple[int, int] | None]:
    """``recs``' features as a parquet file, written atomically and streamed: one row group of
    about ``row_group_bytes`` of features read from the cache, written, and freed at a time, so
    memory does not grow with the split. ``features`` is a fixed-size list of float32 (D per
    row); with ``spatial`` each row's grid is flattened token-major to ``spatial`` (T*C floats:
    parquet has no 3-d cells). Returns (D, (T, C) or None)."""
    pa, pq = _pyarrow()
    dim = cache.dim
    grid_dim = (cache.array_dim(grid_array(spatial)) or 0) if spatial else 0
    tokens = spatial * spatial if spatial else 0
    fields = [pa.field(k, pa.string()) for k in ("path", "label", "split", "sha256")]
    fields.append(pa.field("features", pa.list_(pa.float32(), dim)))
    if spatial:
        fields.append(pa.field("spatial", pa.list_(pa.float32(), grid_dim)))
    schema = pa.schema(fields)
    rows = max(1, row_group_bytes // (4 * (dim + grid_dim)))

    def floats(x: np.ndarray, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), width)

    with atomic_open(out, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for start in range(0, len(recs), rows):
            chunk = recs[start : start + rows]
            columns = [pa.array(v, pa.string()) for v in _text_columns(chunk).values()]
            columns.append(floats(load_features(cache, chunk), dim))
            if spatial:
                columns.append(floats(load_grid(cache, chunk, spatial), grid_dim))
            writer.write_batch(pa.record_batch(columns, schema=schema))
    return dim, None if not spatial else (tokens, grid_dim // max(1, tokens))
