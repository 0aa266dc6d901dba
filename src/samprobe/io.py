"""File helpers every writer uses: hashing, writability checks and atomic writes (temp file +
fsync + rename).

A crash or kill at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import torch

from samprobe.errors import CacheError

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...


_H = TypeVar("_H", bound=_Hasher)


def hash_file(file: Path | str | IO[bytes], hasher: _H, block: int = _CHUNK) -> _H:
    """``hasher`` (a hashlib object, or anything with ``update(bytes)``) fed every byte of ``file``
    (a path, or an open binary file from its position on), ``block`` bytes at a time: a 2.5 GB
    checkpoint is hashed in 1 MB of memory. Returns ``hasher``."""
    with open(file, "rb") if isinstance(file, (str, Path)) else contextlib.nullcontext(file) as f:
        while chunk := f.read(block):
            hasher.update(chunk)
    return hasher


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()


class _Crc32:
    """zlib.crc32 as a hasher for ``hash_file``."""

    value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)


def file_crc32(path: Path | str) -> int:
    """CRC-32 of a file: what feature-cache shards are checked against."""
    return hash_file(path, _Crc32(), block=1 << 22).value


def user_cache_file(name: str) -> Path | None:
    """``name`` in samprobe's per-user cache folder, $XDG_CACHE_HOME/samprobe (~/.cache/samprobe),
    for facts worth remembering between runs (weights hashes, the CPU precision probe); None when
    there is no home directory (a container user without one)."""
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):
        return None
    return root / "samprobe" / name


def sha256_store() -> Path | None:
    """Where weights hashes are remembered between runs (see ``user_cache_file``)."""
    return user_cache_file("weights-sha256.json")


def file_version(st: os.stat_result) -> dict[str, int]:
    """What identifies one version of a file without reading it (size, mtime_ns, ctime_ns, inode):
    a file rewritten, touched, or replaced by another one (a new inode) gets another version.
    ctime is set by the kernel on every write or rename and no copy tool can preserve it (cp -p,
    rsync -a and tar keep mtime)."""
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, version: tuple[tuple[str, int], ...]) -> str:
    store, stamp = sha256_store(), dict(version)
    try:
        known = json.loads(store.read_text()) if store else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(path)
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and {k: entry.get(k) for k in stamp} == stamp
    ):
        return entry["sha256"]
    with open(path, "rb") as f:
        digest = hash_file(f, hashlib.sha256()).hexdigest()
        unchanged = file_version(os.fstat(f.fileno())) == stamp  # not rewritten while we read it
    if store and unchanged:
        known[path] = {**stamp, "sha256": digest}
        with contextlib.suppress(OSError):  # a read-only home only costs the next run a re-hash
            atomic_write_text(store, json.dumps(known, indent=1))
    return digest


def weights_sha256(path: Path | str) -> str:
    """sha256 of a (large, rarely changing) weights file, remembered per file version (size,
    mtime, ctime, inode) in the process and in ``sha256_store()``: `train` / `evaluate` compute
    the feature fingerprint without re-reading a 2.5 GB vit_h file every run."""
    return _cached_sha256(str(Path(path).resolve()), tuple(file_version(os.stat(path)).items()))


def frame_line(obj: dict) -> bytes:
    """``obj`` as one checksummed line, ``<crc32 hex> <json>\\n``, for append-only journals: a
    line torn by a kill fails its checksum or lacks its newline, so a reader drops it."""
    return frame_json(json.dumps(obj, separators=(",", ":")))


def frame_json(text: str) -> bytes:
    """``frame_line`` of the object whose compact JSON is ``text`` (written by hand by a caller
    that writes many lines of one shape)."""
    body = text.encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def parse_framed_line(line: bytes) -> dict | None:
    """The object of one ``frame_line`` line (without its newline), or None if it is torn."""
    crc, _, body = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
            return None
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def framed_lines(data: bytes, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """(object, end offset) of each whole, valid line of ``data`` (read from byte ``offset`` of a
    journal), stopping at the first that is not (no newline yet, or a checksum mismatch: a
    writer killed mid-line, or one still writing it)."""
    start = 0
    while (nl := data.find(b"\n", start)) >= 0:
        obj = parse_framed_line(data[start:nl])
        if obj is None:
            return
        yield obj, offset + nl + 1
        start = nl + 1


def create_journal(path: Path) -> int:
    """A new append-only journal file at ``path`` (one writer's own: O_EXCL never opens another
    writer's, O_APPEND puts each write at the end), its name fsynced into its folder so it
    survives a crash before its first line. Returns the fd for ``append_journal``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666)
    fsync_dir(Path(path).parent)
    return fd


def append_journal(fd: int, lines: bytes, path: Path) -> None:
    """``lines`` (whole ``frame_line`` lines) at the end of a journal in one write, fsynced."""
    if os.write(fd, lines) != len(lines):
        raise OSError(f"short write to {path}")
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(directory: Path) -> int:
    """Delete the temp files ``atomic_open`` left in ``directory`` when its process was killed
    (SIGKILL, OOM killer, power loss: no ``finally`` ran). The writer's pid is in the temp name,
    so a temp of a live writer (e.g. an evaluate running beside a train) is kept."""
    n = 0
    for tmp in Path(directory).glob(".*.tmp") if Path(directory).is_dir() else ():
        match = _TEMP_NAME.fullmatch(tmp.name)
        if match and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                tmp.unlink()
                n += 1
    return n


_TEMP_NAME = re.compile(r"\..+\.pid(?P<pid>[0-9]+)\.[^.]+\.tmp")


@contextlib.contextmanager
def atomic_open(
    path: Path | str, mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Write to a temp file beside ``path``; on success fsync and rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
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


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` with parents and prove it is writable, or raise CacheError before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(
            f"{what} {path} cannot be created or written ({exc.strerror or exc})",
            fix=f"choose a writable location (set it in the config), or fix the permissions of "
            f"{path}",
        ) from None
    return path


def ensure_writable_file(path: Path, what: str, example: str) -> Path:
    """Check, before any work, that an output file can be written: ``path`` is not a folder and its
    folder can be created and written (the file itself is written atomically when the work is done).
    ``what`` names the setting (``--out``), ``example`` a file name for the fix."""
    path = Path(path)
    if path.is_dir():
        raise CacheError(
            f"{what} {path} is a folder, not a file",
            fix=f"name the file to write, e.g. {what} {path / example}",
        )
    ensure_writable_dir(path.parent, f"the folder of {what}")
    return path
