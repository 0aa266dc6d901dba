"""The class list (taxonomy) and the label rule: a label names a class, or is its index in the
classes file; one rule per file, never decided row by row.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from samprobe.data.tables import decode_text
from samprobe.errors import DataError

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


def is_blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or str(value).strip() == ""
    )


def label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# ASCII digits only: str.isdigit() takes '²', which int() refuses
_INTEGER = re.compile(r"-?[0-9]{1,18}")


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
    # two classes for one text
    differ = sorted(t for t in as_name & as_index if _as_index(t, taxonomy) != t)
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
        f"data.label_column values read one way as class names ({len(as_name)} of {len(uniq)} "
        f"values fit) "
        f"and another as 0-based indices into data.classes_file ({len(as_index)} fit): e.g. "
        f"{example!r} is {by_name} by name but class {_as_index(example, taxonomy)!r} by index",
        fix="set data.label_type: name (labels are class names) or index (0-based line numbers of "
        "data.classes_file); rows that do not fit the rule are reported as unknown_label",
    )


def resolve_label(
    text: str, taxonomy: list[str], index: dict[str, int], label_type: str = "name"
) -> str | None:
    if label_type == "index":
        return _as_index(text, taxonomy)  # 0-based line of the classes file
    return text if text in index else None
