"""Metadata -> records, with every row accounted for.

Each input row ends as exactly one of: an ok ``Record``, or a ``Problem`` of one kind
(``PROBLEM_KINDS``). Nothing is dropped silently: problems go to ``bad_rows.csv`` and are
counted in ``data_report.json``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from samprobe.config import DataConfig
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


def _check_image(file: Path, max_pixels: int) -> tuple[str | None, str | None]:
    """(sha256, None) if the file decodes, else (None, reason). JPEGs decode at 1/8 scale:
    every byte is still entropy-decoded, so truncation and corruption are still caught."""
    try:
        data = file.read_bytes()
    except OSError as exc:  # permission denied, a folder, an I/O error
        return None, f"{type(exc).__name__}: {exc}"
    if not data:
        return None, "zero bytes"
    try:
        img = open_image(data, max_pixels)
        if img.format == "JPEG":
            # cheap full-file check
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except ValueError as exc:
        return None, str(exc)
    except Exception as exc:  # PIL raises many types on corrupt files; each is "unreadable"
        return None, f"{type(exc).__name__}: {exc}"
    return sha256_bytes(data), None


def check_workers() -> int:
    """Threads for reading and decoding files during validate: PIL and hashlib release the GIL,
    and files on network disks are latency-bound, so a few more threads than cores help."""
    from samprobe.data.loader import available_cores

    return min(16, 2 * available_cores())  # rank 0 validates alone: all the node's cores


def validate(cfg: DataConfig, progress: bool = False, workers: int | None = None) -> Dataset:
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
    # Cheap checks first (no file reads); rows that pass them get their file read in a pool.
    # row, path, label_s, file, label, split
    pending: list[tuple[int, str, str, Path, str, str | None]] = []
    for i, row in enumerate(rows, start=1):
        if row is None:
            problems.append(Problem(i, "", "", "malformed", "row could not be parsed"))
            continue
        raw_path, raw_label = row.get(cfg.path_column), row.get(cfg.label_column)
        path_s = "" if is_blank(raw_path) else str(raw_path).strip()
        label_s = "" if is_blank(raw_label) else label_text(raw_label)

        def bad(
            kind: str, detail: str, row: int = i, path: str = path_s, label: str = label_s
        ) -> None:
            problems.append(Problem(row, path, label, kind, detail))

        if not path_s:
            bad("bad_path", "empty path")
            continue
        try:
            candidate = image_path(root, path_s)
            resolved = candidate.resolve()
            outside = not resolved.is_relative_to(real_root)
            is_file = not outside and resolved.is_file()
        except (
            OSError,
            RuntimeError,
            ValueError,
        ) as exc:  # symlink loop, name too long, a NUL character
            bad("bad_path", f"{type(exc).__name__}: {exc}")
            continue
        if outside:
            bad("outside_root", f"resolves to {resolved}, outside {real_root}")
            continue
        if not is_file:
            bad("missing", f"no file at {candidate}" + _windows_path_hint(path_s))
            continue
        label = resolve_label(label_s, taxonomy, index, label_type) if label_s else None
        if label is None:
            bad(
                "unknown_label",
                "empty label"
                if not label_s
                else f"{label_s!r} is not in the taxonomy"
                if label_type == "name"
                else f"{label_s!r} is not an index 0..{len(taxonomy) - 1} of data.classes_file "
                f"(data.label_type index)",
            )
            continue
        split = None  # an empty split cell too: assign_splits gives the row a split
        if cfg.split_column and not is_blank(row.get(cfg.split_column)):
            split = str(row.get(cfg.split_column)).strip().lower()
            split = {"validation": "val", "valid": "val", "dev": "val"}.get(split, split)
            if split not in SPLITS:
                bad("bad_split", f"split {split!r} is not one of {', '.join(SPLITS)}")
                continue
        pending.append((i, path_s, label_s, resolved, label, split))

    from tqdm import tqdm

    records: list[Record] = []
    n_workers = workers if workers is not None else check_workers()
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        checks = pool.map(lambda p: _check_image(p[3], cfg.max_pixels), pending)
        # the bar's iterator first, so zip takes its last item (and the bar ends at N/N) before
        # pending runs out
        for (sha, reason), (i, path_s, label_s, resolved, label, split) in zip(
            tqdm(checks, total=len(pending), desc="validate", unit="img", disable=not progress),
            pending,
        ):
            if sha is None:
                problems.append(Problem(i, path_s, label_s, "unreadable", reason or "unreadable"))
            else:
                records.append(Record(i, path_s, str(resolved), label, split, sha))

    records, dup_problems = _resolve_duplicates(records)
    problems.extend(dup_problems)
    problems.sort(key=lambda p: p.row)
    extra: dict[str, Any] = {"label_type": label_type}
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
