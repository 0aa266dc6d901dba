"""Metadata -> records, with every row accounted for.

Each input row ends as exactly one of: an ok ``Record``, or a ``Problem`` of one kind
(``PROBLEM_KINDS``). Nothing is dropped silently: problems go to ``bad_rows.csv`` and are
counted in ``data_report.json``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from samprobe.config import DataConfig
from samprobe.data.images import open_image
from samprobe.errors import ConfigError, DataError
from samprobe.io import atomic_open, atomic_write_text, sha256_bytes
from samprobe.logs import count_of

PROBLEM_KINDS = (
    "bad_path",  # empty / NaN path
    "outside_root",  # resolved path (through .. or a symlink) leaves the image root
    "missing",  # file does not exist
    "unreadable",  # zero bytes, truncated, not an image, over the pixel limit
    "unknown_label",  # empty label, or not in the taxonomy
    "bad_split",  # split column value not train/val/test
    "duplicate",  # same image bytes listed again with the same label
    "label_conflict",  # same image bytes under two different labels
    "malformed",  # the row itself could not be parsed
)
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Record:
    row: int  # 1-based data row in the metadata (folder layout: enumeration order)
    path: str  # as written in the metadata
    file: str  # resolved absolute path
    label: str  # class name in the taxonomy
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
    # .json: a JSON array of rows or JSON lines, both read by the jsonl reader
    return {
        ".csv": "csv",
        ".tsv": "csv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".json": "jsonl",
        ".parquet": "parquet",
    }.get(suffix, "csv")


def check_data_source(cfg: DataConfig) -> None:
    """ConfigError unless the config says where the data is: a metadata table, or an image folder."""
    fmt = detect_format(cfg)
    if cfg.metadata is None and cfg.image_root is None:
        raise ConfigError(
            "neither data.metadata nor data.image_root is set: samprobe does not know where the images are",
            fix="set data.metadata (a csv/jsonl/parquet table) and data.image_root (the folder its paths are "
            "relative to), or data.image_root alone for image_root/<class>/<image> folders",
        )
    if fmt != "folder" and cfg.metadata is None:
        raise ConfigError(
            f"data.format is {fmt} but data.metadata is not set",
            fix=f"set data.metadata to the {fmt} file, or data.format: folder (or auto) to read "
            "data.image_root/<class>/<image>",
        )


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-le'/'-be' when ``raw`` looks like mostly-ASCII UTF-16 (every other byte NUL), else None."""
    if len(raw) < 4 or len(raw) % 2:
        return None
    odd, even = raw[1::2].count(0), raw[0::2].count(0)
    half = len(raw) // 2
    if odd >= 0.9 * half and even < 0.1 * half:
        return "utf-16-le"
    if even >= 0.9 * half and odd < 0.1 * half:
        return "utf-16-be"
    return None


def decode_text(raw: bytes, what: str) -> tuple[str, str]:
    """(text, encoding) of a metadata or classes file: UTF-8 (BOM or not), UTF-16 (Excel's "Unicode
    text" export), else cp1252 / latin-1. DataError naming ``what`` for binary data."""
    encodings: list[str] = []
    if raw.startswith(_UTF16_BOMS):
        encodings.append("utf-16")  # reads the BOM, drops it
    elif b"\x00" in raw:
        guess = _utf16_without_bom(raw)
        if guess is None:
            raise DataError(
                f"{what} holds binary data (NUL bytes), not a text table",
                fix="point it at the csv / jsonl text file (or set data.format: parquet for a parquet file); "
                "re-export the table as CSV (UTF-8) if it came from a spreadsheet",
            )
        encodings.append(guess)
    encodings += ["utf-8-sig", "cp1252"]
    for enc in encodings:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        return text, {"utf-8-sig": "utf-8"}.get(enc, enc)
    return raw.decode("latin-1"), "latin-1"  # never fails: every byte is a character


DELIMITERS = (",", ";", "\t", "|")


def sniff_delimiter(header: str, wanted: list[str], preferred: str = ",") -> str:
    """The delimiter that splits the header line into the wanted column names (European Excel writes
    ';', spreadsheets export tabs), else the one giving most columns, else ``preferred``."""
    splits = {
        d: [f.strip() for f in next(csv.reader([header], delimiter=d), [])]
        for d in (preferred, *DELIMITERS)
    }
    for d, fields in splits.items():
        if all(w in fields for w in wanted):
            return d
    best = max(splits, key=lambda d: len(splits[d]))
    return best if len(splits[best]) > 1 else preferred


def _csv_rows(text: str, path: Path, cfg: DataConfig) -> list[dict[str, Any] | None]:
    header = next((line for line in text.splitlines() if line.strip()), "")
    wanted = [c for c in (cfg.path_column, cfg.label_column) if c]
    delimiter = sniff_delimiter(header, wanted, "\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows: list[dict[str, Any] | None] = []
        for row in reader:
            # a row with more cells than the header puts the rest under the key None: malformed
            rows.append(None if any(str(v).strip() for v in row.get(None) or ()) else row)
        return rows
    except csv.Error as exc:
        raise DataError(
            f"data.metadata {path} is not a readable CSV table (line {reader.line_num}: {exc})",
            fix="re-export it as CSV, or set data.format to its real format (jsonl, parquet)",
        ) from None


def _json_row(obj: Any) -> dict[str, Any] | None:
    """A parsed JSON value as a row: an object whose text can be written back as UTF-8 (JSON's
    ``\\ud800`` escapes give lone surrogates, which no report file could hold), else None."""
    if not isinstance(obj, dict):
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return None
    return obj


def _jsonl_rows(text: str) -> list[dict[str, Any] | None]:
    """JSON lines, or one JSON array of row objects (a .json file)."""
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, and ints over Python's 4300-digit limit
        whole = None
    if isinstance(whole, list):
        return [_json_row(obj) for obj in whole]
    rows: list[dict[str, Any] | None] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(_json_row(json.loads(line)))
        except (ValueError, RecursionError):
            rows.append(None)
    return rows


def read_rows(cfg: DataConfig) -> tuple[list[dict[str, Any] | None], str]:
    """Rows as dicts (``None`` for a row that could not be parsed) and the text encoding used."""
    check_data_source(cfg)
    fmt = detect_format(cfg)
    if fmt == "folder":
        return _folder_rows(cfg), "n/a"
    path = Path(cfg.metadata)  # type: ignore[arg-type]
    if not path.is_file():
        raise DataError(
            f"data.metadata file {path} does not exist",
            fix="fix data.metadata in the config (relative paths are from the config's folder)",
        )
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                "reading parquet metadata needs pyarrow", fix="pip install 'samprobe[parquet]'"
            ) from None
        try:
            return pq.read_table(path).to_pylist(), "parquet"
        except Exception as exc:  # ArrowInvalid and friends: not a usable parquet file
            raise DataError(
                f"data.metadata {path} is not a readable parquet file ({str(exc).splitlines()[0][:200]})",
                fix="re-export the file, or set data.format to its real format",
            ) from None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"data.metadata {path} cannot be read ({exc.strerror or exc})",
            fix="fix the file's permissions",
        ) from None
    text, encoding = decode_text(raw, f"data.metadata {path}")
    return (_jsonl_rows(text) if fmt == "jsonl" else _csv_rows(text, path, cfg)), encoding


def _hidden(path: Path, root: Path) -> bool:
    """A dot-name anywhere below ``root`` (.git, .ipynb_checkpoints, macOS ._x.png resource forks)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def folder_classes(root: Path) -> list[Path]:
    """The class folders of an image_root/<class>/<image> layout: every folder that is not hidden,
    empty ones included (an empty class is still a class of the taxonomy)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_rows(cfg: DataConfig) -> list[dict[str, Any] | None]:
    root = cfg.image_root
    if root is None or not Path(root).is_dir():
        raise DataError(
            f"data.image_root {root} is not a folder",
            fix="set data.image_root to a folder of <class>/<image> files, or set data.metadata",
        )
    rows: list[dict[str, Any] | None] = []
    for class_dir in folder_classes(Path(root)):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f, Path(root)):
                rows.append(
                    {cfg.path_column: str(f.relative_to(root)), cfg.label_column: class_dir.name}
                )
    return rows


def folder_ignored_files(root: Path) -> dict[str, list[str]]:
    """Files of a folder layout that are not read as images, by reason, so that nothing is left
    out silently: images directly in the root (no class folder), other suffixes, hidden entries."""
    out: dict[str, list[str]] = {"top_level_images": [], "not_images": [], "hidden": []}
    for p in sorted(root.iterdir()):
        rel = str(p.relative_to(root))
        if p.name.startswith("."):
            out["hidden"].append(rel + ("/" if p.is_dir() else ""))
        elif p.is_file():
            out["top_level_images" if p.suffix.lower() in IMAGE_SUFFIXES else "not_images"].append(
                rel
            )
    for class_dir in folder_classes(root):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file():
                if _hidden(f, root):
                    out["hidden"].append(str(f.relative_to(root)))
                elif f.suffix.lower() not in IMAGE_SUFFIXES:
                    out["not_images"].append(str(f.relative_to(root)))
    return out


# ---------------------------------------------------------------------------------------
# taxonomy and labels


def read_classes_file(path: Path) -> list[str]:
    """One class name per line; blank lines and lines starting with '#' (comments) are skipped."""
    if not path.is_file():
        raise DataError(
            f"data.classes_file {path} does not exist",
            fix="fix data.classes_file, or set it to null to use the labels seen",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"data.classes_file {path} cannot be read ({exc.strerror or exc})",
            fix="fix the file's permissions",
        ) from None
    text = decode_text(raw, f"data.classes_file {path}")[0]
    names = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise DataError(
            f"data.classes_file {path} lists {dupes[0]!r} twice", fix="keep each class name once"
        )
    return names


def _is_blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or str(value).strip() == ""
    )


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


_INTEGER = re.compile(
    r"-?[0-9]{1,18}"
)  # ASCII digits only: str.isdigit() takes '²', which int() refuses


def _as_int(text: str) -> int | None:
    return int(text) if _INTEGER.fullmatch(text) else None


def build_taxonomy(labels: Iterable[str]) -> list[str]:
    """Labels seen, sorted numerically when all are integers, else alphabetically."""
    uniq = set(labels)
    if uniq and all(_as_int(s) is not None for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def _as_index(text: str, taxonomy: list[str]) -> str | None:
    number = _as_int(text)
    return taxonomy[number] if number is not None and 0 <= number < len(taxonomy) else None


def decide_label_type(labels: list[str], taxonomy: list[str], requested: str = "auto") -> str:
    """ "name" or "index": one rule for every row of the file (never decided row by row, where a
    numeric class name and an index of the same text would mean two classes). Auto reads names
    unless only indices fit; DataError when both readings fit differently or each fits only some rows."""
    if requested != "auto":
        return requested
    names = set(taxonomy)
    uniq = sorted(set(labels))
    as_name = {t for t in uniq if t in names}
    as_index = {t for t in uniq if _as_index(t, taxonomy) is not None}
    differ = sorted(
        t for t in as_name & as_index if _as_index(t, taxonomy) != t
    )  # two classes for one text
    if len(as_name) == len(uniq) and (len(as_index) < len(uniq) or not differ):
        return "name"
    if len(as_index) == len(uniq) and len(as_name) < len(uniq) and not differ:
        return "index"
    name_only, index_only = sorted(as_name - as_index), sorted(as_index - as_name)
    if not differ and not (name_only and index_only):
        return "index" if index_only else "name"  # the rows that fit neither are unknown_label
    example = (differ or index_only)[0]
    by_name = f"class {example!r}" if example in names else "no class"
    raise DataError(
        f"data.label_column values read one way as class names ({len(as_name)} of {len(uniq)} values fit) "
        f"and another as 0-based indices into data.classes_file ({len(as_index)} fit): e.g. {example!r} is "
        f"{by_name} by name but class {_as_index(example, taxonomy)!r} by index",
        fix="set data.label_type: name (labels are class names) or index (0-based line numbers of "
        "data.classes_file); rows that do not fit the rule are reported as unknown_label",
    )


def resolve_label(
    text: str, taxonomy: list[str], index: dict[str, int], label_type: str = "name"
) -> str | None:
    if label_type == "index":
        return _as_index(text, taxonomy)  # 0-based line of the classes file
    return text if text in index else None


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
            img.draft(
                "RGB", (max(1, img.width // 8), max(1, img.height // 8))
            )  # cheap full-file check
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
        _label_text(r.get(cfg.label_column))
        for r in rows
        if r is not None and not _is_blank(r.get(cfg.label_column))
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
            "data.label_type is index but data.classes_file is not set: indices need the class list",
            fix="set data.classes_file (one class name per line, line 0 = index 0), or data.label_type: name",
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
        path_s = "" if _is_blank(raw_path) else str(raw_path).strip()
        label_s = "" if _is_blank(raw_label) else _label_text(raw_label)

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
                else f"{label_s!r} is not an index 0..{len(taxonomy) - 1} of data.classes_file (data.label_type index)",
            )
            continue
        split = None  # an empty split cell too: assign_splits gives the row a split
        if cfg.split_column and not _is_blank(row.get(cfg.split_column)):
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
        # the bar's iterator first, so zip takes its last item (and the bar ends at N/N) before pending runs out
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
        return [
            Record(int(r["row"]), r["path"], r["file"], r["label"], r["split"], r["sha256"])
            for r in csv.DictReader(f)
        ]


def summary_lines(report: dict[str, Any], problems: Iterable[Problem] = ()) -> list[str]:
    """One line for the totals, then one line per problem kind with its first example."""
    lines = [f"{count_of(report['total'], 'row')}: {report['ok']} ok"]
    first: dict[str, Problem] = {}
    for p in problems:
        first.setdefault(p.kind, p)
    for kind in PROBLEM_KINDS:
        if report.get(kind):
            ex = first.get(kind)
            example = f" (first: row {ex.row} {ex.path!r}: {ex.detail})" if ex else ""
            lines.append(f"  {report[kind]} {kind}{example}")
    reasons = report.get("ignored_by_reason") or {}
    for kind, text in (
        (
            "top_level_images",
            "images directly in the image folder have no class folder and were not read; "
            "move them into image_root/<class>/",
        ),
        ("not_images", "files in the image folder are not images by suffix and were not read"),
        ("hidden", "hidden files or folders (names starting with '.') were skipped"),
    ):
        if kind in reasons:
            lines.append(
                f"  {reasons[kind]['count']} {text} (e.g. {reasons[kind]['examples'][0]}); see data_report.json"
            )
    if report.get("label_type"):
        lines.append(
            "  labels read as "
            + (
                "class names"
                if report["label_type"] == "name"
                else "0-based indices into data.classes_file"
            )
            + " (data.label_type)"
        )
    splits = report.get("splits")
    if splits:
        c = splits["counts"]
        lines.append(
            f"  splits: {c['train']} train / {c['val']} val / {c['test']} test, {splits['source']}"
            + (
                f"; {splits['kept']} kept from earlier validations, {splits['new']} new"
                if splits["kept"] + splits["moved"]
                else ""
            )
        )
    if report["classes_without_train_images"]:
        lines.append(
            "  classes with no training images (not trained, never predicted): "
            f"{', '.join(report['classes_without_train_images'])}"
        )
    return lines


def as_dicts(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
