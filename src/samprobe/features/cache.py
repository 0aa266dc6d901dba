"""Feature cache: content-addressed (sha256 of image bytes) within a backbone fingerprint.

Layout of ``<cache_dir>/<fingerprint>/``:

- ``meta.json``: what the fingerprint stands for (backbone, pooling, dim, dtype).
- ``index.sqlite`` (WAL): table ``shards`` (one row per shard file: array name, rows, dim,
  size, crc32, stat stamp) and table ``entries`` (key, array) -> (shard, row).
- ``shards/<uuid>.bin``: raw C-order ``[rows, dim]`` arrays of the cache dtype, no header
  (shape and dtype live in the index), so a reader memory-maps them directly.
- ``manifests/rank<R>-<uuid>.jsonl``: only while a multi-node extraction runs (or after one
  died): each rank's append-only list of the shards it wrote. Ranks never write the index; one
  process merges the manifests into it (``merge_manifests``, see ``features.manifest``): rank 0
  at the end of the run, or the next process opening the cache for writing.

Why it cannot lose or corrupt work:
- A shard is written atomically (temp + fsync + rename) *before* the transaction (or manifest
  line) that registers it and its entries commits. A kill leaves at worst an orphan file
  nothing points to.
- Each shard has a crc32 and a stat stamp (size, mtime_ns, inode) recorded at write time.
  The first time a process opens a shard it compares the stamp; if the file changed in any
  way since it was written, the crc32 is recomputed and a mismatch marks it corrupt. A corrupt
  shard is never read: ``get`` raises, ``missing`` drops its entries so extraction redoes them.
  ``verify`` always recomputes every crc32 (catches silent bit rot too).
- Shards are immutable. ``compact`` packs small shards (one per extraction batch) into large
  ones for read speed, writing the new file before repointing entries in one transaction.

Entries are keyed by (key, array): ``array`` is "pooled" today; a second named array per
image (e.g. a spatial grid) gets its own shards without a schema change.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samprobe.errors import CacheError
from samprobe.features.manifest import (
    MANIFEST_DIR,
    ManifestRecord,
    ShardFile,
    file_stamp,
    manifest_files,
    read_manifest,
    write_shard_file,
)
from samprobe.io import atomic_write_text, ensure_writable_dir, file_crc32

log = logging.getLogger("samprobe")

POOLED = "pooled"
SHARD_ROWS = 32768
"""Compaction packs entries into shards of up to this many rows (~80 MB at 1280-d fp16)."""
ORPHAN_AGE_S = 600.0
"""Unreferenced shard files younger than this may belong to a writer about to commit: kept."""
_SQL_VARS = 900  # below SQLite's bound-parameter limit

# ``shard_keys.keys`` lists the shard's keys in row order ("\n"-joined) and ``shards.live`` counts
# the entries pointing into it (kept by triggers). A shard with live == rows is exactly described by
# its key list, so a bulk read resolves 100k keys from a few key lists instead of 100k index rows.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY, file TEXT UNIQUE NOT NULL, array TEXT NOT NULL, rows INTEGER NOT NULL,
    dim INTEGER NOT NULL, nbytes INTEGER NOT NULL, crc32 INTEGER NOT NULL, stamp TEXT NOT NULL,
    live INTEGER NOT NULL DEFAULT 0);
-- apart from shards: the triggers rewrite a shards row per entry, which must stay small
CREATE TABLE IF NOT EXISTS shard_keys (id INTEGER PRIMARY KEY, keys TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS shards_del AFTER DELETE ON shards BEGIN DELETE FROM shard_keys WHERE id = OLD.id; END;
CREATE TABLE IF NOT EXISTS entries (
    key TEXT NOT NULL, array TEXT NOT NULL, shard INTEGER NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY (key, array)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries
    BEGIN UPDATE shards SET live = live + 1 WHERE id = NEW.shard; END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries
    BEGIN UPDATE shards SET live = live - 1 WHERE id = OLD.shard; END;
-- bytes of each per-rank manifest already merged (updated in the transaction adding its entries)
CREATE TABLE IF NOT EXISTS manifests (file TEXT PRIMARY KEY, merged INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_upd AFTER UPDATE OF shard ON entries WHEN OLD.shard != NEW.shard
    BEGIN UPDATE shards SET live = live - 1 WHERE id = OLD.shard;
          UPDATE shards SET live = live + 1 WHERE id = NEW.shard; END;
"""
_ROW_BITS = 32  # location = shard id << 32 | row


def estimate_bytes(n: int, dim: int, dtype: str | np.dtype) -> int:
    """Disk bytes for ``n`` entries of ``dim`` values: raw array plus ~90 B of index per entry."""
    return int(n * (dim * np.dtype(dtype).itemsize + 90))


def check_free_space(path: Path, need: int) -> int:
    """Free bytes at ``path``; CacheError when fewer than ``need`` (+5% headroom)."""
    free = shutil.disk_usage(path).free
    if free < need * 1.05:
        raise CacheError(
            f"only {free / 1e9:.2f} GB free at {path}, about {need / 1e9:.2f} GB needed for the "
            f"features",
            fix="free disk space or move features.cache_dir to a larger disk",
        )
    return free


@dataclass(frozen=True)
class Shard(ShardFile):
    """A shard file registered in the index under ``id``."""

    id: int


@dataclass
class VerifyReport:
    shards: int = 0
    entries: int = 0
    bad_shards: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    bad_entries: int = 0
    dropped: bool = False


CACHE_LAYOUT = "shards-v1"  # bump when the index schema or shard format changes


class FeatureCache:
    def __init__(
        self,
        cache_dir: Path,
        fingerprint: str,
        dim: int,
        dtype: str,
        meta: dict[str, Any] | None = None,
        readonly: bool = False,
    ) -> None:
        """``readonly``: for readers (train, evaluate, export, cache info / verify): needs read access
        only, creates and changes nothing (a cache on a read-only share, or another user's); a
        fingerprint that was never extracted reads as empty."""
        self.readonly = readonly
        self.root = (
            Path(cache_dir) / fingerprint
            if readonly
            else ensure_writable_dir(Path(cache_dir) / fingerprint, "features.cache_dir")
        )
        self.shard_dir = self.root / "shards"
        if not readonly:
            self.shard_dir.mkdir(exist_ok=True)
        self.fingerprint = fingerprint
        self.dim = dim
        self.dtype = np.dtype(dtype)
        meta_file = self.root / "meta.json"
        if readonly:
            self.db = self._connect_readonly()
        elif not meta_file.exists():
            atomic_write_text(
                meta_file,
                json.dumps(
                    {
                        "fingerprint": fingerprint,
                        "dim": dim,
                        "dtype": str(self.dtype),
                        "layout": CACHE_LAYOUT,
                        **(meta or {}),
                    },
                    indent=2,
                ),
            )
        if meta_file.exists():
            layout = json.loads(meta_file.read_text(encoding="utf-8")).get("layout")
            if layout != CACHE_LAYOUT:
                raise CacheError(
                    f"{self.root} was written in cache layout {layout!r}, this samprobe reads "
                    f"{CACHE_LAYOUT!r}",
                    fix=f"delete {self.root} (features are re-extracted) or use the samprobe "
                    f"version that wrote it",
                )
        if not readonly:
            # check_same_thread=False: the extractor hands put() to one writer thread; one thread at
            # a time uses it.
            self.db = sqlite3.connect(
                self.root / "index.sqlite", timeout=120, check_same_thread=False
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: durable across process kills
            self.db.execute("PRAGMA synchronous=NORMAL")
            # INSERT OR REPLACE must fire the delete trigger
            self.db.execute("PRAGMA recursive_triggers=ON")
            with self.db:
                self.db.executescript(_SCHEMA)
        self._opened: dict[int, np.ndarray] = {}  # shard id -> verified memory map (per process)
        self._bad: dict[int, str] = {}
        unmerged = manifest_files(self.root)
        if unmerged and readonly:
            log.warning(
                f"cache {self.root}: {len(unmerged)} manifest(s) of a multi-node "
                "extraction are not merged into the index yet, so their features are not visible "
                "here; `samprobe extract -c CONFIG` merges them"
            )
        # a multi-node run died before its merge (or one runs: its whole lines count)
        elif unmerged:
            self.merge_manifests()

    def _connect_readonly(self) -> sqlite3.Connection:
        """The index opened read-only. A WAL index whose -wal/-shm files are gone (the last writer
        closed) cannot be opened read-only in a folder nobody may write: then it is opened as
        immutable, which is what it is to a reader without write access."""
        index = self.root / "index.sqlite"
        if not index.is_file():  # never extracted: an empty index in memory
            db = sqlite3.connect(":memory:", check_same_thread=False)
            db.executescript(_SCHEMA)
            return db
        errors = []
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(
                    f"{index.absolute().as_uri()}?{flags}",
                    uri=True,
                    timeout=120,
                    check_same_thread=False,
                )
                db.execute("SELECT COUNT(*) FROM shards").fetchone()
                return db
            except sqlite3.Error as exc:
                errors.append(str(exc))
        raise CacheError(
            f"feature cache index {index} cannot be read ({'; '.join(errors)})",
            fix=f"give this user read access to {self.root}, or run `samprobe extract -c CONFIG` "
            f"to rebuild it",
        )

    @classmethod
    def open_existing(cls, root: Path, readonly: bool = False) -> FeatureCache:
        """Open ``<cache_dir>/<fingerprint>`` from its meta.json (for info/verify/prune of any fingerprint)."""
        try:
            meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheError(
                f"{root} is not a samprobe feature cache ({exc})",
                fix="remove the folder or point features.cache_dir elsewhere",
            ) from None
        return cls(root.parent, root.name, int(meta["dim"]), meta["dtype"], readonly=readonly)

    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "meta.json").read_text(encoding="utf-8"))

    def close(self) -> None:
        self._opened.clear()
        self.db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(
            self.db.execute("SELECT COUNT(*) FROM entries WHERE array=?", (POOLED,)).fetchone()[0]
        )

    # -----------------------------------------------------------------------------------
    # index

    def _locate(self, keys: list[str], array: str) -> tuple[np.ndarray, np.ndarray]:
        """(shard id [N], row [N]) of ``keys``; KeyError naming the first key not in the cache.

        A bulk request resolves through the key lists of fully live shards against the sorted
        hashes of the requested keys (searchsorted, then the candidates compared as strings), one
        shard's list at a time, no dict of every key. ``bench/cache_locate.py --against`` the
        dict version: 300k keys shuffled 19.9 MB at peak (tracemalloc) and 0.46 s vs 63.6 MB and
        1.08 s; in storage order 14.7 vs 9.9 MB (the hash arrays), 0.07 s both."""
        loc = np.full(len(keys), -1, dtype=np.int64)
        if len(keys) >= 2000:
            hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))
            order = np.argsort(hashes, kind="stable")
            hashes = hashes[order]  # sorted; order[p]: the key of hashes[p]
            q = (
                "SELECT s.id, s.rows, k.keys FROM shards s JOIN shard_keys k ON k.id = s.id "
                "WHERE s.array=? AND s.live=s.rows"
            )
            for sid, n_rows, text in self.db.execute(q, (array,)):
                start = sid << _ROW_BITS
                # the common bulk read: a whole shard, in storage order -> one string compare
                first = text[: text.find("\n")] if n_rows > 1 else text
                p = int(np.searchsorted(hashes, hash(first)))
                while p < len(hashes) and hashes[p] == hash(first):
                    a = int(order[p])
                    if keys[a] == first and "\n".join(keys[a : a + n_rows]) == text:
                        loc[a : a + n_rows] = np.arange(start, start + n_rows)
                        break
                    p += 1
                else:
                    _locate_in(keys, hashes, order, text.split("\n"), start, loc)
        rest = np.flatnonzero(loc < 0)
        if len(rest):
            found = self._locations([keys[i] for i in rest], array)
            for i in rest:
                s, r = found.get(keys[i]) or _raise_key_error(keys[i])
                loc[i] = (s << _ROW_BITS) | r
        return loc >> _ROW_BITS, loc & ((1 << _ROW_BITS) - 1)

    def _shards(self, ids: Iterable[int] | None = None) -> dict[int, Shard]:
        rows = self.db.execute(
            "SELECT file, array, rows, dim, nbytes, crc32, stamp, id FROM shards"
        ).fetchall()  # no key lists
        out = {r[-1]: Shard(*r) for r in rows}
        return out if ids is None else {i: out[i] for i in set(ids) if i in out}

    def _locations(self, keys: list[str], array: str) -> dict[str, tuple[int, int]]:
        """key -> (shard id, row). Large requests scan the table once instead of many IN queries."""
        if len(keys) > 20 * _SQL_VARS:
            want = set(keys)
            return {
                k: (s, r)
                for k, s, r in self.db.execute(
                    "SELECT key, shard, row FROM entries WHERE array=?", (array,)
                )
                if k in want
            }
        out: dict[str, tuple[int, int]] = {}
        for i in range(0, len(keys), _SQL_VARS):
            chunk = keys[i : i + _SQL_VARS]
            q = f"SELECT key, shard, row FROM entries WHERE array=? AND key IN ({','.join('?' * len(chunk))})"
            out.update({k: (s, r) for k, s, r in self.db.execute(q, [array, *chunk])})
        return out

    def array_dim(self, array: str) -> int | None:
        """Values per entry of ``array`` as stored (None when it has no shard yet)."""
        row = self.db.execute("SELECT dim FROM shards WHERE array=? LIMIT 1", (array,)).fetchone()
        return None if row is None else int(row[0])

    def keys(self, array: str = POOLED) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM entries WHERE array=?", (array,))}

    # -----------------------------------------------------------------------------------
    # shard files

    def _open(self, shard: Shard) -> np.ndarray:
        """Memory map of a shard, checked once per process: stamp unchanged, or crc32 recomputed."""
        if shard.id in self._opened:
            return self._opened[shard.id]
        if shard.id in self._bad:
            raise _Corrupt(self._bad[shard.id])
        path = self.shard_dir / shard.file
        reason = self._check(shard, path, full=False)
        if reason:
            self._bad[shard.id] = reason
            raise _Corrupt(reason)
        arr = np.memmap(path, dtype=self.dtype, mode="r", shape=(shard.rows, shard.dim))
        self._opened[shard.id] = arr
        return arr

    def _check(self, shard: Shard, path: Path, full: bool) -> str | None:
        """None if the shard file is intact, else why not. ``full`` always recomputes the crc32."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return "file missing"
        if size != shard.nbytes:
            return f"size {size} bytes, expected {shard.nbytes} (cut short or overwritten)"
        if not full and file_stamp(path) == shard.stamp:
            return None  # untouched since it was written and checksummed
        if file_crc32(path) != shard.crc32:
            return "crc32 mismatch (bytes changed on disk)"
        # content intact, only the stamp moved (copied/touched): remember the new one
        if not full and not self.readonly:
            with self.db:
                self.db.execute(
                    "UPDATE shards SET stamp=? WHERE id=?", (file_stamp(path), shard.id)
                )
        return None

    def _write_shard(self, array: np.ndarray, name: str, keys: list[str]) -> Shard:
        """Write ``array`` [rows, dim] (row i = ``keys[i]``) atomically and register it (the caller commits)."""
        data = np.ascontiguousarray(array, dtype=self.dtype)
        return self._register(write_shard_file(self.shard_dir, data, name), keys)

    def _register(self, shard: ShardFile, keys: list[str]) -> Shard:
        """Index rows of a written shard file (the caller commits)."""
        cur = self.db.execute(
            "INSERT INTO shards (file, array, rows, dim, nbytes, crc32, stamp) VALUES "
            "(?,?,?,?,?,?,?)",
            (
                shard.file,
                shard.array,
                shard.rows,
                shard.dim,
                shard.nbytes,
                shard.crc32,
                shard.stamp,
            ),
        )
        self.db.execute(
            "INSERT INTO shard_keys (id, keys) VALUES (?, ?)", (cur.lastrowid, "\n".join(keys))
        )
        return Shard(**vars(shard), id=int(cur.lastrowid))

    # -----------------------------------------------------------------------------------
    # public API

    def put(self, keys: list[str], features: np.ndarray, array: str = POOLED) -> None:
        """features: [N, dim] -> one shard file, then one committed transaction (all or nothing)."""
        if array == POOLED and features.shape != (len(keys), self.dim):
            raise ValueError(f"features shape {features.shape} != ({len(keys)}, {self.dim})")
        if not keys:
            return
        features = features.reshape(len(keys), -1)
        with self.db:
            shard = self._write_shard(features, array, keys)
            self.db.executemany(
                "INSERT OR REPLACE INTO entries (key, array, shard, row) VALUES (?, ?, ?, ?)",
                [(k, array, shard.id, i) for i, k in enumerate(keys)],
            )

    def merge_manifests(self) -> int:
        """Add what the per-rank manifests (``features.manifest``) describe to the index; returns
        the entries added. Each line is merged once: the merged byte count of its manifest is
        stored in the same transaction as its entries. A line naming a shard file that is missing
        or of another size is skipped with a warning (its keys stay missing: extraction redoes
        them). A manifest is deleted once merged if its writer closed it, or left it untouched
        for ``ORPHAN_AGE_S`` (the writer died)."""
        if self.readonly:
            raise ValueError("a read-only cache cannot merge manifests")
        added = 0
        files = manifest_files(self.root)
        for path in files:
            row = self.db.execute(
                "SELECT merged FROM manifests WHERE file=?", (path.name,)
            ).fetchone()
            merged = int(row[0]) if row else 0
            try:
                records, closed = read_manifest(path, merged)
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:  # deleted by a merge that ran meanwhile
                continue
            with self.db:
                for end, record in records:
                    added += self._merge_record(record, path.name)
                    merged = end
                self.db.execute(
                    "INSERT OR REPLACE INTO manifests (file, merged) VALUES (?, ?)",
                    (path.name, merged),
                )
            if closed or age >= ORPHAN_AGE_S:
                # file first, then its row: a kill in between leaves a row for no file, never a
                # file whose merged count is forgotten (it would be merged from byte 0 again)
                path.unlink(missing_ok=True)
                with self.db:
                    self.db.execute("DELETE FROM manifests WHERE file=?", (path.name,))
        listed = {p.name for p in files}
        with self.db:  # rows of manifests deleted by a merge killed before it dropped their row
            for (name,) in self.db.execute("SELECT file FROM manifests").fetchall():
                if name not in listed and not (self.root / MANIFEST_DIR / name).exists():
                    self.db.execute("DELETE FROM manifests WHERE file=?", (name,))
        if added:
            log.info(f"cache: merged {added} entries from {len(files)} rank manifest(s)")
        return added

    def _merge_record(self, record: ManifestRecord, manifest: str) -> int:
        """Register one manifest line's shard and point its keys at it (the caller commits)."""
        shard = record.shard
        if self.db.execute("SELECT 1 FROM shards WHERE file=?", (shard.file,)).fetchone():
            return 0  # already in the index
        try:
            size = os.stat(self.shard_dir / shard.file).st_size
        except FileNotFoundError:
            size = -1
        expected_dim = self.dim if shard.array == POOLED else shard.dim
        if size != shard.nbytes or shard.rows != len(record.keys) or shard.dim != expected_dim:
            log.warning(
                f"cache: manifest {manifest} names shard {shard.file}, which is missing or not as "
                f"written (size {size}, expected {shard.nbytes}); its {shard.rows} entries will be "
                "re-extracted"
            )
            return 0
        registered = self._register(shard, record.keys)
        self.db.executemany(
            "INSERT OR REPLACE INTO entries (key, array, shard, row) VALUES (?, ?, ?, ?)",
            [(k, shard.array, registered.id, i) for i, k in enumerate(record.keys)],
        )
        return len(record.keys)

    def missing(self, keys: Iterable[str], array: str = POOLED) -> list[str]:
        """Keys with no usable entry. Entries in corrupt shards are dropped here, so they get re-extracted."""
        keys = list(dict.fromkeys(keys))
        have = self._locations(keys, array)
        bad = self._drop_corrupt({s for s, _ in have.values()})
        return [k for k in keys if k not in have or have[k][0] in bad]

    def _drop_corrupt(self, shard_ids: set[int]) -> set[int]:
        """Corrupt shards among ``shard_ids``, removed from the index (read-only: only reported)."""
        shards = self._shards(shard_ids)
        bad = set(shard_ids) - set(shards)  # entries pointing at an unregistered shard
        for sid, shard in shards.items():
            try:
                self._open(shard)
            except _Corrupt as exc:
                log.warning(
                    f"cache: shard {shard.file} is corrupt ({exc}); its {shard.rows} entries will "
                    f"be re-extracted"
                )
                bad.add(sid)
        if bad and not self.readonly:
            self._delete_shards(bad)
        return bad

    def _delete_shards(self, ids: set[int]) -> None:
        shards = self._shards(ids)
        with self.db:
            for i in range(0, len(ids), _SQL_VARS):
                chunk = list(ids)[i : i + _SQL_VARS]
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"DELETE FROM entries WHERE shard IN ({marks})", chunk)
                self.db.execute(f"DELETE FROM shards WHERE id IN ({marks})", chunk)
        for s in shards.values():
            self._opened.pop(s.id, None)
            (self.shard_dir / s.file).unlink(missing_ok=True)

    def get(self, keys: list[str], array: str = POOLED, dtype: Any = np.float32) -> np.ndarray:
        """[N, dim] in the order of ``keys`` (float32 by default; ``dtype=None`` keeps the stored dtype).

        Raises KeyError naming a missing key, CacheError if a shard is corrupt."""
        keys = list(keys)
        n = len(keys)
        shard_of, row_of = self._locate(keys, array)
        shards = self._shards(np.unique(shard_of).tolist())
        dim = next(iter(shards.values())).dim if shards else self.dim
        out = np.empty((n, dim), dtype=self.dtype if dtype is None else dtype)
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for idx in np.split(order, bounds) if n else []:
            shard = shards[int(shard_of[idx[0]])]
            arr = self._readable(shard)
            rows = row_of[idx]
            if len(idx) > 1 and np.all(np.diff(idx) == 1) and np.all(np.diff(rows) == 1):
                a, r0 = int(idx[0]), int(rows[0])
                dest = out[a : a + len(idx)]
                # contiguous run: read() straight into the result (faster than mmap faults)
                if dest.dtype == self.dtype:
                    read_rows(self.shard_dir / shard.file, r0, dest)
                else:
                    dest[:] = arr[r0 : r0 + len(idx)]
            else:
                out[idx] = arr[rows]
        return out

    def shard_files(
        self, keys: list[str], array: str = POOLED
    ) -> tuple[np.ndarray, np.ndarray, dict[int, Path]]:
        """(shard id [N], row [N]) of ``keys`` and the checked file of each shard they are in, for
        readers that read the shards piece by piece themselves (``read_rows``: training that
        streams). KeyError naming a missing key, CacheError if a shard is corrupt."""
        shard_of, row_of = self._locate(list(keys), array)
        shards = self._shards(np.unique(shard_of).tolist())
        for shard in shards.values():
            self._readable(shard)
        return shard_of, row_of, {sid: self.shard_dir / s.file for sid, s in shards.items()}

    def _readable(self, shard: Shard) -> np.ndarray:
        """The shard's checked memory map; CacheError if it is corrupt."""
        try:
            return self._open(shard)
        except _Corrupt as exc:
            raise CacheError(
                f"feature cache shard {self.shard_dir / shard.file} is corrupt ({exc})",
                fix="run `samprobe extract -c CONFIG`: it drops corrupt entries and "
                "re-extracts them",
            ) from None

    # -----------------------------------------------------------------------------------
    # maintenance

    def stats(self) -> dict[str, Any]:
        shard_bytes = int(
            self.db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM shards").fetchone()[0]
        )
        on_disk = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        live = int(self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        arrays = dict(
            self.db.execute(
                "SELECT array, COUNT(*) FROM entries GROUP BY array ORDER BY array"
            ).fetchall()
        )
        return {
            "fingerprint": self.fingerprint,
            "entries": live,
            "arrays": arrays,
            "shards": int(self.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]),
            "shard_bytes": shard_bytes,
            "bytes_on_disk": on_disk,
            "dim": self.dim,
            "dtype": str(self.dtype),
        }

    def verify(self, drop: bool = False) -> VerifyReport:
        """Recompute every shard's crc32 and size; count entries in bad shards; ``drop`` removes them."""
        rep = VerifyReport()
        per_shard = dict(
            self.db.execute("SELECT shard, COUNT(*) FROM entries GROUP BY shard").fetchall()
        )
        shards = self._shards()
        rep.shards, rep.entries = len(shards), sum(per_shard.values())
        bad: set[int] = set()
        for sid, shard in shards.items():
            reason = self._check(shard, self.shard_dir / shard.file, full=True)
            if reason:
                bad.add(sid)
                rep.bad_shards.append((shard.file, reason))
        dangling = set(per_shard) - set(shards)
        for sid in dangling:
            rep.bad_shards.append(
                (f"<shard id {sid}>", "index entries point at an unregistered shard")
            )
        rep.bad_entries = sum(per_shard.get(s, 0) for s in bad | dangling)
        if drop and (bad or dangling):
            self._delete_shards(bad | dangling)
            rep.dropped = True
        return rep

    def remove(self, keys: Iterable[str]) -> int:
        """Drop entries (all arrays) of ``keys`` from the index; ``compact`` then frees their bytes."""
        keys = list(keys)
        with self.db:
            for i in range(0, len(keys), _SQL_VARS):
                chunk = keys[i : i + _SQL_VARS]
                self.db.execute(
                    f"DELETE FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
        return len(keys)

    def compact(self, target_rows: int = SHARD_ROWS) -> dict[str, int]:
        """Pack small or partly dead shards into shards of up to ``target_rows``; delete dead ones.

        Crash-safe: new shards are written and registered, entries repointed only if they still
        point at the old place, all in one transaction; old files are deleted after the commit."""
        live = dict(
            self.db.execute("SELECT shard, COUNT(*) FROM entries GROUP BY shard").fetchall()
        )
        shards = self._shards()
        dead = {s for s in shards if live.get(s, 0) == 0}
        small = {
            s: sh
            for s, sh in shards.items()
            if s not in dead and (sh.rows < target_rows // 2 or live[s] < sh.rows)
        }
        by_array: dict[str, list[Shard]] = {}
        for sh in small.values():
            by_array.setdefault(sh.array, []).append(sh)
        written = 0
        for array, group in by_array.items():
            if len(group) < 2 and all(live[s.id] == s.rows for s in group):
                continue  # a single full-enough shard: nothing to gain
            ids = {s.id for s in group}
            rows = sorted(
                (s, r, k)
                for k, s, r in self.db.execute(
                    "SELECT key, shard, row FROM entries WHERE array=?", (array,)
                )
                if s in ids
            )
            good = []
            for s, r, k in rows:
                try:
                    self._open(small[s])
                    good.append((s, r, k))
                except _Corrupt:
                    pass  # left for verify/extract to drop
            for i in range(0, len(good), target_rows):
                part = good[i : i + target_rows]
                data = np.concatenate(
                    [
                        self._gather(small[s], [r for _, r, _ in grp])
                        for s, grp in itertools.groupby(part, key=lambda p: p[0])
                    ]
                )
                with self.db:
                    new = self._write_shard(
                        data.reshape(len(part), -1), array, [k for _, _, k in part]
                    )
                    self.db.executemany(
                        "UPDATE entries SET shard=?, row=? WHERE key=? AND array=? AND shard=?",
                        [(new.id, j, k, array, s) for j, (s, _, k) in enumerate(part)],
                    )
                written += 1
            dead |= {s.id for s in group if s.id not in self._bad}
        still = dict(
            self.db.execute("SELECT shard, COUNT(*) FROM entries GROUP BY shard").fetchall()
        )
        dead = {s for s in dead if still.get(s, 0) == 0}
        if dead:
            self._delete_shards(dead)
        free, pages = (
            self.db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count")
        )
        # >20% of the index is pages of deleted rows: give them back to the disk
        if free * 5 > pages:
            self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"written": written, "removed": len(dead)}

    def _gather(self, shard: Shard, rows: list[int]) -> np.ndarray:
        arr = self._open(shard)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return np.asarray(arr[rows[0] : rows[0] + len(rows)])
        return arr[rows]

    def remove_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete shard files (and temp files of killed writes) no index row points at."""
        known = {f for (f,) in self.db.execute("SELECT file FROM shards")}
        now, n = time.time(), 0
        for p in self.shard_dir.iterdir():
            if p.name not in known and now - p.stat().st_mtime >= min_age_s:
                p.unlink(missing_ok=True)
                n += 1
        return n


class _Corrupt(Exception):
    pass


def read_rows(path: Path, start: int, out: np.ndarray) -> None:
    """Rows ``start``.. of a shard file straight into ``out`` [rows, dim] (the shard's dtype):
    raw reads, no copy through a buffer, and no memory map (the pages of a map count in the
    reader's RSS for as long as the kernel leaves them there)."""
    view = memoryview(out.reshape(-1)).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(start * out[0].nbytes if len(out) else 0)
        done = 0
        while done < len(view):  # a read may return less than asked (signals, 2 GiB cap)
            got = f.readinto(view[done:])
            if not got:
                raise CacheError(
                    f"feature cache shard {path} is corrupt (cut short: it ends before row "
                    f"{start + done // out[0].nbytes})",
                    fix="run `samprobe extract -c CONFIG`: it drops corrupt entries and "
                    "re-extracts them",
                )
            done += got


def _raise_key_error(key: str) -> tuple[int, int]:
    raise KeyError(key)


def _locate_in(
    keys: list[str],
    hashes: np.ndarray,
    order: np.ndarray,
    names: list[str],
    start: int,
    loc: np.ndarray,
) -> None:
    """Set ``loc`` of the ``keys`` among one shard's key list ``names`` (row r: ``start + r``).
    ``hashes``: the keys' hashes sorted, ``order``: the key of each."""
    named = np.fromiter(map(hash, names), dtype=np.int64, count=len(names))
    lo, hi = np.searchsorted(hashes, named, "left"), np.searchsorted(hashes, named, "right")
    one = np.flatnonzero(hi - lo == 1)  # names one requested key may be: the common case
    at = order[lo[one]]
    same = np.array([keys[i] == names[r] for i, r in zip(at.tolist(), one.tolist())], dtype=bool)
    loc[at[same]] = start + one[same]
    for r in np.flatnonzero(hi - lo > 1).tolist():  # a key asked for twice, or equal hashes
        for p in range(int(lo[r]), int(hi[r])):
            i = int(order[p])
            if keys[i] == names[r]:
                loc[i] = start + r


def fingerprint_dirs(cache_dir: Path) -> list[Path]:
    """Every ``<cache_dir>/<fingerprint>`` folder holding a cache index."""
    if not Path(cache_dir).is_dir():
        return []
    return sorted(
        p
        for p in Path(cache_dir).iterdir()
        if (p / "index.sqlite").is_file() and (p / "meta.json").is_file()
    )


# ---------------------------------------------------------------------------------------
# runs using a cache

RUNS_FILE = "runs.json"
"""``<cache_dir>/runs.json``: every run directory that extracted into or read from the cache;
``cache prune`` keeps every entry that any of their splits.csv lists."""


@contextlib.contextmanager
def _runs_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on the registry, so two projects registering at once lose neither."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rewrite still never leaves a torn file
        yield
        return
    with open(Path(cache_dir) / ".runs.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def registered_runs(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Run directory -> {"registered": unix time} of the runs using ``cache_dir``."""
    path = Path(cache_dir) / RUNS_FILE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["runs"])
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(
            f"{path} is not a samprobe run registry ({exc})",
            fix=f"delete {path}; then run `samprobe extract -c CONFIG` once per project using the "
            f"cache",
        ) from None


def register_run(cache_dir: Path, run_dir: Path) -> None:
    """Record that ``run_dir`` uses the cache (idempotent). A cache this user cannot write is read
    as it is: nobody who could prune it learns of this run, so say so instead of failing."""
    run = str(Path(run_dir).resolve())
    if not os.access(cache_dir, os.W_OK):
        if run not in registered_runs(cache_dir):
            log.warning(
                f"cache {cache_dir} is read-only: run {run} is not registered in {RUNS_FILE}, "
                "so `samprobe cache prune` run by its owner does not know this run needs its "
                "entries"
            )
        return
    with _runs_lock(cache_dir):
        runs = registered_runs(cache_dir)
        if run in runs:
            return
        runs[run] = {"registered": round(time.time())}
        atomic_write_text(Path(cache_dir) / RUNS_FILE, json.dumps({"runs": runs}, indent=1))


def unregister_runs(cache_dir: Path, gone: Iterable[str]) -> None:
    gone = set(gone)
    with _runs_lock(cache_dir):
        runs = {k: v for k, v in registered_runs(cache_dir).items() if k not in gone}
        atomic_write_text(Path(cache_dir) / RUNS_FILE, json.dumps({"runs": runs}, indent=1))
