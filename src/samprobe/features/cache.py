"""Feature cache: content-addressed (sha256 of image bytes) within a backbone fingerprint.

Layout: ``<cache_dir>/<fingerprint>/`` holds ``index.sqlite`` (WAL mode; one row per image:
key -> shard file and row) and ``shards/*.npy`` feature arrays. A shard is written atomically
(temp + fsync + rename) *before* its index rows are committed, so a killed run never leaves a
visible half-written entry: at worst an orphan shard file that nothing points to.
"""
from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from samprobe.errors import CacheError
from samprobe.io import atomic_open, atomic_write_text


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` with parents and prove it is writable, or raise CacheError before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"{what} {path} cannot be created or written ({exc.strerror or exc})",
                         fix=f"choose a writable location (set it in the config), or fix the permissions of {path}") from None
    return path


class FeatureCache:
    def __init__(self, cache_dir: Path, fingerprint: str, dim: int, dtype: str, meta: dict[str, Any] | None = None) -> None:
        self.root = ensure_writable_dir(Path(cache_dir) / fingerprint, "features.cache_dir")
        (self.root / "shards").mkdir(exist_ok=True)
        self.fingerprint = fingerprint
        self.dim = dim
        self.dtype = np.dtype(dtype)
        meta_file = self.root / "meta.json"
        if not meta_file.exists():
            atomic_write_text(meta_file, json.dumps({"fingerprint": fingerprint, "dim": dim, "dtype": dtype, **(meta or {})}, indent=2))
        self.db = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL)")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def _locations(self, keys: Iterable[str]) -> dict[str, tuple[str, int]]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, tuple[str, int]] = {}
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i:i + 900]
            q = f"SELECT key, shard, row FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
            out.update({k: (s, r) for k, s, r in self.db.execute(q, chunk)})
        return out

    def missing(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        have = self._locations(keys)
        return [k for k in dict.fromkeys(keys) if k not in have]

    def put(self, keys: list[str], features: np.ndarray) -> None:
        """features: [N, dim]; one shard file, then one committed transaction."""
        if features.shape != (len(keys), self.dim):
            raise ValueError(f"features shape {features.shape} != ({len(keys)}, {self.dim})")
        if not keys:
            return
        shard = f"{uuid.uuid4().hex}.npy"
        with atomic_open(self.root / "shards" / shard, "wb") as f:
            np.save(f, np.ascontiguousarray(features, dtype=self.dtype))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO entries (key, shard, row) VALUES (?, ?, ?)",
                                [(k, shard, i) for i, k in enumerate(keys)])

    def get(self, keys: list[str]) -> np.ndarray:
        """[N, dim] float32 in the order of ``keys``; raises KeyError naming a missing key."""
        locs = self._locations(keys)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, k in enumerate(keys):
            if k not in locs:
                raise KeyError(k)
            shard, row = locs[k]
            by_shard[shard].append((i, row))
        for shard, pairs in by_shard.items():
            arr = np.load(self.root / "shards" / shard, mmap_mode="r")
            idx = np.array(pairs)
            out[idx[:, 0]] = arr[idx[:, 1]]
        return out
