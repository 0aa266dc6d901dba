"""File helpers every writer uses: hashing and atomic writes (temp file + fsync + rename).

A crash or kill at any point leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_store() -> Path:
    """Where weights hashes are remembered between runs: $XDG_CACHE_HOME/samprobe (~/.cache/samprobe)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "samprobe" / "weights-sha256.json"


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    store = sha256_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(path) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    known = known if isinstance(known, dict) else {}
    known[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a re-hash
        atomic_write_text(store, json.dumps(known, indent=1))
    return digest


def weights_sha256(path: Path | str) -> str:
    """sha256 of a (large, rarely changing) weights file, remembered per (path, size, mtime) in
    the process and in ``sha256_store()``: `train` / `evaluate` compute the feature fingerprint
    without re-reading a 2.5 GB vit_h file every run (as make and rsync trust size + mtime)."""
    st = os.stat(path)
    return _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Write to a temp file beside ``path``; on success fsync and rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should read like any file
        with os.fdopen(fd, mode, encoding=encoding, newline="" if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
