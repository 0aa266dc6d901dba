"""report.html in a real browser (headless Chromium over the DevTools pipe): every image decodes,
nothing is wider than a 1280 px window, the summary numbers are metrics.json's, and a screenshot
is saved (SAMPROBE_SCREENSHOT=PATH keeps a copy). Skips, saying why, where chromium is missing:
`make browser` installs it (CI runs that)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from helpers.browser import DOM_CHECKS, Browser, find_chromium
from helpers.digits_run import write_digits_project
from samprobe.config import load_config
from samprobe.report import eval_dir

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium not installed: run `make browser` (apt-get install chromium) to run the "
        "report's browser test",
    ),
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from samprobe.pipeline import run_evaluate, run_extract, run_inspect, run_train, run_validate
    from samprobe.report import write_run_report

    root = tmp_path_factory.mktemp("browser")
    cfg_path = write_digits_project(root, per_class=14, epochs=30)
    meta = root / "data" / "metadata.csv"
    lines = meta.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].replace(",zero", ",two")  # one flipped label for the label-issue gallery
    lines.append("missing_scan.png,one")  # a bad row
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(cfg_path)
    run_validate(cfg, progress=False)
    run_extract(cfg, progress=False)
    run_train(cfg)
    run_evaluate(cfg, cfg.run_dir / "checkpoints" / "best.pt", "test")
    run_inspect(cfg)
    write_run_report(cfg.run_dir)
    return cfg.run_dir


def test_the_report_renders_in_chromium_within_1280_px_with_metrics_json_numbers(
    full_run, tmp_path
) -> None:
    report = full_run / "report.html"
    assert report.stat().st_size < 10e6
    with Browser(CHROMIUM, width=1280, height=900) as browser:
        browser.open(report)
        dom = browser.evaluate(DOM_CHECKS)
        shot = tmp_path / "report.png"
        browser.screenshot(shot)
    assert dom["images"] >= 5 and dom["broken"] == [], dom["broken"]
    assert dom["scrollWidth"] <= dom["viewport"] == 1280, dom["wide"]
    assert dom["wide"] == []
    assert {
        "summary",
        "sweep",
        "classes",
        "confusion",
        "misclassified",
        "label-issues",
        "near-duplicates",
        "outliers",
        "bad-rows",
        "feature-map",
    } <= set(dom["sections"])
    assert dom["sections"][0] == "summary"

    metrics = json.loads((eval_dir(full_run) / "metrics.json").read_text())
    for key in ("balanced_accuracy", "accuracy", "macro_f1"):
        shown = dom["metrics"][key]
        # the number behind the display is metrics.json's
        assert float(shown["value"]) == metrics[key]
        assert float(shown["shown"]) == round(metrics[key], 3)  # and it is shown rounded for people
    assert int(dom["metrics"]["n"]["shown"]) == metrics["n"]
    summary = json.loads((full_run / "inspect" / "summary.json").read_text())
    assert (
        int(dom["metrics"]["leakage_pairs"]["shown"]) == summary["near_duplicates"]["leakage_pairs"]
    )

    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 900
        assert im.convert("L").getextrema()[0] < 100  # text and plots, not a blank page
    if os.environ.get("SAMPROBE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SAMPROBE_SCREENSHOT"])


def test_the_browser_starts_whatever_numbers_its_pipes_get(tmp_path) -> None:
    """In a long test session the pipe fds are two-digit numbers (dash's redirections take one digit)."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(12)]
    try:
        page = tmp_path / "p.html"
        page.write_text("<!DOCTYPE html><p id=x>ok</p>", encoding="utf-8")
        with Browser(CHROMIUM) as browser:
            browser.open(page)
            assert browser.evaluate("document.getElementById('x').textContent") == "ok"
    finally:
        for fd in held:
            os.close(fd)
