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
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from samprobe.inspection import counted
from samprobe.io import atomic_open, atomic_write_text
from samprobe.tracking import Tracker, read_csv_rows, read_jsonl
from samprobe.train.checkpoint import HeadCheckpoint, load_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("samprobe")


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib.pyplot on the Agg backend (no display), imported on first use: at module level it
    was 0.5 s of every command's start (`python -X importtime`), most of which draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 100
CURVES_SIZE = (10.0, 4.0)
MAX_NAMED = 50  # confusion matrices name their classes up to this many; beyond, a top-pairs chart
TOP_PAIRS = 25


def _save(fig: Figure, path: Path) -> tuple[int, int]:
    """Save at DPI; returns the PNG's (width, height) in pixels."""
    w, h = fig.get_size_inches()
    size = (int(round(w * DPI)), int(round(h * DPI)))
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    pyplot().close(fig)
    return size


def confusion_figsize(n: int) -> tuple[float, float]:
    side = min(max(6.0, 0.35 * n + 2), 24.0)
    return side, side


def plot_confusion(
    cm: np.ndarray, names: list[str], path: Path, max_named: int = MAX_NAMED
) -> tuple[int, int]:
    """Row-normalised confusion matrix [n, n] (true rows, predicted columns); names shown up to ``max_named``."""
    n = len(names)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    fig, ax = pyplot().subplots(figsize=confusion_figsize(n), dpi=DPI)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= max_named:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            str(cm[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        "confusion matrix (rows normalised)"
        + ("" if n <= max_named else f", {n} classes: see top confused pairs")
    )
    fig.tight_layout()
    return _save(fig, path)


def top_confused_pairs(
    cm: np.ndarray, names: list[str], k: int = TOP_PAIRS
) -> list[tuple[str, str, int, float]]:
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


def plot_top_confusions(
    cm: np.ndarray, names: list[str], path: Path, k: int = TOP_PAIRS
) -> tuple[int, int]:
    pairs = top_confused_pairs(cm, names, k)
    fig, ax = pyplot().subplots(figsize=(10.0, max(3.0, 0.3 * len(pairs) + 1.5)), dpi=DPI)
    labels = [f"{t} -> {p}" for t, p, _, _ in pairs][::-1]
    ax.barh(range(len(pairs)), [c for _, _, c, _ in pairs][::-1], color="tab:red")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.set_xlabel("samples (true -> predicted)")
    ax.set_title(f"top {len(pairs)} confused class pairs" if pairs else "no confusions")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(rows: list[dict[str, Any]], path: Path) -> tuple[int, int]:
    """Loss (left) and validation metrics (right) per epoch, from metrics.jsonl rows."""
    fig, (ax_loss, ax_metric) = pyplot().subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI)
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
    fig, ax = pyplot().subplots(figsize=per_class_figsize(len(rows)), dpi=DPI)
    f1 = [float(r["f1"]) for r in rows]
    colors = [
        "tab:blue" if str(r["trained"]) in ("True", "true", "1") else "lightgrey" for r in rows
    ]
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

THUMB = 72  # px: gallery thumbnails (tiny scans are enlarged to this, photos shrunk to fit it)
THUMB_QUALITY = 80
# images per gallery: the report stays small (well under 10 MB) whatever the data size
GALLERY_MAX = 40
MAP_SIZE = (8.0, 6.0)


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


def _num(v: Any) -> str:
    """A number for people: 3 significant decimals for scores, thousands separators for counts."""
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.3f}".rstrip("0").rstrip(".")  # 0.870 -> 0.87, 1.000 -> 1
        return f"{v:.2g}"
    return str(v)


def _fmt(v: Any) -> str:
    # a CSV cell: integers (row numbers, counts) as written, decimals rounded
    if isinstance(v, str):
        try:
            return v if v.lstrip("-").isdigit() else _num(float(v))
        except ValueError:
            return v
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return _num(v)


def _table(
    rows: list[dict[str, Any]], columns: list[str] | None = None, empty: str = "(none)"
) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="inactive"' if r.get("status") == "not trained" else ""
        body.append(
            f"<tr{cls}>"
            + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns)
            + "</tr>"
        )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _load_best(run_dir: Path) -> HeadCheckpoint | None:
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        return None
    return load_checkpoint(best)


def class_rows(
    data_report: dict[str, Any], active: set[str] | None, eval_rows: list[dict[str, str]]
) -> list[dict[str, Any]]:
    """One row per taxonomy class: status (trained / not trained), counts per split, eval scores."""
    per_class = data_report.get("per_class", {})
    by_name = {r["class"]: r for r in eval_rows}
    rows = []
    for name in data_report.get("taxonomy", []):
        counts = per_class.get(name, {})
        trained = (name in active) if active is not None else counts.get("train", 0) > 0
        row: dict[str, Any] = {
            "class": name,
            "status": "trained" if trained else "not trained",
            "train": counts.get("train", 0),
            "val": counts.get("val", 0),
            "test": counts.get("test", 0),
        }
        if name in by_name:
            e = by_name[name]
            row.update(
                {
                    "precision": float(e["precision"]),
                    "recall": float(e["recall"]),
                    "f1": float(e["f1"]),
                    "support": int(e["support"]),
                }
            )
        rows.append(row)
    return rows


def eval_dir(run_dir: Path) -> Path:
    """The run's own evaluation: eval/test/, else eval/val/ (per split), else eval/ (one evaluation)."""
    return next(
        (
            run_dir / "eval" / s
            for s in ("test", "val")
            if (run_dir / "eval" / s / "metrics.json").is_file()
        ),
        run_dir / "eval",
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- thumbnails ----------------------------------------------------------------------------


def thumbnail_uri(file: str | Path, size: int = THUMB) -> str | None:
    """A small inline JPEG (data URI) of an image file, or None when it cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(file) as im:
            im = ImageOps.exif_transpose(im)
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            scale = size / max(im.size)
            resample = Image.NEAREST if scale > 1 else Image.BILINEAR  # tiny scans stay crisp
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample
            )
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except Exception:  # unreadable / missing file: the card says so instead of a broken image
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(file: str | None, caption: str, title: str = "") -> str:
    uri = thumbnail_uri(file) if file else None
    pic = (
        f'<img src="{uri}" alt="{html.escape(caption)}" loading="eager">'
        if uri
        else '<div class="noimg">no image</div>'
    )
    return f'<figure title="{html.escape(title)}">{pic}<figcaption>{caption}</figcaption></figure>'


def _gallery(cards: list[str], total: int, empty: str) -> str:
    if not cards:
        return f'<p class="empty">{html.escape(empty)}</p>'
    more = f'<p class="note">showing {len(cards)} of {total:,}</p>' if total > len(cards) else ""
    return f'<div class="gallery">{"".join(cards)}</div>{more}'


# --- sections ------------------------------------------------------------------------------


def _stat(
    label: str, value: Any, key: str | None = None, raw: Any = None, warn: bool = False
) -> str:
    data = f' data-metric="{html.escape(key)}" data-value="{html.escape(str(raw))}"' if key else ""
    cls = "stat warn" if warn else "stat"
    shown = value if isinstance(value, str) else _num(value)
    return (
        f'<div class="{cls}"><div class="v"{data}>{html.escape(shown)}</div>'
        f'<div class="k">{html.escape(label)}</div></div>'
    )


def _summary(
    data_report: dict[str, Any],
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    inspect: dict[str, Any],
) -> str:
    from samprobe.data.records import PROBLEM_KINDS

    stats = []
    if metrics:
        split = metrics.get("split", "test")
        for key, label in (
            ("balanced_accuracy", f"{split} balanced accuracy"),
            ("accuracy", f"{split} accuracy"),
            ("macro_f1", f"{split} macro-F1"),
        ):
            if isinstance(metrics.get(key), (int, float)):
                stats.append(_stat(label, round(float(metrics[key]), 3), key, metrics[key]))
        stats.append(_stat(f"{split} images", int(metrics.get("n", 0)), "n", metrics.get("n")))
    else:
        stats.append(_stat("test balanced accuracy", "not evaluated"))
    if rows:
        active = sum(r["status"] == "trained" for r in rows)
        stats.append(_stat("classes trained", f"{active} of {len(rows)}"))
    dropped = {k: int(data_report[k]) for k in PROBLEM_KINDS if data_report.get(k)}
    if data_report:
        stats.append(_stat("rows dropped", sum(dropped.values()), warn=bool(dropped)))
    if inspect:
        nd, li = inspect["near_duplicates"], inspect["label_issues"]
        stats.append(
            _stat(
                "train/val ↔ test leakage pairs",
                nd["leakage_pairs"],
                "leakage_pairs",
                nd["leakage_pairs"],
                warn=nd["leakage_pairs"] > 0,
            )
        )
        if "issues" in li:
            stats.append(
                _stat(
                    "suspected label errors",
                    li["issues"],
                    "label_issues",
                    li["issues"],
                    warn=li["issues"] > 0,
                )
            )
    lines = []
    untrained = [r["class"] for r in rows if r["status"] == "not trained"]
    if untrained:
        lines.append(f"Not trained (no training images, never predicted): {', '.join(untrained)}.")
    if dropped:
        lines.append(
            "Rows dropped: "
            + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in dropped.items())
            + " (see Bad rows)."
        )
    if not inspect:
        lines.append(
            "Data checks not run yet: <code>samprobe inspect -c CONFIG</code> finds label errors, "
            "near-duplicates, leakage and outliers."
        )
    text = "".join(f"<p>{line}</p>" for line in lines)
    return f'<section id="summary"><h2>Summary</h2><div class="stats">{"".join(stats)}</div>{text}</section>'


def _heat(value: float, lo: float, hi: float) -> str:
    t = 0.0 if hi <= lo else (value - lo) / (hi - lo)
    light = 95 - 55 * t
    return f"background:hsl(210,70%,{light:.0f}%);color:{'#fff' if light < 60 else '#000'}"


def _sweep(sweep: list[dict[str, str]]) -> str:
    """The sweep as an lr x weight-decay grid of the best validation score (selected head outlined)."""
    score_key = next((k for k in sweep[0] if k.startswith("best_") and k != "best_epoch"), None)
    if not score_key or "lr" not in sweep[0] or "weight_decay" not in sweep[0]:
        return '<section id="sweep"><h2>Sweep</h2>' + _table(sweep) + "</section>"
    lrs = sorted({float(r["lr"]) for r in sweep})
    wds = sorted({float(r["weight_decay"]) for r in sweep})
    cell = {(float(r["lr"]), float(r["weight_decay"])): r for r in sweep}
    vals = [float(r[score_key]) for r in sweep if r[score_key] not in ("", "nan")]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    lower_better = score_key == "best_val_loss"
    head = "".join(f"<th>wd {_num(w)}</th>" for w in wds)
    body = []
    for lr in lrs:
        tds = []
        for wd in wds:
            r = cell.get((lr, wd))
            if r is None or r[score_key] in ("", "nan"):
                tds.append("<td>–</td>")
                continue
            v = float(r[score_key])
            style = _heat(hi - v + lo if lower_better else v, lo, hi)
            sel = ' class="selected"' if str(r.get("selected")) in ("True", "true", "1") else ""
            tds.append(
                f'<td{sel} style="{style}" title="{html.escape(r.get("status", ""))}">{_num(v)}'
                f"<small>epoch {html.escape(r.get('best_epoch', ''))}</small></td>"
            )
        body.append(f"<tr><th>lr {_num(lr)}</th>{''.join(tds)}</tr>")
    return (
        f'<section id="sweep"><h2>Sweep</h2><p>{html.escape(score_key.replace("_", " "))} of each '
        f"head (learning rate × weight decay); the selected head is outlined.</p>"
        f'<table class="heat"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></section>'
    )


def _classes(rows: list[dict[str, Any]]) -> str:
    """Per-class counts and F1 as bars (HTML, no image: sharp at any zoom, one row per class)."""
    n_active = sum(r["status"] == "trained" for r in rows)
    out = []
    for r in rows:
        f1 = r.get("f1")
        bar = (
            f'<div class="bar"><span style="width:{100 * f1:.1f}%"></span></div>'
            if isinstance(f1, float)
            else ""
        )
        scores = (
            f"P {_num(r['precision'])} · R {_num(r['recall'])} · F1 {_num(f1)}"
            if isinstance(f1, float)
            else ""
        )
        cls = ' class="inactive"' if r["status"] == "not trained" else ""
        out.append(
            f"<tr{cls}><td>{html.escape(r['class'])}</td><td>{r['status']}</td><td>{_num(r['train'])}</td>"
            f"<td>{_num(r['val'])}</td><td>{_num(r['test'])}</td><td "
            f'class="barcell">{bar}</td><td>{scores}</td></tr>'
        )
    return (
        f'<section id="classes"><h2>Classes</h2><p>{n_active} active of {len(rows)} taxonomy '
        f"classes; classes "
        "without training images are not trained and never predicted (greyed).</p><div "
        'class="scroll"><table>'
        "<thead><tr><th>class</th><th>status</th><th>train</th><th>val</th><th>test</th><th>test "
        f"F1</th><th>scores</th></tr></thead><tbody>{''.join(out)}</tbody></table></div></section>"
    )


def _plot_img(report: Report, name: str) -> str:
    w, h = report.sizes[name]
    data = base64.b64encode(report.plots[name].read_bytes()).decode("ascii")
    return (
        f'<img class="plot" alt="{html.escape(name)}" data-plot="{html.escape(name)}" width="{w}" '
        f'height="{h}" '
        f'src="data:image/png;base64,{data}">'
    )


def plot_feature_map(points: list[dict[str, str]], path: Path) -> tuple[int, int]:
    """The inspect/map2d.csv scatter coloured by class (legend up to 20 classes); test images as crosses."""
    fig, ax = pyplot().subplots(figsize=MAP_SIZE, dpi=DPI)
    labels = sorted({p["label"] for p in points})
    cmap = pyplot().get_cmap("tab20" if len(labels) > 10 else "tab10")
    for n, lab in enumerate(labels):
        for split, marker in (("train", "o"), ("val", "o"), ("test", "x")):
            pts = [
                (float(p["x"]), float(p["y"]))
                for p in points
                if p["label"] == lab and p["split"] == split
            ]
            if pts:
                xy = np.array(pts)
                ax.scatter(
                    xy[:, 0],
                    xy[:, 1],
                    s=8,
                    marker=marker,
                    color=cmap(n % cmap.N),
                    alpha=0.7,
                    label=lab
                    if split == "train"
                    or not any(q["label"] == lab and q["split"] == "train" for q in points)
                    else None,
                    linewidths=0.8,
                )
    if len(labels) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", ncols=2)
    ax.set_title("pooled features, PCA to 2-D (crosses: test)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def _files_by_path(run_dir: Path) -> dict[str, str]:
    """Metadata path -> absolute file, from splits.csv (what the galleries show)."""
    return {r["path"]: r["file"] for r in read_csv_rows(run_dir / "splits.csv")}


def _image_root(run_dir: Path) -> Path | None:
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None
    root = (
        (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {})
        .get("data", {})
        .get("image_root")
    )
    return Path(root) if root else None


def _galleries(run_dir: Path, inspect: dict[str, Any]) -> list[str]:
    files = _files_by_path(run_dir)
    out = []
    esc = html.escape

    preds = read_csv_rows(eval_dir(run_dir) / "predictions.csv")
    wrong = sorted(
        (p for p in preds if p["label"] != p["predicted"]), key=lambda p: -float(p["score"])
    )
    cards = [
        _card(
            files.get(p["path"]),
            f"{esc(p['label'])} → <b>{esc(p['predicted'])}</b> {_num(float(p['score']))}",
            p["path"],
        )
        for p in wrong[:GALLERY_MAX]
    ]
    not_yet = "Not evaluated yet: samprobe evaluate -c CONFIG --checkpoint …"
    empty = "No test image misclassified." if preds else not_yet
    out.append(
        '<section id="misclassified"><h2>Misclassified test images</h2><p>true → predicted, with '
        "the predicted class's probability; most confident mistakes first.</p>"
        + _gallery(cards, len(wrong), empty)
        + "</section>"
    )

    idir = run_dir / "inspect"
    if not inspect:
        return out
    li = inspect["label_issues"]
    issues = read_csv_rows(idir / "label_issues.csv")
    cards = [
        _card(
            files.get(r["path"]),
            f"given {esc(r['given_label'])}<br>looks like <b>{esc(r['suggested_label'])}</b> "
            f"{_num(float(r['score']))}",
            r["path"],
        )
        for r in issues[:GALLERY_MAX]
    ]
    if "skipped" in li:
        empty = f"Label errors not searched: {li['skipped']}."
    else:
        empty = f"No suspected label errors found among {li['scored']:,} train+val images."
    note = (
        ""
        if "skipped" in li
        else f"<p>{li['folds']}-fold cross-fitted probabilities (each image scored by heads that "
        f"never saw it; "
        f"lr {_num(li['setting']['lr'])}, weight decay {_num(li['setting']['weight_decay'])}), "
        f"ranked by "
        f"self-confidence (the given label's probability, shown) by cleanlab. Out-of-sample "
        f"accuracy {_num(li['out_of_sample_accuracy'])}.</p>"
    )
    out.append(
        '<section id="label-issues"><h2>Suspected label errors</h2>'
        + note
        + _gallery(cards, len(issues), empty)
        + "</section>"
    )
    if inspect.get("most_confused"):
        out.append(
            '<section id="confused"><h2>Most confused class pairs</h2><p>given → predicted out of '
            "sample "
            "(train+val).</p>" + _table(inspect["most_confused"]) + "</section>"
        )

    nd = inspect["near_duplicates"]
    dups = read_csv_rows(idir / "near_duplicates.csv")
    dups.sort(key=lambda d: (d["leakage"] != "True", -float(d["cosine"])))
    cards = []
    for d in dups[: GALLERY_MAX // 2]:
        leak = '<b class="leak">LEAK</b> ' if d["leakage"] == "True" else ""
        pair = _card(
            files.get(d["path_a"]), f"{esc(d['split_a'])} · {esc(d['label_a'])}", d["path_a"]
        ) + _card(files.get(d["path_b"]), f"{esc(d['split_b'])} · {esc(d['label_b'])}", d["path_b"])
        cards.append(
            f'<div class="pair">{pair}<div class="pcap">{leak}cosine '
            f"{float(d['cosine']):.3f}</div></div>"
        )
    # summaries written before the margin existed have none
    rule = f"cosine ≥ {_num(nd['cosine_threshold'])}" + (
        f", standing out from their neighbours by ≥ {_num(nd['margin_threshold'])}"
        if "margin_threshold" in nd
        else ""
    )
    empty = f"No near-duplicates (pooled-feature {rule})."
    out.append(
        f'<section id="near-duplicates"><h2>Near-duplicates and split '
        f"leakage</h2><p>{counted(nd['pairs'], 'pair')} in "
        f"{counted(nd['groups'], 'group')} at {rule}: "
        f"{nd['within_split']:,} within a split, "
        f"{nd['across_splits']:,} across splits, <b>{nd['leakage_pairs']:,} train/val ↔ test</b> "
        f"(leakage: the "
        f"test score counts images the head has seen), {nd['different_labels']:,} with different "
        f"labels.</p>" + _gallery(cards, len(dups), empty) + "</section>"
    )

    outl = read_csv_rows(idir / "outliers.csv")
    cards = [
        _card(
            files.get(r["path"]),
            f"{esc(r['label'])} ({esc(r['split'])})<br>kNN distance "
            f"{_num(float(r['knn_distance']))}",
            r["path"],
        )
        for r in outl[:GALLERY_MAX]
    ]
    o = inspect["outliers"]
    out.append(
        f'<section id="outliers"><h2>Outliers</h2><p>Mean cosine distance to the '
        f"{o['neighbours']} nearest images "
        f"above {_num(o['threshold'])} (Q3 + 3 IQR): junk, wrong domain, or rare views.</p>"
        + _gallery(cards, len(outl), "No outliers found.")
        + "</section>"
    )
    return out


def _bad_rows(run_dir: Path) -> str:
    bad = read_csv_rows(run_dir / "bad_rows.csv") + read_csv_rows(run_dir / "extract_failures.csv")
    root = _image_root(run_dir)
    cards = []
    for r in bad[:GALLERY_MAX]:
        file = str(root / r["path"]) if root is not None and r.get("path") else None
        cards.append(
            _card(
                file,
                f"row {html.escape(r['row'])} · "
                f"<b>{html.escape(r['kind'])}</b><br>{html.escape(r['path'])}",
                r.get("detail", ""),
            )
        )
    table = (
        _table(
            [{k: r.get(k) for k in ("row", "path", "label", "kind", "detail")} for r in bad[:200]]
        )
        if bad
        else ""
    )
    return (
        '<section id="bad-rows"><h2>Bad rows</h2><p>Rows left out, with the reason (bad_rows.csv, '
        "extract_failures.csv).</p>"
        + _gallery(cards, len(bad), "No bad rows: every row was used.")
        + table
        + "</section>"
    )


CSS = """*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:16px 20px}h1{font-size:1.5em;margin:.3em 0}h2{margin:1.4em 0 .4em;
border-bottom:1px solid #ddd;padding-bottom:4px}p{max-width:100%;overflow-wrap:anywhere}
code{background:#eee;padding:0 3px}
.meta{color:#777;font-size:.85em;overflow-wrap:anywhere}.stats{display:flex;flex-wrap:wrap;gap:10px}
.stat{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.stat .v{font-size:1.6em;font-weight:600}.stat .k{color:#666;font-size:.85em}
.stat.warn{border-color:#d9822b;background:#fff6ec}
.scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;overflow-wrap:anywhere}th{background:#f0f0f0}
td:first-child{text-align:left}tr.inactive td{color:#999;font-style:italic}
table.heat td{min-width:90px;text-align:center}table.heat td small{display:block;font-size:.7em;opacity:.8}
table.heat td.selected{outline:3px solid #d62728;outline-offset:-3px;font-weight:700}
.barcell{width:220px}.bar{background:#eee;height:12px;width:200px}
.bar span{display:block;height:12px;background:#4a7fbf}
img.plot{max-width:100%;height:auto;display:block;margin:.6em 0}
.gallery{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:110px;background:#fff;border:1px solid #ddd;
border-radius:4px;padding:4px;text-align:center;font-size:.72em;overflow-wrap:anywhere}
figure img{width:72px;height:72px;object-fit:contain;image-rendering:pixelated;display:block;margin:0 auto}
.noimg{width:72px;height:72px;margin:0 auto;background:#eee;color:#999;display:flex;align-items:center;
justify-content:center}
.pair{display:flex;flex-wrap:wrap;gap:2px;border:1px solid #ccc;border-radius:6px;padding:4px;width:234px;
background:#f4f4f4}
.pcap{width:100%;text-align:center;font-size:.8em}.leak{color:#fff;background:#d62728;padding:0 4px;border-radius:3px}
.empty{color:#2a7a2a;font-weight:600}.note{color:#777;font-size:.85em}"""


def write_report(run_dir: Path) -> Report:
    """(Re)build ``run_dir/report.html`` and ``run_dir/plots/*.png`` from the run's files."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    report = Report(run_dir / "report.html")

    data_report = _read_json(run_dir / "data_report.json")
    ckpt = _load_best(run_dir)
    active = None
    if ckpt is not None:
        taxonomy, idx = ckpt.classes["taxonomy"], ckpt.classes["active"]
        active = {taxonomy[i] for i in idx}
    edir = eval_dir(run_dir)
    eval_rows = read_csv_rows(edir / "per_class.csv")
    eval_metrics = _read_json(edir / "metrics.json")
    inspect = _read_json(run_dir / "inspect" / "summary.json")
    rows = class_rows(data_report, active, eval_rows) if data_report else []

    history = read_jsonl(run_dir / "metrics.jsonl")
    if history:
        report.plots["curves"] = plots_dir / "curves.png"
        report.sizes["curves"] = plot_curves(history, report.plots["curves"])
    if (edir / "confusion_matrix.csv").is_file():
        cm, names = read_confusion_csv(edir / "confusion_matrix.csv")
        report.plots["confusion_matrix"] = plots_dir / "confusion_matrix.png"
        report.sizes["confusion_matrix"] = plot_confusion(
            cm, names, report.plots["confusion_matrix"]
        )
        if len(names) > MAX_NAMED:
            report.plots["top_confusions"] = plots_dir / "top_confusions.png"
            report.sizes["top_confusions"] = plot_top_confusions(
                cm, names, report.plots["top_confusions"]
            )
    if eval_rows:
        report.plots["per_class_f1"] = plots_dir / "per_class_f1.png"
        report.sizes["per_class_f1"] = plot_per_class_f1(eval_rows, report.plots["per_class_f1"])
    points = read_csv_rows(run_dir / "inspect" / "map2d.csv")
    if points:
        report.plots["feature_map"] = plots_dir / "feature_map.png"
        report.sizes["feature_map"] = plot_feature_map(points, report.plots["feature_map"])

    sections = [_summary(data_report, eval_metrics, rows, inspect)]
    sweep = read_csv_rows(run_dir / "sweep.csv")
    if sweep:
        sections.append(_sweep(sweep))
    if rows:
        sections.append(_classes(rows))
    if "confusion_matrix" in report.plots:
        sections.append(
            '<section id="confusion"><h2>Confusion matrix</h2>'
            + _plot_img(report, "confusion_matrix")
            + (_plot_img(report, "top_confusions") if "top_confusions" in report.plots else "")
            + "</section>"
        )
    sections += _galleries(run_dir, inspect)
    if data_report:
        sections.append(_bad_rows(run_dir))
    if "feature_map" in report.plots:
        sections.append(
            '<section id="feature-map"><h2>Feature map</h2>'
            + _plot_img(report, "feature_map")
            + "</section>"
        )
    final: list[dict[str, Any]] = []
    if ckpt is not None:
        final += [
            {"metric": f"best epoch {ckpt.epoch}: {k}", "value": v}
            for k, v in ckpt.metrics.items()
            if k != "epoch" and not isinstance(v, (list, dict))
        ]
    if eval_metrics:
        final += [
            {"metric": f"{eval_metrics.get('split', 'eval')}: {k}", "value": v}
            for k, v in eval_metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    if final:
        sections.append(
            '<section id="metrics"><h2>Final metrics</h2>' + _table(final) + "</section>"
        )
    if "curves" in report.plots or "per_class_f1" in report.plots:
        sections.append(
            '<section id="plots"><h2>Plots</h2>'
            + "".join(_plot_img(report, n) for n in ("curves", "per_class_f1") if n in report.plots)
            + "</section>"
        )
    if data_report:
        from samprobe.data.records import PROBLEM_KINDS

        keys = ["source", "total", "ok"] + [k for k in PROBLEM_KINDS if k in data_report]
        sections.append(
            '<section id="data"><h2>Data</h2>'
            + _table([{"field": k, "value": data_report[k]} for k in keys])
            + "</section>"
        )

    title = f"samprobe report: {run_dir.name}"
    doc = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width"><title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>'
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(str(run_dir))} &middot; '
        f"generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>" + "".join(sections) + "</main></body></html>"
    )
    atomic_write_text(report.html, doc)
    return report


def write_run_report(run_dir: Path, tracker: Tracker | None = None) -> None:
    """``write_report`` for a stage that just finished: a plotting failure is logged, never fatal
    to the stage (matplotlib or font trouble must not lose a finished training run); ``tracker``
    gets the sweep table and the plots."""
    try:
        report = write_report(run_dir)
    except Exception as exc:
        log.warning(
            f"report: could not write {run_dir / 'report.html'} ({type(exc).__name__}: {exc})"
        )
        return
    log.info(f"report: {report.html}")
    if tracker is not None:
        sweep = read_csv_rows(run_dir / "sweep.csv")
        if sweep:
            tracker.log_table("sweep", sweep)
        tracker.log_images({f"plots/{k}": p for k, p in report.plots.items()})
