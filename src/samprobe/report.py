"""Plots (matplotlib Agg, no display) and the self-contained ``report.html`` of a run.

Every plot is drawn at an explicit size and dpi and saved without tight bounding boxes, so a
PNG is exactly ``figsize * DPI`` pixels. The report reads only files of the run directory
(data_report.json, metrics.jsonl, checkpoints/best.pt, sweep.csv, eval/), so it can be rebuilt
at any time: train writes it, evaluate updates it.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from samprobe.io import atomic_open, atomic_write_text  # noqa: E402
from samprobe.tracking import read_csv_rows, read_jsonl  # noqa: E402

DPI = 100
CURVES_SIZE = (10.0, 4.0)
MAX_NAMED = 50  # confusion matrices name their classes up to this many; beyond, a top-pairs chart
TOP_PAIRS = 25


def _save(fig: plt.Figure, path: Path) -> tuple[int, int]:
    """Save at DPI; returns the PNG's (width, height) in pixels."""
    w, h = fig.get_size_inches()
    size = (int(round(w * DPI)), int(round(h * DPI)))
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)
    return size


def confusion_figsize(n: int) -> tuple[float, float]:
    side = min(max(6.0, 0.35 * n + 2), 24.0)
    return side, side


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, max_named: int = MAX_NAMED) -> tuple[int, int]:
    """Row-normalised confusion matrix [n, n] (true rows, predicted columns); names shown up to ``max_named``."""
    n = len(names)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=confusion_figsize(n), dpi=DPI)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= max_named:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)" + ("" if n <= max_named else f", {n} classes: see top confused pairs"))
    fig.tight_layout()
    return _save(fig, path)


def top_confused_pairs(cm: np.ndarray, names: list[str], k: int = TOP_PAIRS) -> list[tuple[str, str, int, float]]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    rows = cm.sum(1)
    pairs = []
    for idx in flat:
        i, j = divmod(int(idx), cm.shape[1])
        if off[i, j] == 0:
            break
        pairs.append((names[i], names[j], int(off[i, j]), float(off[i, j] / rows[i])))
    return pairs


def plot_top_confusions(cm: np.ndarray, names: list[str], path: Path, k: int = TOP_PAIRS) -> tuple[int, int]:
    pairs = top_confused_pairs(cm, names, k)
    fig, ax = plt.subplots(figsize=(10.0, max(3.0, 0.3 * len(pairs) + 1.5)), dpi=DPI)
    labels = [f"{t} -> {p}" for t, p, _, _ in pairs][::-1]
    ax.barh(range(len(pairs)), [c for _, _, c, _ in pairs][::-1], color="tab:red")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.set_xlabel("samples (true -> predicted)")
    ax.set_title(f"top {len(pairs)} confused class pairs" if pairs else "no confusions")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> tuple[int, int]:
    """Loss (left) and validation metrics (right) per epoch, from metrics.jsonl rows."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI)
    epochs = [r["epoch"] for r in rows]
    for key in ("train_loss", "val_loss"):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax_loss.plot(epochs, [np.nan if y is None else y for y in ys], label=key)
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1"):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax_metric.plot(epochs, [np.nan if y is None else y for y in ys], label=key)
    ax_loss.set_title("loss")
    ax_metric.set_title("validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def per_class_figsize(n: int) -> tuple[float, float]:
    return min(max(6.0, 0.3 * n + 2), 30.0), 4.0


def plot_per_class_f1(rows: list[dict[str, Any]], path: Path) -> tuple[int, int]:
    """F1 per taxonomy class (eval/per_class.csv rows); untrained classes grey."""
    fig, ax = plt.subplots(figsize=per_class_figsize(len(rows)), dpi=DPI)
    f1 = [float(r["f1"]) for r in rows]
    colors = ["tab:blue" if str(r["trained"]) in ("True", "true", "1") else "lightgrey" for r in rows]
    ax.bar(range(len(rows)), f1, color=colors)
    if len(rows) <= 80:
        ax.set_xticks(range(len(rows)), [r["class"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("per-class F1 (grey: not trained, no training images)")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# report.html


@dataclass
class Report:
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def read_confusion_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64), names


def write_confusion_csv(cm: np.ndarray, names: list[str], path: Path) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *names])
        for name, row in zip(names, cm.tolist()):
            w.writerow([name, *row])


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="inactive"' if r.get("status") == "not trained" else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _load_best(run_dir: Path) -> dict[str, Any] | None:
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        return None
    from samprobe.train.checkpoint import load_checkpoint

    return load_checkpoint(best)


def class_rows(data_report: dict[str, Any], active: set[str] | None, eval_rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One row per taxonomy class: status (trained / not trained), counts per split, eval scores."""
    per_class = data_report.get("per_class", {})
    by_name = {r["class"]: r for r in eval_rows}
    rows = []
    for name in data_report.get("taxonomy", []):
        counts = per_class.get(name, {})
        trained = (name in active) if active is not None else counts.get("train", 0) > 0
        row: dict[str, Any] = {"class": name, "status": "trained" if trained else "not trained",
                               "train": counts.get("train", 0), "val": counts.get("val", 0), "test": counts.get("test", 0)}
        if name in by_name:
            e = by_name[name]
            row.update({"precision": float(e["precision"]), "recall": float(e["recall"]), "f1": float(e["f1"]),
                        "support": int(e["support"])})
        rows.append(row)
    return rows


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
tr.inactive td{color:#999;font-style:italic}img{max-width:100%;height:auto;display:block;margin:1em 0}"""


def write_report(run_dir: Path) -> Report:
    """(Re)build ``run_dir/report.html`` and ``run_dir/plots/*.png`` from the run's files."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    report = Report(run_dir / "report.html")
    sections: list[str] = []

    data_report = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8")) if (run_dir / "data_report.json").is_file() else {}
    ckpt = _load_best(run_dir)
    active = None
    if ckpt is not None:
        taxonomy, idx = ckpt["classes"]["taxonomy"], ckpt["classes"]["active"]
        active = {taxonomy[i] for i in idx}
    # The run's own best.pt: its test evaluation, else its val one (other checkpoints' evaluations
    # live in eval/<split>-<name>/ and are not this run's result).
    eval_dir = next((run_dir / "eval" / s for s in ("test", "val") if (run_dir / "eval" / s / "metrics.json").is_file()),
                    run_dir / "eval" / "test")
    eval_rows = read_csv_rows(eval_dir / "per_class.csv")
    eval_metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8")) if (eval_dir / "metrics.json").is_file() else None

    if data_report:
        from samprobe.data.metadata import PROBLEM_KINDS

        keys = ["source", "total", "ok"] + [k for k in PROBLEM_KINDS if k in data_report]
        summary = [{"field": k, "value": data_report[k]} for k in keys]
        summary.append({"field": "classes_without_train_images", "value": data_report.get("classes_without_train_images", [])})
        sections.append("<h2>Data</h2>" + _table(summary))
        rows = class_rows(data_report, active, eval_rows)
        n_active = sum(r["status"] == "trained" for r in rows)
        sections.append(f"<h2>Classes</h2><p>{n_active} active of {len(rows)} taxonomy classes; classes without training "
                        "images are not trained and never predicted (greyed).</p>" + _table(rows))

    sweep = read_csv_rows(run_dir / "sweep.csv")
    if sweep:
        sections.append("<h2>Sweep</h2>" + _table(sweep))

    final: list[dict[str, Any]] = []
    if ckpt is not None:
        final += [{"metric": f"best epoch {ckpt['epoch']}: {k}", "value": v} for k, v in ckpt["metrics"].items() if k != "epoch"]
    if eval_metrics:
        final += [{"metric": f"{eval_metrics.get('split', 'eval')}: {k}", "value": v} for k, v in eval_metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if final:
        sections.append("<h2>Final metrics</h2>" + _table(final))

    history = read_jsonl(run_dir / "metrics.jsonl")
    if history:
        report.plots["curves"] = plots_dir / "curves.png"
        report.sizes["curves"] = plot_curves(history, report.plots["curves"])
    if (eval_dir / "confusion_matrix.csv").is_file():
        cm, names = read_confusion_csv(eval_dir / "confusion_matrix.csv")
        report.plots["confusion_matrix"] = plots_dir / "confusion_matrix.png"
        report.sizes["confusion_matrix"] = plot_confusion(cm, names, report.plots["confusion_matrix"])
        if len(names) > MAX_NAMED:
            report.plots["top_confusions"] = plots_dir / "top_confusions.png"
            report.sizes["top_confusions"] = plot_top_confusions(cm, names, report.plots["top_confusions"])
    if eval_rows:
        report.plots["per_class_f1"] = plots_dir / "per_class_f1.png"
        report.sizes["per_class_f1"] = plot_per_class_f1(eval_rows, report.plots["per_class_f1"])
    if report.plots:
        imgs = []
        for name, path in report.plots.items():
            w, h = report.sizes[name]
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            imgs.append(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" data-plot="{html.escape(name)}" '
                        f'width="{w}" height="{h}" src="data:image/png;base64,{data}">')
        sections.append("<h2>Plots</h2>" + "".join(imgs))

    title = f"samprobe report: {run_dir.name}"
    doc = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{CSS}</style></head>"
           f"<body><h1>{html.escape(title)}</h1><p>{html.escape(str(run_dir))} &middot; generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
           + "".join(sections) + "</body></html>")
    atomic_write_text(report.html, doc)
    return report
