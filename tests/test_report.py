"""report.html: produced by train, updated by evaluate; parses; embeds every plot as a correctly sized PNG."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.digits_run import EMPTY_CLASS, write_digits_project
from samprobe.config import load_config
from samprobe.report import (
    CURVES_SIZE,
    DPI,
    _num,
    confusion_figsize,
    per_class_figsize,
    plot_confusion,
    plot_top_confusions,
    top_confused_pairs,
    write_report,
)

VOID = {"meta", "img", "br", "hr", "link", "input"}


class ReportParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.headings: list[str] = []
        self.cells: list[str] = []
        self.rows_by_class: dict[str, list[str]] = {}
        self._tag: str | None = None
        self._row: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self._stack.append(tag)
        if tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        assert self._stack and self._stack[-1] == tag, (
            f"unbalanced </{tag}> after {self._stack[-3:]}"
        )
        self._stack.pop()
        if tag == "tr" and self._row:
            self.rows_by_class.setdefault(self._row[0], self._row)

    def handle_data(self, data):
        top = self._stack[-1] if self._stack else None
        if top in ("h1", "h2", "h3"):
            self.headings.append(data)
        if top in ("td", "th"):
            self._row.append(data)
            self.cells.append(data)


def parse(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert not p._stack, f"unclosed tags {p._stack}"
    return p


def decode_png(img: dict[str, str]) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix)
    raw = base64.b64decode(img["src"][len(prefix) :], validate=True)
    assert len(raw) > 1000
    im = Image.open(io.BytesIO(raw))
    im.load()
    assert im.format == "PNG"
    return im


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from samprobe.pipeline import run_evaluate, run_extract, run_train, run_validate

    root = tmp_path_factory.mktemp("report")
    cfg = load_config(write_digits_project(root, per_class=8, epochs=6))
    run_validate(cfg, progress=False)
    run_extract(cfg, progress=False)
    run_train(cfg)
    after_train = parse(cfg.run_dir / "report.html")
    metrics = run_evaluate(cfg, cfg.run_dir / "checkpoints" / "best.pt", "test")
    return cfg, after_train, metrics


@pytest.mark.slow
def test_train_writes_a_report_with_curves_and_the_class_table(trained_run):
    _, report, _ = trained_run
    assert [i["data-plot"] for i in report.images] == ["curves"]  # no evaluation yet
    assert {"Data", "Classes", "Final metrics", "Plots"} <= set(report.headings)
    assert report.rows_by_class[EMPTY_CLASS][1] == "not trained"
    assert report.rows_by_class["zero"][1] == "trained"


@pytest.mark.slow
def test_evaluate_updates_the_report_with_every_plot_at_its_figure_size(trained_run):
    cfg, _, metrics = trained_run
    report = parse(cfg.run_dir / "report.html")
    # the rest: gallery thumbnails
    plots = {i["data-plot"]: i for i in report.images if "data-plot" in i}
    assert set(plots) == {"curves", "confusion_matrix", "per_class_f1"}
    n = 4  # three digit classes + the class without images
    expected = {
        "curves": CURVES_SIZE,
        "confusion_matrix": confusion_figsize(n),
        "per_class_f1": per_class_figsize(n),
    }
    for name, img in plots.items():
        im = decode_png(img)
        w_in, h_in = expected[name]
        assert im.size == (round(w_in * DPI), round(h_in * DPI)), name
        assert (int(img["width"]), int(img["height"])) == im.size
        assert np.asarray(im.convert("L")).std() > 5, f"{name} is blank"
        # the embedded image is the one written beside the report
        assert (cfg.run_dir / "plots" / f"{name}.png").read_bytes() == base64.b64decode(
            img["src"].split(",", 1)[1]
        )
    cells = " ".join(report.cells)
    # rounded for people: 3 decimals
    assert "test: accuracy" in cells and _num(metrics["accuracy"]) in cells
    assert len(_num(metrics["accuracy"]).split(".")[-1]) <= 3
    row = report.rows_by_class["one"]
    # class, status, train/val/test counts, scores (the F1 bar has no text)
    assert row[1] == "trained" and len(row) == 6
    assert row[5].startswith("P ") and "F1" in row[5]


@pytest.mark.slow
def test_a_sweep_csv_becomes_a_table(trained_run):
    cfg, _, _ = trained_run
    sweep = cfg.run_dir / "sweep.csv"
    real = sweep.read_bytes()  # the run's own, restored for the other tests
    sweep.write_text(
        "lr,head,val_balanced_accuracy\n0.001,linear,0.91\n0.01,mlp,0.87\n", encoding="utf-8"
    )
    try:
        report = parse(write_report(cfg.run_dir).html)
    finally:
        sweep.write_bytes(real)
        write_report(cfg.run_dir)
    assert "Sweep" in report.headings
    assert "mlp" in report.cells and "0.87" in report.cells


def test_many_classes_get_an_unnamed_matrix_and_a_top_pairs_chart(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    names = [f"species_{i:02d}" for i in range(n)]
    cm = np.diag(rng.integers(5, 20, n))
    cm[3, 7] = 9  # the worst confusion
    cm[10, 2] = 4
    pairs = top_confused_pairs(cm, names, k=5)
    assert pairs[0][:3] == ("species_03", "species_07", 9)
    assert pairs[1][:3] == ("species_10", "species_02", 4)
    assert len(pairs) == 2  # only real confusions
    size = plot_confusion(cm, names, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as im:
        assert im.size == size == (round(confusion_figsize(n)[0] * DPI),) * 2
    size = plot_top_confusions(cm, names, tmp_path / "top.png")
    with Image.open(tmp_path / "top.png") as im:
        assert im.size == size


@pytest.mark.slow
def test_the_sweep_is_an_lr_by_weight_decay_grid_with_the_selected_head_outlined(trained_run):
    cfg, _, _ = trained_run
    html = (cfg.run_dir / "report.html").read_text(encoding="utf-8")
    sweep = (cfg.run_dir / "sweep.csv").read_text(encoding="utf-8").splitlines()
    assert 'class="heat"' in html and html.count('class="selected"') == 1
    lrs = {line.split(",")[1] for line in sweep[1:]}
    assert html.count("<th>lr ") == len(lrs)
    assert html.index('id="summary"') < html.index('id="sweep"')  # the summary comes first


def test_a_10k_image_run_gives_a_report_under_10_mb(tmp_path):
    """10,000 test predictions (half wrong), 5,000 label issues, 3,000 near-duplicate pairs, 10,000
    map points, every one a real photo: the galleries are capped, the report stays small."""
    import csv as csv_mod
    import json

    from skimage import data as skdata

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(skdata.chelsea()).save(photo, quality=90)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "inspect").mkdir()
    n = 10_000
    paths = [f"img_{i:05d}.jpg" for i in range(n)]

    def write(path, header, rows):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv_mod.writer(f)
            w.writerow(header)
            w.writerows(rows)

    write(
        run / "splits.csv",
        ["row", "path", "label", "split", "sha256", "file"],
        [[i, p, f"c{i % 100}", "test", f"{i:064x}", str(photo)] for i, p in enumerate(paths)],
    )
    write(
        run / "eval" / "predictions.csv",
        ["path", "label", "predicted", "score"],
        [[p, f"c{i % 100}", f"c{(i + i % 2) % 100}", 0.5] for i, p in enumerate(paths)],
    )
    write(
        run / "inspect" / "label_issues.csv",
        ["path", "split", "given_label", "suggested_label", "score"],
        [[p, "train", "c1", "c2", 0.01] for p in paths[:5000]],
    )
    write(
        run / "inspect" / "near_duplicates.csv",
        [
            "path_a",
            "split_a",
            "label_a",
            "path_b",
            "split_b",
            "label_b",
            "cosine",
            "group",
            "leakage",
        ],
        [[paths[i], "train", "c1", paths[i + 1], "test", "c1", 0.99, i, True] for i in range(3000)],
    )
    write(
        run / "inspect" / "outliers.csv",
        ["path", "split", "label", "knn_distance", "nearest_path"],
        [[p, "val", "c3", 0.5, paths[0]] for p in paths[:500]],
    )
    rng = np.random.default_rng(0)
    write(
        run / "inspect" / "map2d.csv",
        ["path", "split", "label", "x", "y"],
        [[p, "test", f"c{i % 100}", *rng.normal(size=2).round(4)] for i, p in enumerate(paths)],
    )
    summary = {
        "images": n,
        "label_issues": {
            "scored": n,
            "issues": 5000,
            "folds": 5,
            "out_of_sample_accuracy": 0.5,
            "setting": {"lr": 0.05, "weight_decay": 0.1},
        },
        "near_duplicates": {
            "pairs": 3000,
            "groups": 3000,
            "cosine_threshold": 0.97,
            "within_split": 0,
            "across_splits": 3000,
            "leakage_pairs": 3000,
            "different_labels": 0,
        },
        "outliers": {"count": 500, "neighbours": 5, "threshold": 0.3},
        "most_confused": [],
    }
    (run / "inspect" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    html = write_report(run).html
    assert html.stat().st_size < 10e6
    text = html.read_text(encoding="utf-8")
    # misclassified and label issues
    assert "showing 40 of 5,000" in text and "showing 40 of 5,000" in text
    assert text.count("data:image/jpeg;base64,") >= 120
