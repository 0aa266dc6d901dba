"""Results a user can trust (issue 11): each test replays, through the CLI on real digit scans, an
everyday change that used to give a wrong result with exit 0."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_config, write_digits
from helpers.cache_corpus import LogLines
from samprobe.cli import main
from samprobe.data.records import read_splits
from samprobe.tracking import read_csv_rows

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the module: the digit scans repeat across tests, so each is extracted once."""
    return tmp_path_factory.mktemp("trust-cache")


def project(
    root: Path,
    cache: Path,
    *,
    per_class: int = 20,
    classes: tuple[int, ...] = (0, 1, 2),
    names: list[str] | None = None,
    data: dict | None = None,
    train: dict | None = None,
    backbone: dict | None = None,
) -> str:
    """Digit scans under root/data and a config (efficientnet_lite0 at 64 px, real ImageNet weights)."""
    write_digits(root / "data", per_class=per_class, classes=classes, names=names)
    write_config(
        root / "samprobe.yaml",
        data={"val_fraction": 0.2, "test_fraction": 0.2, **(data or {})},
        backbone=backbone or {"name": "efficientnet_lite0", "img_size": 64},
        features={"cache_dir": str(cache), "batch_size": 32, "num_workers": 0},
        train={"epochs": 6, "patience": 50, **(train or {})},
    )
    return str(root / "samprobe.yaml")


def run_ok(cfg: str, *commands: str, extra: tuple[str, ...] = ()) -> None:
    for cmd in commands:
        assert main([cmd, "-c", cfg, *extra]) == 0, cmd


def splits_by_path(run: Path) -> dict[str, str]:
    return {r.path: r.split for r in read_splits(run / "splits.csv")}


def newer(path: Path) -> None:
    """Mark a file as edited after the run's splits.csv (file times can tie within a test)."""
    t = (path.parent.parent / "run" / "splits.csv").stat().st_mtime + 5
    os.utime(path, (t, t))


def sweep_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "sweep.csv") as f:
        return list(csv.DictReader(f))


# --- 1. splits never move; evaluate / resume refuse a checkpoint's training images -------------


def test_adding_images_moves_no_image_and_leakage_is_refused(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = project(tmp_path, shared_cache, per_class=20)
    run_ok(cfg, "validate", "extract", "train")
    run, best = tmp_path / "run", str(tmp_path / "run" / "checkpoints" / "best.pt")
    before = splits_by_path(run)
    trained_on = {r.sha256 for r in read_splits(run / "splits.csv") if r.split == "train"}

    write_digits(tmp_path / "data", per_class=28, classes=(0, 1, 2))  # 8 more scans per class
    newer(tmp_path / "data" / "metadata.csv")
    run_ok(cfg, "extract")  # validates again: the metadata is newer than splits.csv
    after = splits_by_path(run)
    assert len(after) == 84 and {p: after[p] for p in before} == before  # no image moved
    per_class = {
        c: [s for p, s in after.items() if read_label(tmp_path, p) == c] for c in ("d0", "d1", "d2")
    }
    for splits in per_class.values():  # 28 per class: round(0.2 x 28) = 6 val and 6 test
        assert (splits.count("val"), splits.count("test")) == (6, 6)
    assert main(["evaluate", "-c", cfg, "--checkpoint", best]) == 0
    test_keys = {r.sha256 for r in read_splits(run / "splits.csv") if r.split == "test"}
    assert not test_keys & trained_on

    # Resuming on changed data would not continue the run it claims to: refused.
    capsys.readouterr()
    assert main(["train", "-c", cfg, "--resume"]) == 2
    assert (
        "was trained on 36 train images, this run's splits.csv has 48 (36 of them the same)"
        in capsys.readouterr().err
    )

    # New split settings re-assign every image, loudly; the old checkpoint's train images in test
    # are refused.
    with LogLines() as log:
        assert main(["evaluate", "-c", cfg, "--checkpoint", best, "--set", "seed=3"]) == 2
    assert any(
        "previously assigned images changed split: the split settings changed (seed 0 -> 3)" in m
        for m in log.lines
    )
    err = capsys.readouterr().err
    assert "[SP300]" in err and f"test images were train images of {best}" in err
    # Back to seed 0: every image has its seed-0 split again (the ledger keeps each settings'
    # assignment).
    assert main(["evaluate", "-c", cfg, "--checkpoint", best]) == 0
    assert splits_by_path(run) == after


def read_label(root: Path, path: str) -> str:
    with open(root / "data" / "metadata.csv") as f:
        return {r["path"]: r["label"] for r in csv.DictReader(f)}[path]


# --- 2. one label rule per file ----------------------------------------------------------------


def test_numeric_class_names_and_indices_are_never_mixed(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # classes.txt lists 3, 7, 12; some rows name the class, others give an index (0 = "3", 1 = "7"):
    # a per-row rule would read "1" as class 7 in one row and as a class named "1" in another.
    cfg = project(
        tmp_path,
        shared_cache,
        per_class=8,
        classes=(0, 1, 2, 3, 7),
        names=["0", "12", "1", "3", "", "", "", "7"],
        data={"classes_file": "data/classes.txt"},
    )
    (tmp_path / "data" / "classes.txt").write_text("3\n7\n12\n")
    assert main(["validate", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert (
        "[SP200]" in err
        and "data.label_column values read one way as class names" in err
        and "data.label_type" in err
    )

    assert main(["validate", "-c", cfg, "--set", "data.label_type=name"]) == 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    # the "0" and "1" rows: no such class
    assert report["label_type"] == "name" and report["unknown_label"] == 16
    recs = read_splits(tmp_path / "run" / "splits.csv")
    assert {r.label for r in recs} == {"3", "7", "12"} and all(
        r.label == read_label(tmp_path, r.path) for r in recs
    )

    # Indices only, into numeric names listed in another order: both readings fit, so the user
    # decides.
    cfg = project(
        tmp_path / "b",
        shared_cache,
        per_class=8,
        classes=(0, 1, 2),
        names=["0", "1", "2"],
        data={"classes_file": "data/classes.txt"},
    )
    (tmp_path / "b" / "data" / "classes.txt").write_text("2\n0\n1\n")
    assert main(["validate", "-c", cfg]) == 2
    assert "'0' is class '0' by name but class '2' by index" in capsys.readouterr().err
    assert main(["validate", "-c", cfg, "--set", "data.label_type=index"]) == 0
    recs = read_splits(tmp_path / "b" / "run" / "splits.csv")
    assert (
        all(r.label == ["2", "0", "1"][int(read_label(tmp_path / "b", r.path))] for r in recs)
        and len(recs) == 24
    )


# --- 3. sweep pruning and divergence ------------------------------------------------------------


def test_pruning_waits_for_warmup_and_the_val_noise_floor(
    tmp_path: Path, shared_cache: Path
) -> None:
    # The user's case: mlp heads, the default sweep and prune_margin 0.1, 18 validation images.
    cfg = project(
        tmp_path, shared_cache, per_class=30, train={"head": "mlp", "epochs": 100, "patience": 15}
    )
    run_ok(cfg, "validate", "extract")
    with LogLines() as log:
        run_ok(cfg, "train")
    assert any(
        "raised from sweep.prune_margin 0.1 to the noise floor of balanced_accuracy on 18 "
        "validation images" in m
        for m in log.lines
    )
    rows = sweep_rows(tmp_path / "run")
    pruned_at = [
        int(r["status"].split()[3].rstrip(":")) for r in rows if r["status"].startswith("pruned")
    ]
    # 5 warm-up epochs (5% of 100); pruning from epoch 1 on (before any lr had warmed up) cut 7 of 8
    assert all(e >= 5 for e in pruned_at), pruned_at
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == 1 and not selected[0]["status"].startswith("diverged")


def test_a_diverging_head_is_never_selected(tmp_path: Path, shared_cache: Path) -> None:
    # lr 20 scores best at epoch 1 (warm-up keeps it small), then its loss explodes (1.1, 495, 1e8,
    # ...).
    cfg = project(
        tmp_path,
        shared_cache,
        per_class=30,
        train={
            "head": "mlp",
            "epochs": 30,
            "patience": 15,
            "sweep": {"lrs": [20.0, 0.0001], "weight_decays": [0.0001], "prune_margin": None},
        },
    )
    run_ok(cfg, "validate", "extract")
    with LogLines() as log:
        run_ok(cfg, "train")
    fast, slow = sweep_rows(tmp_path / "run")
    assert fast["status"].startswith("diverged at epoch") and fast["selected"] == "False"
    assert slow["selected"] == "True" and not slow["status"].startswith("diverged")
    assert any("diverged 1 head(s): lr 20" in m for m in log.lines)


# --- 4. cache prune keeps what other projects need --------------------------------------------


def test_cache_prune_keeps_entries_another_project_uses(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    a = project(tmp_path / "a", cache, per_class=6, classes=(0, 1))
    b = project(tmp_path / "b", cache, per_class=6, classes=(5, 6))
    run_ok(a, "extract")
    run_ok(b, "extract")
    fp_dir = next(p for p in cache.iterdir() if p.is_dir())
    with LogLines() as log:
        assert main(["cache", "prune", "-c", a]) == 0  # a dry run by default
    assert any("would remove 0 of 24 entries" in m for m in log.lines)
    # Project a drops two images; b keeps all of its own.
    meta = tmp_path / "a" / "data" / "metadata.csv"
    meta.write_text("\n".join(meta.read_text().splitlines()[:-2]) + "\n")
    newer(meta)
    with LogLines() as log:
        assert main(["cache", "prune", "-c", a]) == 0
        assert main(["cache", "prune", "-c", a, "--yes"]) == 0
    assert any("2 run(s) use it" in m for m in log.lines)
    assert any("would remove 2 of 24 entries, would free about" in m for m in log.lines)
    assert any("removed 2 of 24 entries, freed" in m for m in log.lines)
    from samprobe.features.cache import FeatureCache

    b_keys = {r.sha256 for r in read_splits(tmp_path / "b" / "run" / "splits.csv")}
    with FeatureCache.open_existing(fp_dir) as c:
        assert b_keys <= c.keys() and len(c) == 22


# --- 5. evaluations do not overwrite one another ------------------------------------------------


def test_evaluations_are_kept_per_checkpoint_and_split(tmp_path: Path, shared_cache: Path) -> None:
    exp1 = project(tmp_path, shared_cache, per_class=15)
    run_ok(exp1, "validate", "extract", "train")
    run = tmp_path / "run"
    exp2 = ["--set", f"run_dir={tmp_path / 'exp2'}", "--set", "train.head=mlp"]
    run_ok(exp1, "train", extra=tuple(exp2))
    best1, best2 = run / "checkpoints" / "best.pt", tmp_path / "exp2" / "checkpoints" / "best.pt"
    for split in ("val", "test"):
        assert main(["evaluate", "-c", exp1, "--checkpoint", str(best1), "--split", split]) == 0
    report = (run / "report.html").read_bytes()
    own = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert main(["evaluate", "-c", exp1, "--checkpoint", str(best2)]) == 0
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text()) == own
    other = json.loads((run / "eval" / "test-exp2-best" / "metrics.json").read_text())
    assert other["checkpoint"] == str(best2) and own["checkpoint"] == str(best1)
    assert json.loads((run / "eval" / "val" / "metrics.json").read_text())["split"] == "val"
    assert (run / "report.html").read_bytes() == report  # the report shows this run's head only


# --- 6. no val split: carved from train, never selection on training loss -----------------------


def test_split_column_without_val_gets_a_carved_val_split(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = project(
        tmp_path, shared_cache, per_class=20, data={"split_column": "split", "val_fraction": 0.15}
    )
    meta = tmp_path / "data" / "metadata.csv"
    rows = read_csv_rows(meta)
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 5 == 0 else "train"
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    with LogLines() as log:
        run_ok(cfg, "validate", "extract", "train")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert "no val rows, so val is carved from its train rows" in report["splits"]["source"]
    # 3 per class: round(0.15 x 20)
    assert report["splits"]["counts"] == {
        "train": 39,
        "val": 9,
        "test": 12,
    }
    assert any("val is carved from its train rows" in m for m in log.lines)
    recs = read_splits(tmp_path / "run" / "splits.csv")
    # test rows untouched
    assert all((r.split == "test") == (rows[r.row - 1]["split"] == "test") for r in recs)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert math.isfinite(best["metrics"]["val_balanced_accuracy"])

    # val_fraction 0: no val split; training would select on its own loss: refused.
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "-c",
                cfg,
                "--set",
                "data.val_fraction=0",
                "--set",
                f"run_dir={tmp_path / 'noval'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "[SP500]" in err and "no validation images" in err and "data.val_fraction" in err


# --- 7. one class is no classifier -------------------------------------------------------------


def test_training_on_one_class_exits_2_naming_it(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = project(tmp_path, shared_cache, per_class=10, classes=(4,))
    run_ok(cfg, "validate", "extract")
    assert main(["train", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert (
        "[SP500]" in err
        and "only one class has training images ('d4'" in err
        and "at least 2 classes" in err
    )
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


# --- 8. predict on a metadata file --------------------------------------------------------------


def test_predict_reads_a_metadata_file_against_the_training_image_root(
    tmp_path: Path, shared_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = project(tmp_path, shared_cache, per_class=15)
    run_ok(cfg, "validate", "extract", "train")
    best = str(tmp_path / "run" / "checkpoints" / "best.pt")
    out = tmp_path / "pred.csv"
    # The training metadata itself: paths relative to data.image_root, not to the file's folder.
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                best,
                str(tmp_path / "data" / "metadata.csv"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    preds = read_csv_rows(Path(out))
    assert len(preds) == 45 and not any(p["error"] for p in preds)
    assert np.mean([p["label"] == read_label(tmp_path, Path(p["path"]).name) for p in preds]) > 0.8

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                best,
                str(tmp_path / "data" / "metadata.csv"),
                "--out",
                str(out),
                "--image-root",
                str(elsewhere),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "none of the 45 images could be classified" in err and "--image-root" in err
    assert all(p["error"] for p in read_csv_rows(Path(out)))  # the CSV still says why, row by row


# --- 9. predict with moved SAM weights, without touching the training cache --------------------


def test_predict_finds_moved_weights_and_leaves_the_training_cache_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.sam_factory import write_official_checkpoint
    from samprobe.predict import Classifier

    weights = write_official_checkpoint(
        tmp_path / "weights" / "sam_tiny.pth", geometry="tiny", img_size=256
    )
    cfg = project(
        tmp_path,
        tmp_path / "cache",
        per_class=6,
        classes=(0, 1),
        backbone={"name": "sam", "checkpoint": str(weights), "img_size": 256},
    )
    run_ok(cfg, "validate", "extract", "train")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    shutil.rmtree(tmp_path / "cache")
    moved = tmp_path / "moved" / "sam_tiny.pth"
    moved.parent.mkdir()
    weights.rename(moved)
    images, out = str(tmp_path / "data" / "images"), str(tmp_path / "pred.csv")

    assert main(["predict", "--checkpoint", str(best), images, "--out", out]) == 2
    err = capsys.readouterr().err
    assert (
        "[SP300]" in err
        and f"the backbone weights {weights} the head was trained with do not exist" in err
    )
    assert "--weights" in err
    assert (
        main(["predict", "--checkpoint", str(best), images, "--out", out, "--weights", str(moved)])
        == 0
    )
    assert len(read_csv_rows(Path(out))) == 12
    assert not (
        tmp_path / "cache"
    ).exists()  # predict wrote no feature into the (deleted) training cache

    # Renamed and put beside the checkpoint: found by content (the sha256 recorded at training).
    moved.rename(best.parent / "renamed.pth")
    assert main(["predict", "--checkpoint", str(best), images, "--out", out]) == 0
    clf = Classifier.load(best, device="cpu", weights=best.parent / "renamed.pth")
    assert clf.predict([tmp_path / "data" / "images" / "img_0000.png"])[0].label in {"d0", "d1"}
    assert not (tmp_path / "cache").exists()


# --- 10. last.pt holds state, not history --------------------------------------------------------


def test_last_checkpoint_does_not_grow_with_the_epochs(tmp_path: Path, shared_cache: Path) -> None:
    cfg = project(
        tmp_path,
        shared_cache,
        per_class=10,
        train={"epochs": 40, "patience": 100, "sweep": {"prune_margin": None}},
    )
    run_ok(cfg, "validate", "extract")
    sizes = {}
    for epochs in (3, 40):
        run_ok(cfg, "train", extra=("--set", f"train.epochs={epochs}"))
        last = tmp_path / "run" / "checkpoints" / "last.pt"
        sizes[epochs] = last.stat().st_size
        state = torch.load(last, weights_only=True)["train_state"]
        assert state["epoch"] == epochs and "history" not in state
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == epochs
    # 37 more epochs of 8 heads' rows were ~40 KB more
    assert abs(sizes[40] - sizes[3]) < 1024, sizes
