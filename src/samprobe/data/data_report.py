"""``data_report.json`` and ``bad_rows.csv`` of a validation, and the summary lines the CLI prints."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from samprobe.data.records import PROBLEM_KINDS, SPLITS, Dataset, Problem, Record
from samprobe.io import atomic_open, atomic_write_text
from samprobe.logs import count_of

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
                f"  {reasons[kind]['count']} {text} (e.g. {reasons[kind]['examples'][0]}); see "
                f"data_report.json"
            )
    files = report.get("files")
    if files and files["checked"]:
        lines.append(
            f"  files: {files['read']} read ({files['bytes_read'] / 1e6:.1f} MB)"
            + (
                f", {files['remembered']} unchanged since an earlier validation (not read again)"
                if files["remembered"]
                else ""
            )
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
