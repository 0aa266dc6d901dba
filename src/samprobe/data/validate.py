"""Metadata -> records, with every row accounted for.

Each input row ends as exactly one of: an ok ``Record``, or a ``Problem`` of one kind
(``PROBLEM_KINDS``). Nothing is dropped silently: problems go to ``bad_rows.csv`` and are
counted in ``data_report.json``.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import re
import signal
import stat
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from samprobe.config import DataConfig
from samprobe.data.check_record import CheckRecord, Outcome, Version, stat_version
from samprobe.data.images import open_image
from samprobe.data.records import SPLITS, Dataset, Problem, Record
from samprobe.data.tables import detect_format, folder_classes, folder_ignored_files, read_rows
from samprobe.data.taxonomy import (
    build_taxonomy,
    decide_label_type,
    is_blank,
    label_text,
    read_classes_file,
    resolve_label,
)
from samprobe.errors import ConfigError, DataError
from samprobe.io import sha256_bytes

# ---------------------------------------------------------------------------------------
# validation


_T = TypeVar("_T")
_R = TypeVar("_R")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def image_path(root: Path, path_text: str) -> Path:
    """The file a metadata path names: absolute, or relative to ``root``. Windows separators
    (``zero\\d0000.png``, a table written on Windows) are read as folders when no file has the
    literal name (on Linux and macOS a backslash is an ordinary file-name character)."""
    candidate = Path(path_text) if Path(path_text).is_absolute() else root / path_text
    if "\\" in path_text and not candidate.exists() and not _WINDOWS_DRIVE.match(path_text):
        posix = path_text.replace("\\", "/")
        alternative = Path(posix) if Path(posix).is_absolute() else root / posix
        if alternative.exists():
            return alternative
    return candidate


def _windows_path_hint(path_text: str) -> str:
    if _WINDOWS_DRIVE.match(path_text):
        return (
            " (a Windows absolute path: write paths relative to data.image_root, e.g. "
            f"{path_text[3:].replace(chr(92), '/')!r})"
        )
    return ""


# One per row, pickled in a worker and unpickled here: as a tuple, 256 of them pickle in 1.1 us
# a row and unpickle in 0.7 (a slots dataclass: 7.3 and 4.9; rows like bench/validate.py's).
class FileCheck(NamedTuple):
    """What checking one row's file found: a problem (``kind``, ``detail``), or a file that
    decodes (``kind`` None, ``sha256``). ``source`` says where its bytes' verdict came from:
    "disk" (read now: ``bytes_read``), "record" (remembered for this ``version``), or "" (not
    needed: a path problem, or a row rejected for its label or split). ``fresh``: read now, and
    the outcome may be remembered for ``version``."""

    kind: str | None
    detail: str = ""
    file: str = ""
    sha256: str | None = None
    version: Version | None = None
    source: str = ""
    fresh: bool = False
    bytes_read: int = 0

    def outcome(self) -> Outcome:
        """What to remember for this version of the file."""
        return Outcome(self.sha256, self.detail if self.kind else None)


def _decode_check(data: bytes, max_pixels: int) -> str | None:
    """None if ``data`` decodes, else why not. JPEGs decode at 1/8 scale: every byte is still
    entropy-decoded, so truncation and corruption are still caught."""
    if not data:
        return "zero bytes"
    try:
        img = open_image(data, max_pixels)
        if img.format == "JPEG":
            # cheap full-file check
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except ValueError as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many types on corrupt files; each is "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _read_and_check(file: str, version: Version, max_pixels: int) -> FileCheck:
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            before = stat_version(st)
            data = _read_all(fd, st.st_size)
            # remembered only when the file did not change between the stat and the read
            stable = before == version == stat_version(os.fstat(fd))
        finally:
            os.close(fd)
    except OSError as exc:  # permission denied, an I/O error: not remembered, tried again
        return FileCheck("unreadable", f"{type(exc).__name__}: {exc}", file, source="disk")
    reason = _decode_check(data, max_pixels)
    return FileCheck(
        None if reason is None else "unreadable",
        reason or "",
        file,
        None if reason is not None else sha256_bytes(data),
        version,
        source="disk",
        fresh=stable,
        bytes_read=len(data),
    )


def _read_all(fd: int, size: int) -> bytes:
    """Every byte of the open regular file ``fd`` that fstat says has ``size``: ``os.read``
    without ``open()``'s file objects and isatty check, and one call for a file that is what
    fstat said (a regular file's read returns less than asked only at its end; fewer than
    ``size`` bytes, or more, and it reads on to the end)."""
    first = os.read(fd, size + 1)
    if len(first) == size:
        return first
    parts = [first]
    while parts[-1]:
        parts.append(os.read(fd, max(size, 1 << 16)))
    return b"".join(parts)


class _Locator:
    """Where rows' files are, for many rows: each parent folder resolved once, so that a regular
    file inside the root costs one ``lstat`` instead of ``Path.resolve`` (an ``lstat`` per
    component of the path) and a ``stat``. Anything else (a symlinked or missing file, a path
    outside the root, backslashes, a last part ``..``) returns None: ``check_file`` resolves it
    in full, so every answer is the one ``Path.resolve`` gives."""

    MAX_FOLDERS = 1 << 16  # forgotten all at once past this: memory stays bounded

    def __init__(self, root: Path, real_root: Path) -> None:
        self.root = str(root)
        self.inside = os.path.join(str(real_root), "")  # ends with the separator
        self.folders: dict[str, str | None] = {}

    def find(self, path_s: str) -> tuple[str, os.stat_result] | None:
        """(resolved file, its stat) of a regular file inside the root, else None."""
        if "\\" in path_s or "\0" in path_s:
            return None
        folder, name = os.path.split(os.path.join(self.root, path_s))
        if name in ("", ".", ".."):
            return None
        real = self.folders.get(folder, "")
        if real == "":
            try:
                real = str(Path(folder).resolve())
            except (OSError, RuntimeError, ValueError):  # a loop, a name too long
                real = None
            if len(self.folders) >= self.MAX_FOLDERS:
                self.folders.clear()
            self.folders[folder] = real
        if real is None:
            return None
        file = os.path.join(real, name)
        if not file.startswith(self.inside):
            return None
        try:
            st = os.lstat(file)
        except (OSError, ValueError):
            return None
        return (file, st) if stat.S_ISREG(st.st_mode) else None  # a symlink is resolved in full


def check_file(
    root: Path,
    real_root: Path,
    path_s: str,
    *,
    max_pixels: int,
    read: bool = True,
    record: CheckRecord | None = None,
    locator: _Locator | None = None,
) -> FileCheck:
    """One row's file: its path (``bad_path``, ``outside_root``, ``missing``), then unless
    ``read`` is False (the row has another problem already) its bytes: hashed and decoded, or
    the outcome ``record`` remembers for this version of the file, without reading it.
    ``locator``: one shared by the rows of a validation (the same answers, fewer system calls)."""
    found = locator.find(path_s) if locator is not None else None
    if found is not None:
        return _check_found(*found, read=read, max_pixels=max_pixels, record=record)
    try:
        candidate = image_path(root, path_s)
        resolved = candidate.resolve()
        outside = not resolved.is_relative_to(real_root)
        try:
            st = None if outside else os.stat(resolved)
        except OSError:
            st = None
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, name too long, a NUL
        return FileCheck("bad_path", f"{type(exc).__name__}: {exc}")
    if outside:
        return FileCheck("outside_root", f"resolves to {resolved}, outside {real_root}")
    if st is None or not stat.S_ISREG(st.st_mode):
        return FileCheck("missing", f"no file at {candidate}" + _windows_path_hint(path_s))
    return _check_found(str(resolved), st, read=read, max_pixels=max_pixels, record=record)


def _check_found(
    file: str, st: os.stat_result, *, read: bool, max_pixels: int, record: CheckRecord | None
) -> FileCheck:
    """``check_file`` of a regular file inside the root, resolved (``file``) and stat'ed."""
    if not read:
        return FileCheck(None, file=file)
    version = stat_version(st)
    known = record.lookup(file, version) if record is not None else None
    if known is not None:
        kind = None if known.sha256 is not None else "unreadable"
        return FileCheck(kind, known.reason or "", file, known.sha256, version, source="record")
    return _read_and_check(file, version, max_pixels)


@dataclass
class FileChecks:
    """Every row's ``FileCheck`` (in row order, all ranks), and what it took to make them."""

    results: list[FileCheck]
    files_read: int
    bytes_read: int
    remembered: int

    def summary(self) -> dict[str, int]:
        return {
            "checked": len(self.results),
            "read": self.files_read,
            "bytes_read": self.bytes_read,
            "remembered": self.remembered,
        }


def _bounded_map(
    pool: Executor, fn: Callable[[_T], _R], items: Iterable[_T], ahead: int
) -> Iterator[_R]:
    """``pool.map`` with at most ``ahead`` calls in flight: ``Executor.map`` submits every item at
    once, a future per row (~1 KB each: 1 GB for a 1 M-row file)."""
    window: deque[Future[_R]] = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _check_files(
    cfg: DataConfig,
    root: Path,
    real_root: Path,
    rows: list[tuple[str, bool]],
    *,
    progress: bool,
    workers: int | None,
    record_dir: Path | None,
    rank: int,
    world: int,
    processes: bool | None = None,
) -> FileChecks:
    """``check_file`` of each (path, read) in ``rows``: this rank's share (every ``world``-th
    row) in worker processes (chunks of ``CHUNK_ROWS``; ``processes`` None: when there are two
    chunks or more) or a thread pool, in row order, then gathered from every rank."""
    from tqdm import tqdm

    mine = range(rank, len(rows), world)
    record = CheckRecord(record_dir, max_pixels=cfg.max_pixels, rank=rank) if record_dir else None
    in_processes = len(mine) >= 2 * CHUNK_ROWS if processes is None else processes
    n_workers = max(1, workers if workers is not None else check_workers(in_processes))
    checker = _RowChecker(root, real_root, cfg.max_pixels, record)

    local: list[FileCheck] = []
    with contextlib.ExitStack() as stack:
        if record is not None:
            stack.enter_context(record)
        bar = stack.enter_context(
            tqdm(total=len(mine), desc="validate", unit="img", disable=not progress)
        )
        pool: Executor
        if in_processes:  # each worker holds the record's entries (forked, or sent once)
            ctx = _worker_context()
            # a fork server's children have it as their parent, not this process
            parent = None if ctx.get_start_method() == "forkserver" else os.getpid()
            pool = ProcessPoolExecutor(
                n_workers, mp_context=ctx, initializer=_start_worker, initargs=(parent, checker)
            )
            chunks = (
                [rows[i] for i in mine[a : a + CHUNK_ROWS]] for a in range(0, len(mine), CHUNK_ROWS)
            )
            checks = (
                c
                for chunk in _bounded_map(pool, _check_chunk, chunks, 4 * n_workers)
                for c in chunk
            )
        else:
            pool = ThreadPoolExecutor(max_workers=n_workers)
            checks = _bounded_map(pool, checker.check, (rows[i] for i in mine), 64 * n_workers)
        stack.enter_context(pool)
        for check in checks:
            if check.fresh and record is not None:
                record.add(check.file, check.version, check.outcome())  # type: ignore[arg-type]
            local.append(check)
            if len(local) % 64 == 0:  # the bar moves as often as the eye sees; not once a row
                bar.update(len(local) - bar.n)
        bar.update(len(local) - bar.n)
    # (checks, journal) of every rank; each rank's journal is closed before it is gathered
    gathered: list[Any] = [(local, record.journal if record else None)]
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (local, record.journal if record else None))
    shares = [g[0] for g in gathered]
    if record is not None and rank == 0:
        for share in shares[1:]:
            record.absorb((c.file, c.version, c.outcome()) for c in share if c.fresh)  # type: ignore[misc]
    results: list[FileCheck] = [None] * len(rows)  # type: ignore[list-item]
    for r, share in enumerate(shares):
        results[r::world] = share
    if record is not None and rank == 0:
        others = [g[1] for g in gathered[1:] if g[1] is not None]
        record.compact((c.file for c in results if c.file and c.kind != "missing"), others)
    return FileChecks(
        results,
        files_read=sum(c.source == "disk" for c in results),
        bytes_read=sum(c.bytes_read for c in results),
        remembered=sum(c.source == "record" for c in results),
    )


CHUNK_ROWS = 256
"""Rows a worker process checks per task: the results of one (~200 B each) are one message."""


class _RowChecker:
    """``check_file`` with one validation's settings, for a thread or a worker process."""

    def __init__(
        self, root: Path, real_root: Path, max_pixels: int, record: CheckRecord | None
    ) -> None:
        self.root, self.real_root, self.max_pixels, self.record = (
            root, real_root, max_pixels, record,
        )  # fmt: skip
        self.locator = _Locator(root, real_root)

    def check(self, row: tuple[str, bool]) -> FileCheck:
        path_s, read = row
        return check_file(
            self.root,
            self.real_root,
            path_s,
            max_pixels=self.max_pixels,
            read=read,
            record=self.record,
            locator=self.locator,
        )


_checker: _RowChecker | None = None  # a worker process's, set by _start_worker


def _start_worker(parent: int | None, checker: _RowChecker) -> None:
    """A validation worker process: dies with its parent (Linux: the kernel sends SIGTERM when
    the parent exits, however it exits; elsewhere the pool's own shutdown). ``parent``: the
    validating process's pid, None when a fork server (which exits with it) is the parent."""
    global _checker
    _checker = checker
    # the parent's objects out of this process's collections (which would write to every
    # inherited page: copy-on-write; gc.freeze's documented use), and collections back on
    # (forked while validate paused them)
    gc.freeze()
    gc.enable()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if parent is not None and os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)


def _check_chunk(rows: list[tuple[str, bool]]) -> list[FileCheck]:
    assert _checker is not None
    return [_checker.check(row) for row in rows]


def _worker_context() -> mp.context.BaseContext:
    """fork (the record's entries are inherited, not sent) unless forking is unsafe: after CUDA
    initialised in this process (a forked child cannot use it) a fork server; spawn where fork
    is not available."""
    methods = mp.get_all_start_methods()
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    if "fork" in methods and not cuda:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def check_workers(processes: bool = False) -> int:
    """Workers for reading and decoding files during validate. Processes: one per core of this
    rank (decoding is CPU-bound). Threads: PIL and hashlib release the GIL, and files on
    network disks are latency-bound, so a few more threads than cores help."""
    from samprobe.data.loader import available_cores, default_num_workers

    if processes:
        return default_num_workers()
    return min(16, 2 * available_cores())  # rank 0 validates alone: all the node's cores


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off while validation builds its per-row objects (rows,
    checks, records: none of them in a reference cycle, so reference counting frees them all).
    Each full collection walks every object of the process, torch's ~200 k and every row's: 20 k
    rows of bench/validate.py spent 0.5-0.8 s of 4-7 s in collections. Also a decorator."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@paused_gc()
def validate(
    cfg: DataConfig,
    progress: bool = False,
    workers: int | None = None,
    *,
    record_dir: Path | None = None,
    rank: int = 0,
    world: int = 1,
    processes: bool | None = None,
) -> Dataset:
    """Every row of the metadata as a ``Record`` or a ``Problem``.

    Files are checked in worker processes (``processes`` None: when there are a few hundred or
    more; False: threads of this process), ``workers`` of them (default ``check_workers``).

    With ``record_dir`` the outcome of each file's check is remembered there
    (``check_record``): a rerun reads only files that changed since. Under torchrun (``world``
    > 1, the process group initialised) every rank checks its share of the files and every
    rank returns the same Dataset."""
    rows, encoding = read_rows(cfg)
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.metadata).parent  # type: ignore[arg-type]
    real_root = root.resolve()
    labels_text = [
        label_text(r.get(cfg.label_column))
        for r in rows
        if r is not None and not is_blank(r.get(cfg.label_column))
    ]
    first = next((r for r in rows if r is not None), None)
    for key, column in (
        ("label_column", cfg.label_column),
        ("path_column", cfg.path_column),
        ("split_column", cfg.split_column),
    ):
        if first is not None and column is not None and column not in first:
            raise DataError(
                f"data.{key} {column!r} is not a column of {cfg.metadata}",
                fix=f"set data.{key} to one of: {', '.join(map(str, first))}",
            )
    if cfg.classes_file:
        taxonomy = read_classes_file(Path(cfg.classes_file))
    elif detect_format(cfg) == "folder":  # every class folder, the empty ones too
        taxonomy = build_taxonomy(d.name for d in folder_classes(root))
    else:
        taxonomy = build_taxonomy(labels_text)
    index = {name: i for i, name in enumerate(taxonomy)}
    if cfg.label_type == "index" and not cfg.classes_file:
        raise ConfigError(
            "data.label_type is index but data.classes_file is not set: indices need the class "
            "list",
            fix="set data.classes_file (one class name per line, line 0 = index 0), or "
            "data.label_type: name",
        )
    # Without a classes file the taxonomy is the labels seen: they are names by construction.
    label_type = (
        decide_label_type(labels_text, taxonomy, cfg.label_type) if cfg.classes_file else "name"
    )

    problems: list[Problem] = []
    # Checks without the filesystem first; each row left gets its file checked in a pool (under
    # torchrun: this rank's share). A path problem outranks a label or split problem, which
    # spares the row's read: (row, path, label_s, label, split, label or split problem).
    pending: list[tuple[int, str, str, str | None, str | None, tuple[str, str] | None]] = []
    for i, row in enumerate(rows, start=1):
        if row is None:
            problems.append(Problem(i, "", "", "malformed", "row could not be parsed"))
            continue
        raw_path, raw_label = row.get(cfg.path_column), row.get(cfg.label_column)
        path_s = "" if is_blank(raw_path) else str(raw_path).strip()
        label_s = "" if is_blank(raw_label) else label_text(raw_label)
        if not path_s:
            problems.append(Problem(i, path_s, label_s, "bad_path", "empty path"))
            continue
        label = resolve_label(label_s, taxonomy, index, label_type) if label_s else None
        split = None  # an empty split cell too: assign_splits gives the row a split
        problem = None
        if label is None:
            problem = (
                "unknown_label",
                "empty label"
                if not label_s
                else f"{label_s!r} is not in the taxonomy"
                if label_type == "name"
                else f"{label_s!r} is not an index 0..{len(taxonomy) - 1} of data.classes_file "
                f"(data.label_type index)",
            )
        elif cfg.split_column and not is_blank(row.get(cfg.split_column)):
            split = str(row.get(cfg.split_column)).strip().lower()
            split = {"validation": "val", "valid": "val", "dev": "val"}.get(split, split)
            if split not in SPLITS:
                problem = ("bad_split", f"split {split!r} is not one of {', '.join(SPLITS)}")
        pending.append((i, path_s, label_s, label, split, problem))

    checks = _check_files(
        cfg,
        root,
        real_root,
        [(p[1], p[5] is None) for p in pending],
        progress=progress,
        workers=workers,
        record_dir=record_dir,
        rank=rank,
        world=world,
        processes=processes,
    )
    records: list[Record] = []
    for (i, path_s, label_s, label, split, problem), check in zip(pending, checks.results):
        if check.kind is None and problem is not None:
            problems.append(Problem(i, path_s, label_s, *problem))
        elif check.kind is not None:
            problems.append(Problem(i, path_s, label_s, check.kind, check.detail))
        else:
            records.append(Record(i, path_s, check.file, label, split, check.sha256))  # type: ignore[arg-type]

    records, dup_problems = _resolve_duplicates(records)
    problems.extend(dup_problems)
    problems.sort(key=lambda p: p.row)
    extra: dict[str, Any] = {"label_type": label_type, "files": checks.summary()}
    if detect_format(cfg) == "folder":
        ignored = folder_ignored_files(Path(cfg.image_root))  # type: ignore[arg-type]
        every = [f for files in ignored.values() for f in files]
        extra.update(
            ignored_files=len(every),
            ignored_files_examples=every[:20],
            ignored_by_reason={
                k: {"count": len(v), "examples": v[:5]} for k, v in ignored.items() if v
            },
        )
    return Dataset(
        records,
        problems,
        taxonomy,
        total=len(rows),
        encoding=encoding,
        source=str(cfg.metadata or cfg.image_root),
        extra=extra,
    )


def _resolve_duplicates(records: list[Record]) -> tuple[list[Record], list[Problem]]:
    """Same bytes + same label: keep the first. Same bytes + different labels: keep none."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.sha256].append(r)
    keep: list[Record] = []
    problems: list[Problem] = []
    for group in groups.values():
        labels = {r.label for r in group}
        if len(labels) > 1:
            others = ", ".join(f"row {r.row}={r.label}" for r in group)
            problems.extend(
                Problem(r.row, r.path, r.label, "label_conflict", f"same image bytes: {others}")
                for r in group
            )
            continue
        keep.append(group[0])
        problems.extend(
            Problem(r.row, r.path, r.label, "duplicate", f"same image as row {group[0].row}")
            for r in group[1:]
        )
    keep.sort(key=lambda r: r.row)
    return keep, problems
