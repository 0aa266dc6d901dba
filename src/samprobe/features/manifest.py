"""Per-rank shard manifests: how several processes on several hosts add to one feature cache
without any of them writing the SQLite index.

A writer (one per rank and launch) writes each batch as a shard file under ``shards/`` (atomic:
temp + fsync + rename, a fresh uuid name) and then appends one line describing it to its own
manifest ``manifests/rank<R>-<uuid>.jsonl``. A line is ``<crc32 hex> <json>\\n``, written with
one ``write`` and fsynced, so a kill leaves at worst one torn last line, which its checksum or
missing newline rejects; the shard it names is then an orphan nothing points at. No two
processes ever write one file, and each launch starts a new manifest, so nothing is ever
appended after a torn line. A writer that finishes appends a ``closed`` line.

One process on one host (rank 0, or the next process that opens the cache for writing after a
run died) merges the manifests into the index (``FeatureCache.merge_manifests``); the index
remembers how many bytes of each manifest it merged, in the same transaction as the entries,
so a line is merged exactly once even when the merge itself is killed.

What this needs from the filesystem (NFS included): a rename within one directory is atomic,
and data fsynced and closed by one host is read whole by another host that opens the file
afterwards (close-to-open consistency). No locks (``fcntl``/``flock``), no shared memory maps,
no appends to one file from two processes.
"""

from __future__ import annotations

import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samprobe.io import (
    append_journal,
    atomic_open,
    create_journal,
    file_version,
    frame_line,
    framed_lines,
)

MANIFEST_DIR = "manifests"


@dataclass(frozen=True)
class ShardFile:
    """A shard file as written: what the index records about it (its id is the index's)."""

    file: str
    array: str
    rows: int
    dim: int
    nbytes: int
    crc32: int
    stamp: str


def file_stamp(path: Path) -> str:
    """size:mtime_ns:inode: any change to the file since it was written changes it."""
    version = file_version(os.stat(path))
    return f"{version['size']}:{version['mtime_ns']}:{version['inode']}"


def write_shard_file(shard_dir: Path, data: np.ndarray, array: str) -> ShardFile:
    """``data`` [rows, dim] (C order, the cache dtype) as a new shard file under ``shard_dir``."""
    file = f"{uuid.uuid4().hex}.bin"
    path = shard_dir / file
    raw = memoryview(data).cast("B")
    with atomic_open(path, "wb") as f:
        f.write(raw)
    return ShardFile(
        file, array, data.shape[0], data.shape[1], data.nbytes, zlib.crc32(raw), file_stamp(path)
    )


@dataclass(frozen=True)
class ManifestRecord:
    """One merged-ready line of a manifest: a shard file and its keys in row order."""

    shard: ShardFile
    keys: list[str]


class ManifestWriter:
    """Writes shards and one append-only manifest for one rank of one launch.

    Duck-types ``FeatureCache.put`` so the extractor hands it its batches unchanged."""

    def __init__(self, cache_root: Path, dtype: np.dtype, rank: int) -> None:
        self.shard_dir = Path(cache_root) / "shards"
        self.dtype = np.dtype(dtype)
        manifest_dir = Path(cache_root) / MANIFEST_DIR
        manifest_dir.mkdir(parents=True, exist_ok=True)
        self.path = manifest_dir / f"rank{rank}-{uuid.uuid4().hex}.jsonl"
        self._fd: int | None = create_journal(self.path)
        self.rows = 0

    def _append(self, obj: dict) -> None:
        if self._fd is None:
            raise ValueError(f"manifest {self.path} is closed")
        append_journal(self._fd, frame_line(obj), self.path)

    def put(self, keys: list[str], features: np.ndarray, array: str = "pooled") -> None:
        """features [N, ...] -> one shard file, then one manifest line naming it (in that order:
        a line never names a shard that is not whole on disk)."""
        if not keys:
            return
        data = np.ascontiguousarray(features.reshape(len(keys), -1), dtype=self.dtype)
        shard = write_shard_file(self.shard_dir, data, array)
        self._append({"shard": shard.__dict__, "keys": list(keys)})
        self.rows += len(keys)

    def close(self) -> None:
        """Mark the manifest finished: once merged, the merger may delete it."""
        if self._fd is None:
            return
        try:
            self._append({"closed": True})
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: Path, offset: int = 0) -> tuple[list[tuple[int, ManifestRecord]], bool]:
    """Whole, valid lines of ``path`` from byte ``offset``: ([(end offset, record)], closed).

    Reading stops at the first line that is not whole (no newline yet, or a checksum mismatch:
    a writer killed mid-line, or one still writing it)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    records: list[tuple[int, ManifestRecord]] = []
    closed = False
    for obj, end in framed_lines(data, offset):
        if obj.get("closed"):
            closed = True
            break
        records.append((end, ManifestRecord(ShardFile(**obj["shard"]), list(obj["keys"]))))
    return records, closed


def manifest_files(cache_root: Path) -> list[Path]:
    folder = Path(cache_root) / MANIFEST_DIR
    return sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []
