"""Reading metadata tables (csv / jsonl / parquet, any encoding and delimiter) and class-folder
layouts into raw rows: dicts of the file's columns, None for a row that could not be parsed.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any

from samprobe.config import DataConfig
from samprobe.data.records import IMAGE_SUFFIXES
from samprobe.errors import ConfigError, DataError

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
            "neither data.metadata nor data.image_root is set: samprobe does not know where the "
            "images are",
            fix="set data.metadata (a csv/jsonl/parquet table) and data.image_root (the folder "
            "its paths are "
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
                fix="point it at the csv / jsonl text file (or set data.format: parquet for a "
                "parquet file); re-export the table as CSV (UTF-8) if it came from a spreadsheet",
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
                f"data.metadata {path} is not a readable parquet file "
                f"({str(exc).splitlines()[0][:200]})",
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
