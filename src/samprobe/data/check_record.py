"""What validate remembers about each image file between runs, so that a rerun reads only the
files that changed.

One entry per file (its resolved path): the file's version (``io.file_version``: size,
mtime_ns, ctime_ns, inode), the check it went through (``CHECK_VERSION`` and the pixel limit)
and the outcome: the sha256 of a file that decodes, or why it does not. A file edited, touched
or replaced (a new inode) has another version, so it is read again; so is every file when the
pixel limit changes. Read errors (permission denied, an I/O error) are never remembered: the
next run tries again.

Stored in a folder (``validation/`` in the run directory), as ``io.frame_line`` lines:

- ``record.jsonl``: the snapshot, rewritten atomically (temp + fsync + rename) and only when the
  journals have grown to a share of it (``COMPACT_SHARE``), so a rerun that changes 1 % of the
  files does not rewrite the entries of the other 99 %;
- ``journal-rank<R>-<uuid>.jsonl``: one per rank and validation, append-only, a batch of lines
  per write with an fsync (``FLUSH_LINES`` / ``FLUSH_S``). A validation killed mid-way leaves
  its journal with every batch it flushed (a torn last line fails its checksum and is dropped):
  the next validation reads the journals, so only files no line names are read again.

No two processes write one file and nothing is locked: the folder can live on NFS, shared by
the ranks of a multi-host ``torchrun`` (see ``features/manifest.py`` for what that needs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps's, in C
from pathlib import Path

from samprobe.io import (
    append_journal,
    atomic_open,
    create_journal,
    frame_json,
    framed_lines,
    remove_stale_temps,
)

log = logging.getLogger("samprobe")

# Bump when what a check decides changes (another decoder check, another hash): every file is
# read again once.
CHECK_VERSION = 1
SNAPSHOT = "record.jsonl"
JOURNAL_GLOB = "journal-rank*.jsonl"
FLUSH_LINES = 4096
FLUSH_S = 1.0
# Journals are folded into the snapshot once they hold this share of its bytes: a rerun reads
# at most 1.25x the snapshot's bytes of record, and rewrites it only every few reruns.
COMPACT_SHARE = 0.25


@dataclass(frozen=True, slots=True)  # one per row: 1 M of them
class Outcome:
    """What checking one version of a file found: its sha256, or why it does not decode."""

    sha256: str | None
    reason: str | None


Version = tuple[int, ...]


def version_key(version: dict[str, int]) -> Version:
    """``io.file_version`` as a hashable tuple (fixed field order)."""
    return tuple(version[k] for k in sorted(version))


def stat_version(st: os.stat_result) -> Version:
    """``version_key(io.file_version(st))`` without the dict and the sort (validate takes one per
    row, twice for a file it reads)."""
    return (st.st_ctime_ns, st.st_ino, st.st_mtime_ns, st.st_size)


class CheckRecord:
    """The remembered outcomes of one folder, and this process's journal of new ones.

    ``lookup`` is safe from many threads at once (a read of a dict that no one writes while
    the checks run); ``add`` and ``flush`` are for the one thread that collects results."""

    def __init__(self, folder: Path, *, max_pixels: int, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.check = f"{CHECK_VERSION}:{max_pixels}"
        self._check_json = _json_str(self.check)
        self.rank = rank
        self.entries: dict[str, tuple[Version, Outcome]] = {}
        self.snapshot_bytes = 0
        self.loaded_journals: list[Path] = []
        self._load()
        self.journal: Path | None = None
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._last_flush = time.monotonic()
        # this validation's entries (and other ranks'), as their lines: compaction writes them
        # again without encoding each a second time, and a line (~230 B) is smaller than the
        # (version, outcome) tuples
        self.added: dict[str, bytes] = {}

    # ----------------------------------------------------------------------------- reading

    def _load(self) -> None:
        remove_stale_temps(self.folder)  # a snapshot half-written by a killed compaction
        snapshot = self.folder / SNAPSHOT
        journals = sorted(self.folder.glob(JOURNAL_GLOB)) if self.folder.is_dir() else []
        # snapshot first: a journal line is newer than the snapshot entry for the same file
        for path in ([snapshot] if snapshot.is_file() else []) + journals:
            try:
                data = path.read_bytes()
            except OSError as exc:  # e.g. deleted by a compaction running beside us
                log.debug(f"validate record {path} not read: {exc}")
                continue
            if path == snapshot:
                self.snapshot_bytes = len(data)
            else:
                self.loaded_journals.append(path)
            for obj, _ in framed_lines(data):
                self._take(obj)

    def _take(self, obj: dict) -> None:
        if obj.get("c") != self.check:
            return
        with contextlib.suppress(KeyError, TypeError, ValueError):
            self.entries[str(obj["p"])] = (
                tuple(int(v) for v in obj["v"]),
                Outcome(obj["s"], obj["e"]),
            )

    def lookup(self, file: str, version: Version) -> Outcome | None:
        """The outcome remembered for this version of ``file``, or None: it must be read."""
        entry = self.entries.get(file)
        return entry[1] if entry is not None and entry[0] == version else None

    # ----------------------------------------------------------------------------- writing

    def add(self, file: str, version: Version, outcome: Outcome) -> None:
        """Remember ``outcome`` for this version of ``file`` (journaled in batches)."""
        line = self.added[file] = self._line(file, version, outcome)
        self._pending.append(line)
        if len(self._pending) >= FLUSH_LINES or time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Every added line to this process's journal, fsynced."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.journal = self.folder / f"journal-rank{self.rank}-{uuid.uuid4().hex}.jsonl"
            self._fd = create_journal(self.journal)
        append_journal(self._fd, b"".join(self._pending), self.journal)  # type: ignore[arg-type]
        self._pending.clear()

    def _line(self, file: str, version: Version, outcome: Outcome) -> bytes:
        """``frame_line({"p": file, "v": version, "c": check, "s": sha256, "e": reason})``, the
        same bytes, JSON written by hand: 2.0 us a line instead of 4.5 (one or two a row)."""
        s = "null" if outcome.sha256 is None else _json_str(outcome.sha256)
        e = "null" if outcome.reason is None else _json_str(outcome.reason)
        v = ",".join(map(str, version))
        return frame_json(
            f'{{"p":{_json_str(file)},"v":[{v}],"c":{self._check_json},"s":{s},"e":{e}}}'
        )

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CheckRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def absorb(self, added: Iterable[tuple[str, Version, Outcome]]) -> None:
        """Entries other ranks added (gathered by rank 0 before it compacts)."""
        for file, version, outcome in added:
            self.added[file] = self._line(file, version, outcome)

    def compact(self, files: Iterable[str], journals: Iterable[Path] = ()) -> bool:
        """When the journals have grown past ``COMPACT_SHARE`` of the snapshot: one snapshot of
        the entries of ``files`` (this validation's: entries of files no longer listed are
        dropped), written atomically, then the journals it holds deleted (those loaded at start,
        this process's and ``journals``, the other ranks'). Returns whether it compacted."""
        self.close()
        journals = [*self.loaded_journals, *([self.journal] if self.journal else []), *journals]
        if not journals or _total_size(journals) < COMPACT_SHARE * self.snapshot_bytes:
            return False
        with atomic_open(self.folder / SNAPSHOT, "wb") as f:
            for file in dict.fromkeys(files):
                line = self.added.get(file)
                if line is None and file in self.entries:
                    line = self._line(file, *self.entries[file])
                if line is not None:
                    f.write(line)
        for journal in journals:
            with contextlib.suppress(OSError):
                journal.unlink()
        return True


def _total_size(files: Iterable[Path]) -> int:
    total = 0
    for file in files:
        with contextlib.suppress(OSError):
            total += file.stat().st_size
    return total
