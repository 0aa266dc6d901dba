"""samprobe inspect: cross-fitted label issues, exhaustive near-duplicates with split leakage,
outliers; on real digit scans with known flipped labels and planted copies, and the edge cases
(no val split, one class, a one-image class, identical images, nothing found)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import write_config
from samprobe.cli import main
from samprobe.config import TrainConfig, load_config
from samprobe.inspection import (
    cross_fit,
    duplicate_groups,
    duplicate_pairs,
    fold_assignment,
    is_leak,
    nearest_neighbours,
)
from samprobe.train.classes import class_weights

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow

NAMES = ["zero", "one", "two", "three"]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _png(grey: np.ndarray, path: Path, tag: str = "") -> None:
    """Same pixels, distinct bytes per ``tag`` (validate drops byte-identical files as duplicates)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("copy", tag)
    Image.fromarray(grey, mode="L").save(path, pnginfo=info)


def write_project(
    root: Path, rows: list[tuple[np.ndarray, str, str | None]], **config: dict
) -> Path:
    """images + metadata (path, label[, split]) + samprobe.yaml (efficientnet_lite0 at 64 px); returns the config."""
    images = root / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with_split = any(s is not None for _, _, s in rows)
    lines = ["path,label" + (",split" if with_split else "")]
    for n, (grey, label, split) in enumerate(rows):
        _png(grey, images / f"im_{n:03d}.png", tag=str(n))
        lines.append(f"im_{n:03d}.png,{label}" + (f",{split}" if with_split else ""))
    (root / "data" / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if with_split:
        config["data"] = {**config.get("data", {}), "split_column": "split"}
    return write_config(
        root / "samprobe.yaml",
        backbone={"name": "efficientnet_lite0", "img_size": 64},
        train={"epochs": 60, "patience": 10},
        **config,
    )


def digit_scans(classes: range, per_class: int, offset: int = 0) -> list[tuple[np.ndarray, int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for c in classes:
        for i in np.flatnonzero(d.target == c)[offset : offset + per_class]:
            out.append((np.clip(np.rint(d.images[i] * 255 / 16), 0, 255).astype(np.uint8), c))
    return out


def run(cfg_path: Path) -> tuple[Path, dict]:
    for cmd in ("validate", "extract", "inspect"):
        assert main([cmd, "-c", str(cfg_path)]) == 0, cmd
    run_dir = load_config(cfg_path).run_dir
    return run_dir, json.loads((run_dir / "inspect" / "summary.json").read_text())


# --- the parts ----------------------------------------------------------------------------


def test_exhaustive_neighbours_equal_brute_force_in_fp32_and_after_bf16_screening() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    x[250:] = x[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)  # planted near-copies
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    want_idx = np.argsort(-s, axis=1, kind="stable")[:, :4]
    want_sim = np.take_along_axis(s, want_idx, 1)
    for dtype in (torch.float32, torch.bfloat16):
        sims, idx = nearest_neighbours(x, 4, dtype=dtype, block=64)  # several blocks
        np.testing.assert_array_equal(idx[:, 0], want_idx[:, 0])
        tol = 8 * np.finfo(np.float32).eps * 32  # fp32 dot of 32 unit-scale terms
        # re-scored in fp32: exact, not bf16-rounded
        np.testing.assert_allclose(sims, want_sim, atol=tol)
    pairs = duplicate_pairs(sims, idx, cosine=0.99, margin=0.05, neighbours=4)
    assert {(a, b) for a, b, *_ in pairs} == {(i, 250 + i) for i in range(50)}
    groups = duplicate_groups(len(x), pairs)
    assert groups[0] == groups[250] != groups[1] and groups[100] == -1


def test_neighbours_of_rows_that_do_not_fill_the_column_groups_equal_brute_force() -> None:
    """Row counts around multiples of the strided column groups (padding), k near the group width."""
    rng = np.random.default_rng(1)
    for n in (9, 17, 63, 65, 130):
        x = rng.normal(size=(n, 16)).astype(np.float32)
        z = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        k = min(6, n - 1)
        want = -np.sort(-s, axis=1)[:, :k]
        sims, idx = nearest_neighbours(x, k, block=32)
        np.testing.assert_allclose(sims, want, atol=8 * np.finfo(np.float32).eps * 16)
        assert (idx != np.arange(n)[:, None]).all() and (idx < n).all()


def _assert_exact_neighbours(x: np.ndarray, sims: np.ndarray, idx: np.ndarray, rows=None) -> None:
    """sims / idx are the k nearest of ``rows`` of x, as fp64 cosines rank them up to fp32
    rounding (1e-6): each returned neighbour's cosine is the k-th best one's, and sims are those
    cosines."""
    z = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    s = s if rows is None else s[rows]
    want = -np.sort(-s, axis=1)[:, : idx.shape[1]]
    np.testing.assert_allclose(np.take_along_axis(s, idx, 1), want, atol=1e-6)
    np.testing.assert_allclose(sims, want, atol=1e-6)
    assert all(len(set(r)) == len(r) for r in idx.tolist())


def test_bf16_screening_over_tiles_and_blocks_gives_the_exact_neighbours_of_a_tight_cluster() -> (
    None
):
    """300 rows within cosine 1 - 2e-4 of one another (bf16 rounds all their products to the same
    value: its spacing near 1 is 2^-8) among 700 scattered ones: a screen that kept its k + 4
    best bf16 columns would re-score an arbitrary 14 of the 299 look-alikes. The certificate
    sends those rows to fp32, so every row's neighbours are the exact ones, in several tiles
    (tile 128) and blocks (block 96), and for a range of rows alone."""
    rng = np.random.default_rng(3)
    d, k = 32, 10
    centre = rng.normal(size=d)
    tight = centre + 1e-2 * rng.normal(size=(300, d)) * np.linalg.norm(centre) / np.sqrt(d)
    x = np.concatenate([rng.normal(size=(700, d)), tight]).astype(np.float32)
    sims, idx = nearest_neighbours(x, k, dtype=torch.bfloat16, block=96, tile=128, candidates=14)
    _assert_exact_neighbours(x, sims, idx)
    part_s, part_i = nearest_neighbours(
        x, k, dtype=torch.bfloat16, block=96, tile=128, candidates=14, rows=range(650, 790)
    )
    _assert_exact_neighbours(x, part_s, part_i, rows=slice(650, 790))


def test_rows_certified_by_the_screen_are_not_computed_again(monkeypatch) -> None:
    """Scattered rows: the bf16 screen certifies nearly all, and only the others go to fp32."""
    import samprobe.inspection as inspection

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 64)).astype(np.float32)
    again: list[int] = []
    exact_rows = inspection._exact_rows
    monkeypatch.setattr(
        inspection,
        "_exact_rows",
        lambda t, rows, k: again.append(len(rows)) or exact_rows(t, rows, k),
    )
    sims, idx = nearest_neighbours(x, 10, dtype=torch.bfloat16, block=256, tile=512)
    _assert_exact_neighbours(x, sims, idx)
    assert sum(again) < 0.05 * len(x)


def test_look_alikes_of_a_dense_class_are_not_near_duplicates_but_an_isolated_copy_is() -> None:
    """30 vectors around one centre (pairwise cosine ~0.98, as one digit's scans by different
    writers) and 40 scattered ones, one of which has a copy at cosine ~0.97: the copy stands out
    from its neighbourhood, the look-alikes do not; with margin 0 the look-alikes are all pairs."""
    rng = np.random.default_rng(0)
    d = 64
    centre = rng.normal(size=d)
    dense = centre + 0.15 * np.linalg.norm(centre) / np.sqrt(d) * rng.normal(size=(30, d))
    scattered = rng.normal(size=(40, d))
    copy = scattered[0] + 0.33 * rng.normal(size=d)  # cosine ~0.97 to scattered[0]
    x = np.concatenate([dense, scattered, copy[None]]).astype(np.float32)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    look_alike = (z[:30] @ z[:30].T)[np.triu_indices(30, 1)]
    assert look_alike.mean() > float(z[30] @ z[70]) > 0.94  # closer than the copy
    sims, idx = nearest_neighbours(x, 10)
    pairs = duplicate_pairs(sims, idx, cosine=0.94, margin=0.05, neighbours=5)
    assert [(a, b) for a, b, *_ in pairs] == [(30, 70)]
    assert pairs[0][3] >= 0.05
    cosine_only = duplicate_pairs(sims, idx, cosine=0.94, margin=0.0, neighbours=5)
    assert sum(b < 30 for _, b, *_ in cosine_only) > 30


def test_a_lone_image_has_no_neighbours() -> None:
    sims, idx = nearest_neighbours(np.ones((1, 8), np.float32), 5)
    assert sims.shape == idx.shape == (1, 0)


def test_folds_are_stratified_and_a_one_image_class_is_in_one_fold() -> None:
    labels = np.array([0] * 23 + [1] * 11 + [2])
    fold = fold_assignment(labels, 5, seed=0)
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in (0, 1):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(fold, fold_assignment(labels, 5, seed=0))


def test_leakage_is_test_against_train_or_val_only() -> None:
    assert is_leak("train", "test") and is_leak("test", "val")
    assert (
        not is_leak("train", "val")
        and not is_leak("test", "test")
        and not is_leak("train", "train")
    )


def test_cross_fit_scores_flipped_labels_low_though_a_head_fits_them_in_sample(one_thread) -> None:
    """Real digit features: an MLP without decay fits flipped labels when it trains on them; the
    cross-fitted probabilities of the given (wrong) label stay low, as no head saw the image."""
    from samprobe.config import BackboneConfig, Config, FeaturesConfig
    from samprobe.features.extract import Extractor, image_features

    scans = digit_scans(range(4), 25)
    ex = Extractor.from_config(
        Config(
            device="cpu",
            precision="fp32",
            features=FeaturesConfig(dtype="float32"),
            backbone=BackboneConfig(name="efficientnet_lite0", img_size=64),
        )
    )
    x = image_features(ex, [np.repeat(g[:, :, None], 3, 2) for g, _ in scans], batch_size=50)
    y = np.array([c for _, c in scans])
    flipped = np.array([3, 30, 60])
    y[flipped] = (y[flipped] + 2) % 4  # 0 -> 2, 1 -> 3, 2 -> 0
    cfg = TrainConfig(head="mlp", hidden=64, epochs=80, patience=80)
    fit = cross_fit(
        x, y, class_weights(np.bincount(y), "none"), cfg, folds=5, seed=0, settings=[(0.05, 0.0)]
    )
    assert fit.probs.shape == (100, 4) and np.allclose(fit.probs.sum(1), 1, atol=1e-5)
    assert set(np.unique(fit.fold)) == set(range(5))
    assert (fit.probs[flipped, y[flipped]] < 0.5).all()
    clean = np.setdiff1d(np.arange(100), flipped)
    assert (fit.probs[clean].argmax(1) == y[clean]).mean() > 0.8


# --- the command, end to end on real scans ------------------------------------------------------


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """4 digit classes x 15 scans with explicit splits (9 train, 3 val, 3 test); two train labels
    flipped; a train scan copied (same pixels, other bytes) into test: leakage."""
    root = tmp_path_factory.mktemp("inspect")
    rows: list[tuple[np.ndarray, str, str | None]] = []
    for n, (grey, c) in enumerate(digit_scans(range(4), 15)):
        k = n % 15
        rows.append((grey, NAMES[c], "train" if k < 9 else "val" if k < 12 else "test"))
    flipped = {2: NAMES[1], 17: NAMES[2]}  # a zero labelled one, a one labelled two
    for i, wrong in flipped.items():
        rows[i] = (rows[i][0], wrong, rows[i][2])
    rows.append((rows[40][0], rows[40][1], "test"))  # a copy of train image 40 (a two) in test
    run_dir, summary = run(write_project(root, rows))
    return (
        run_dir,
        summary,
        {f"im_{i:03d}.png" for i in flipped},
        ("im_040.png", f"im_{len(rows) - 1:03d}.png"),
    )


def test_inspect_finds_the_flipped_labels_and_names_the_leak(inspected) -> None:
    run_dir, summary, flipped, leak = inspected
    issues = _csv(run_dir / "inspect" / "label_issues.csv")
    assert flipped <= {r["path"] for r in issues}
    suggested = {r["path"]: r["suggested_label"] for r in issues}
    assert suggested["im_002.png"] == "zero" and suggested["im_017.png"] == "one"
    assert summary["label_issues"]["scored"] == 48  # train + val; test labels are never looked at
    dups = _csv(run_dir / "inspect" / "near_duplicates.csv")
    leaks = [d for d in dups if d["leakage"] == "True"]
    assert {(d["path_a"], d["path_b"]) for d in leaks} >= {leak}
    assert summary["near_duplicates"]["leakage_pairs"] == len(leaks) >= 1
    assert {r["path"] for r in _csv(run_dir / "inspect" / "map2d.csv")} >= {"im_000.png", leak[1]}


def test_inspect_never_changes_the_users_data(inspected) -> None:
    run_dir, _, _, _ = inspected
    meta = run_dir.parent / "data" / "metadata.csv"
    # the flipped label stays as the user wrote it
    assert "im_002.png,one,train" in meta.read_text()


def test_the_report_shows_the_inspect_sections_with_images(inspected) -> None:
    from samprobe.report import write_report

    run_dir, _, _, _ = inspected
    html = write_report(run_dir).html.read_text(encoding="utf-8")
    for section in (
        'id="label-issues"',
        'id="near-duplicates"',
        'id="outliers"',
        'id="feature-map"',
        'id="summary"',
    ):
        assert section in html
    assert html.count("data:image/jpeg;base64,") >= 4  # the two flipped scans and the leak pair
    assert 'data-metric="leakage_pairs"' in html and "LEAK" in html


# --- edge cases ------------------------------------------------------------------------------


def test_no_val_split(tmp_path) -> None:
    rows = [(g, NAMES[c], None) for g, c in digit_scans(range(3), 10)]
    run_dir, summary = run(
        write_project(tmp_path, rows, data={"val_fraction": 0.0, "test_fraction": 0.2})
    )
    splits = {r["split"] for r in _csv(run_dir / "splits.csv")}
    assert "val" not in splits
    assert summary["label_issues"]["scored"] == 24 and "issues" in summary["label_issues"]


def test_one_class_skips_label_issues_and_says_why(tmp_path) -> None:
    from samprobe.report import write_report

    rows = [(g, "zero", None) for g, _ in digit_scans(range(1), 12)]
    run_dir, summary = run(write_project(tmp_path, rows))
    assert summary["label_issues"]["skipped"].startswith("one class")
    assert _csv(run_dir / "inspect" / "label_issues.csv") == []
    assert "Label errors not searched: one class" in write_report(run_dir).html.read_text(
        encoding="utf-8"
    )


def test_a_class_with_one_image_does_not_break_the_folds(tmp_path) -> None:
    rows = [
        (g, NAMES[c], "train" if n % 5 else "test")
        for n, (g, c) in enumerate(digit_scans(range(3), 10))
    ]
    rows += [(g, "three", "train") for g, _ in digit_scans(range(3, 4), 1)]
    _, summary = run(write_project(tmp_path, rows))
    assert summary["label_issues"]["scored"] == 25 and summary["label_issues"]["folds"] == 5


def test_identical_images_are_all_near_duplicates_and_none_an_outlier(tmp_path) -> None:
    grey = digit_scans(range(1), 1)[0][0]
    # one picture, two labels, distinct files
    rows = [(grey, NAMES[n % 2], None) for n in range(12)]
    _, summary = run(write_project(tmp_path, rows))
    nd = summary["near_duplicates"]
    # each image paired with its 10 nearest: one connected group
    assert nd["groups"] == 1 and nd["pairs"] >= 11
    assert nd["different_labels"] > 0 and summary["outliers"]["count"] == 0
    assert summary["label_issues"]["scored"] > 0


def test_no_issues_found_and_the_report_says_so(tmp_path) -> None:
    from samprobe.report import write_report

    # zeros and ones: clean and easy
    rows = [(g, NAMES[c], None) for g, c in digit_scans((0, 1), 12)]
    run_dir, summary = run(write_project(tmp_path, rows, inspect={"duplicate_cosine": 1.0}))
    assert summary["label_issues"]["issues"] == 0, _csv(run_dir / "inspect" / "label_issues.csv")
    html = write_report(run_dir).html.read_text(encoding="utf-8")
    assert "No suspected label errors found among" in html


def test_the_sweep_setting_for_probabilities_is_the_lowest_validation_log_loss() -> None:
    from samprobe.inspection import setting_from_sweep

    table = [
        {
            "lr": 0.5,
            "weight_decay": 1e-4,
            "val_loss": 0.41,
            "best_balanced_accuracy": 0.95,
            "selected": True,
        },
        {
            "lr": 0.05,
            "weight_decay": 0.1,
            "val_loss": 0.22,
            "best_balanced_accuracy": 0.93,
            "selected": False,
        },
        {"lr": 0.5, "weight_decay": 0.1, "val_loss": float("nan"), "selected": False},
    ]
    assert setting_from_sweep(table) == (0.05, 0.1)
    assert setting_from_sweep([{"lr": 0.5, "weight_decay": 0.1, "val_loss": float("nan")}]) is None
