"""Metadata -> records, with every row accounted for.

Each input row ends as exactly one of: an ok ``Record``, or a ``Problem`` of one kind
(``PROBLEM_KINDS``). Nothing is dropped silently: problems go to ``bad_rows.csv`` and are
counted in ``data_report.json``.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


from samprobe.config import DataConfig
from samprobe.data.images import open_image
from samprobe.errors import ConfigError, DataError
from samprobe.io import atomic_open, atomic_write_text, sha256_bytes

PROBLEM_KINDS = (
    "bad_path",        # empty / NaN path
    "outside_root",    # resolved path (through .. or a symlink) leaves the image root
    "missing",         # file does not exist
    "unreadable",      # zero bytes, truncated, not an image, over the pixel limit
    "unknown_label",   # empty label, or not in the taxonomy
    "bad_split",       # split column value not train/val/test
    "duplicate",       # same image bytes listed again with the same label
    "label_conflict",  # same image bytes under two different labels
    "malformed",       # the row itself could not be parsed
)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Record:
    row: int          # 1-based data row in the metadata (folder layout: enumeration order)
    path: str         # as written in the metadata
    file: str         # resolved absolute path
    label: str        # class name in the taxonomy
    split: str | None
    sha256: str


@dataclass(frozen=True)
class Problem:
    row: int
    path: str
    label: str
    kind: str
    detail: str


@dataclass
class Dataset:
    records: list[Record]
    problems: list[Problem]
    taxonomy: list[str]
    total: int
    encoding: str = "utf-8"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = Counter(p.kind for p in self.problems)
        return {k: c.get(k, 0) for k in PROBLEM_KINDS}


# ---------------------------------------------------------------------------------------
# reading tables


def detect_format(cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.metadata is None:
        return "folder"
    suffix = Path(cfg.metadata).suffix.lower()
    return {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(suffix, "csv")


def _decode_text(raw: bytes) -> tuple[str, str]:
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc), "utf-8" if enc == "utf-8-sig" else enc
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "latin-1"  # never fails: every byte is a character


def read_rows(cfg: DataConfig) -> tuple[list[dict[str, Any] | None], str]:
    """Rows as dicts (``None`` for a row that could not be parsed) and the text encoding used."""
    fmt = detect_format(cfg)
    if fmt == "folder":
        return _folder_rows(cfg), "n/a"
    path = Path(cfg.metadata)  # type: ignore[arg-type]
    if not path.is_file():
        raise DataError(f"data.metadata file {path} does not exist", fix="fix data.metadata in the config (relative paths are from the config's folder)")
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading parquet metadata needs pyarrow", fix="pip install 'samprobe[parquet]'") from None
        try:
            return pq.read_table(path).to_pylist(), "parquet"
        except Exception as exc:  # ArrowInvalid and friends: not a usable parquet file
            raise DataError(f"data.metadata {path} is not a readable parquet file ({str(exc).splitlines()[0][:200]})",
                            fix="re-export the file, or set data.format to its real format") from None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.metadata {path} cannot be read ({exc.strerror or exc})", fix="fix the file's permissions") from None
    text, encoding = _decode_text(raw)
    if fmt == "jsonl":
        rows: list[dict[str, Any] | None] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(obj if isinstance(obj, dict) else None)
            except json.JSONDecodeError:
                rows.append(None)
        return rows, encoding
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    return list(csv.DictReader(io.StringIO(text), dialect=dialect)), encoding


def _folder_rows(cfg: DataConfig) -> list[dict[str, Any] | None]:
    root = cfg.image_root
    if root is None or not Path(root).is_dir():
        raise DataError(f"data.image_root {root} is not a folder", fix="set data.image_root to a folder of <class>/<image> files, or set data.metadata")
    rows: list[dict[str, Any] | None] = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({cfg.path_column: str(f.relative_to(root)), cfg.label_column: class_dir.name})
    return rows


def folder_ignored_files(root: Path) -> list[str]:
    """Files of a folder layout that are not read as images (other suffixes, files directly in
    the root): listed in the report so that nothing is left out silently."""
    out = [str(p.relative_to(root)) for p in sorted(root.iterdir()) if p.is_file()]
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        out += [str(f.relative_to(root)) for f in sorted(class_dir.rglob("*"))
                if f.is_file() and f.suffix.lower() not in IMAGE_SUFFIXES]
    return out


# ---------------------------------------------------------------------------------------
# taxonomy and labels


def read_classes_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"data.classes_file {path} does not exist", fix="fix data.classes_file, or set it to null to use the labels seen")
    names = [line.strip() for line in _decode_text(path.read_bytes())[0].splitlines() if line.strip()]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise DataError(f"data.classes_file {path} lists {dupes[0]!r} twice", fix="keep each class name once")
    return names


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def build_taxonomy(labels: Iterable[str]) -> list[str]:
    """Labels seen, sorted numerically when all are integers, else alphabetically."""
    uniq = set(labels)
    if uniq and all(s.lstrip("-").isdigit() for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def resolve_label(text: str, taxonomy: list[str], index: dict[str, int]) -> str | None:
    if text in index:
        return text
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(taxonomy):
        return taxonomy[int(text)]  # integer index into the classes file
    return None


# ---------------------------------------------------------------------------------------
# validation


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
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))  # cheap full-file check
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
    labels_text = [_label_text(r.get(cfg.label_column)) for r in rows if r is not None and not _is_blank(r.get(cfg.label_column))]
    first = next((r for r in rows if r is not None), None)
    for key, column in (("label_column", cfg.label_column), ("path_column", cfg.path_column),
                        ("split_column", cfg.split_column)):
        if first is not None and column is not None and column not in first:
            raise DataError(f"data.{key} {column!r} is not a column of {cfg.metadata}",
                            fix=f"set data.{key} to one of: {', '.join(map(str, first))}")
    taxonomy = read_classes_file(Path(cfg.classes_file)) if cfg.classes_file else build_taxonomy(labels_text)
    index = {name: i for i, name in enumerate(taxonomy)}

    problems: list[Problem] = []
    # Cheap checks first (no file reads); rows that pass them get their file read in a pool.
    pending: list[tuple[int, str, str, Path, str, str | None]] = []  # row, path, label_s, file, label, split
    for i, row in enumerate(rows, start=1):
        if row is None:
            problems.append(Problem(i, "", "", "malformed", "row could not be parsed"))
            continue
        raw_path, raw_label = row.get(cfg.path_column), row.get(cfg.label_column)
        path_s = "" if _is_blank(raw_path) else str(raw_path).strip()
        label_s = "" if _is_blank(raw_label) else _label_text(raw_label)

        def bad(kind: str, detail: str) -> None:
            problems.append(Problem(i, path_s, label_s, kind, detail))

        if not path_s:
            bad("bad_path", "empty path")
            continue
        candidate = Path(path_s) if Path(path_s).is_absolute() else root / path_s
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loop, path too long
            bad("bad_path", f"{type(exc).__name__}: {exc}")
            continue
        if not resolved.is_relative_to(real_root):
            bad("outside_root", f"resolves to {resolved}, outside {real_root}")
            continue
        if not resolved.is_file():
            bad("missing", f"no file at {candidate}")
            continue
        label = resolve_label(label_s, taxonomy, index) if label_s else None
        if label is None:
            bad("unknown_label", "empty label" if not label_s else f"{label_s!r} is not in the taxonomy")
            continue
        split = None
        if cfg.split_column:
            split = "" if _is_blank(row.get(cfg.split_column)) else str(row.get(cfg.split_column)).strip().lower()
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
        for (i, path_s, label_s, resolved, label, split), (sha, reason) in zip(
                pending, tqdm(checks, total=len(pending), desc="validate", unit="img", disable=not progress)):
            if sha is None:
                problems.append(Problem(i, path_s, label_s, "unreadable", reason or "unreadable"))
            else:
                records.append(Record(i, path_s, str(resolved), label, split, sha))

    records, dup_problems = _resolve_duplicates(records)
    problems.extend(dup_problems)
    problems.sort(key=lambda p: p.row)
    extra: dict[str, Any] = {}
    if detect_format(cfg) == "folder":
        ignored = folder_ignored_files(Path(cfg.image_root))  # type: ignore[arg-type]
        extra = {"ignored_files": len(ignored), "ignored_files_examples": ignored[:20]}
    return Dataset(records, problems, taxonomy, total=len(rows), encoding=encoding,
                   source=str(cfg.metadata or cfg.image_root), extra=extra)


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
            problems.extend(Problem(r.row, r.path, r.label, "label_conflict", f"same image bytes: {others}") for r in group)
            continue
        keep.append(group[0])
        problems.extend(Problem(r.row, r.path, r.label, "duplicate", f"same image as row {group[0].row}") for r in group[1:])
    keep.sort(key=lambda r: r.row)
    return keep, problems


# ---------------------------------------------------------------------------------------
# outputs


def class_counts(records: Iterable[Record], taxonomy: list[str]) -> dict[str, dict[str, int]]:
    counts = {name: {s: 0 for s in SPLITS} for name in taxonomy}
    for r in records:
        counts[r.label][r.split or "train"] += 1
    return counts


def write_report(ds: Dataset, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    per_class = class_counts(ds.records, ds.taxonomy)
    report = {
        "source": ds.source,
        "encoding": ds.encoding,
        "total": ds.total,
        "ok": len(ds.records),
        **ds.counts(),
        "taxonomy": ds.taxonomy,
        "classes_without_train_images": [c for c, n in per_class.items() if n["train"] == 0],
        "per_class": per_class,
        **ds.extra,
    }
    assert report["ok"] + len(ds.problems) == ds.total, "every row is either ok or one problem"
    atomic_write_text(run_dir / "data_report.json", json.dumps(report, indent=2))
    with atomic_open(run_dir / "bad_rows.csv", "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label", "kind", "detail"])
        for p in ds.problems:
            w.writerow([p.row, p.path, p.label, p.kind, p.detail])
    return report


def write_splits(records: list[Record], path: Path) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label", "split", "sha256", "file"])
        for r in records:
            w.writerow([r.row, r.path, r.label, r.split, r.sha256, r.file])


def read_splits(path: Path) -> list[Record]:
    if not path.is_file():
        raise DataError(f"{path} does not exist", fix="run `samprobe validate -c CONFIG` first")
    with open(path, encoding="utf-8", newline="") as f:
        return [Record(int(r["row"]), r["path"], r["file"], r["label"], r["split"], r["sha256"]) for r in csv.DictReader(f)]


def summary_lines(report: dict[str, Any], problems: Iterable[Problem] = ()) -> list[str]:
    """One line for the totals, then one line per problem kind with its first example."""
    lines = [f"{report['total']} rows: {report['ok']} ok"]
    first: dict[str, Problem] = {}
    for p in problems:
        first.setdefault(p.kind, p)
    for kind in PROBLEM_KINDS:
        if report.get(kind):
            ex = first.get(kind)
            example = f" (first: row {ex.row} {ex.path!r}: {ex.detail})" if ex else ""
            lines.append(f"  {report[kind]} {kind}{example}")
    if report.get("ignored_files"):
        lines.append(f"  {report['ignored_files']} files in the image folder are not images by suffix and were not read "
                     f"(e.g. {report['ignored_files_examples'][0]}); see data_report.json")
    if report["classes_without_train_images"]:
        lines.append(f"  classes with no training images (not trained, never predicted): {', '.join(report['classes_without_train_images'])}")
    return lines


def as_dicts(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
