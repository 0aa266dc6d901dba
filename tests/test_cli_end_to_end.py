"""The whole slice through the CLI: validate -> extract -> train -> evaluate -> predict -> export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from helpers.digits import write_config, write_digits
from helpers.sam_factory import write_official_checkpoint
from samprobe.cli import main
from samprobe.data.images import decode_rgb
from samprobe.io import sha256_file
from samprobe.predict import Classifier
from samprobe.serve import Upload, decode_upload
from samprobe.tracking import read_csv_rows

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


def run_slice(project: Path) -> Path:
    cfg = str(project / "samprobe.yaml")
    for cmd in (["validate"], ["extract"], ["train"]):
        assert main([*cmd, "-c", cfg]) == 0, cmd
    best = project / "run" / "checkpoints" / "best.pt"
    assert main(["evaluate", "-c", cfg, "--checkpoint", str(best), "--split", "test"]) == 0
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(best),
                str(project / "data" / "images"),
                "--out",
                str(project / "pred.csv"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "features",
                "export",
                "-c",
                cfg,
                "--split",
                "train",
                "--out",
                str(project / "train.npz"),
            ]
        )
        == 0
    )
    return project / "run"


def check_outputs(project: Path, run: Path, n_images: int, dim: int) -> dict:
    report = json.loads((run / "data_report.json").read_text())
    assert report["total"] == report["ok"] + sum(
        report[k] for k in ("missing", "unreadable", "unknown_label", "duplicate")
    )
    with open(run / "bad_rows.csv") as f:
        assert len(list(csv.DictReader(f))) == report["total"] - report["ok"]
    with open(run / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    assert len(splits) == report["ok"] and {s["split"] for s in splits} == {"train", "val", "test"}
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["head"]["spec"]["in_dim"] == dim
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs and all(np.isfinite(e["train_loss"]) for e in epochs)
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    with open(run / "eval" / "test" / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert len(per_class) == len(report["taxonomy"])
    png = Image.open(run / "eval" / "test" / "confusion_matrix.png")
    assert png.size[0] > 100 and png.size[1] > 100
    with open(project / "pred.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == n_images and all(p["label"] in report["taxonomy"] for p in preds)
    exported = np.load(project / "train.npz")
    assert exported["features"].shape == (sum(s["split"] == "train" for s in splits), dim)
    assert (run / "run.log").read_text().count("extract") >= 1 and (run / "config.yaml").is_file()
    return metrics


@pytest.mark.slow
def test_slice_efficientnet_lite0_real_weights(digits_project: Path) -> None:
    run = run_slice(digits_project)
    metrics = check_outputs(digits_project, run, n_images=80, dim=1280)
    # 4 digit classes, real ImageNet features, 48 train images
    assert metrics["balanced_accuracy"] >= 0.75


@pytest.mark.slow
def test_slice_tiny_sam_official_format_checkpoint(tmp_path: Path) -> None:
    write_digits(tmp_path / "data", per_class=8, classes=(0, 1))
    ckpt = write_official_checkpoint(
        tmp_path / "weights" / "sam_tiny.pth", geometry="tiny", img_size=256
    )
    write_config(
        tmp_path / "samprobe.yaml",
        backbone={"name": "sam", "checkpoint": str(ckpt), "img_size": 256},
        features={"pooling": ["neck_avg", "block_avg"], "num_workers": 0, "batch_size": 8},
        train={"epochs": 5, "patience": 5},
    )
    run = run_slice(tmp_path)
    check_outputs(tmp_path, run, n_images=16, dim=256 + 64)
    # A JPEG twice the input size or more decodes at reduced scale in extraction (other pixels than a
    # full decode): Classifier.predict and the service must decode it so too, or they see features
    # other than the ones `predict` (through the cache) and training saw.
    photo = tmp_path / "large.jpg"
    Image.fromarray(np.concatenate([data.astronaut(), data.astronaut()], axis=1)).save(
        photo, quality=90
    )  # 512 x 1024: >= 2 x 256
    clf = Classifier.load(run / "checkpoints" / "best.pt", device="cpu")
    assert not np.array_equal(clf.decode(photo), decode_rgb(photo))  # the two decodes differ here
    best, cache_dir = str(run / "checkpoints" / "best.pt"), tmp_path / "predict-cache"
    argv = ["predict", "--checkpoint", best, str(photo), "--out", str(tmp_path / "large.csv")]
    assert main([*argv, "--cache-dir", str(cache_dir)]) == 0  # through the extraction loader
    with clf.extractor.open_cache(cache_dir) as cache:
        extracted = cache.get([sha256_file(photo)])  # [1, D] float32
    [from_cache] = clf._predictions(extracted, top_k=2)
    [by_python] = clf.predict([photo], top_k=2)
    served = decode_upload(Upload("large.jpg", photo.read_bytes()), 10**8, clf.decode)
    [by_service] = clf.predict_prepared([clf.prepare(served)], top_k=2)
    assert by_python.top_k == from_cache.top_k and by_service.top_k == from_cache.top_k


@pytest.mark.slow
def test_predict_uses_original_names_when_first_class_is_empty(tmp_path: Path) -> None:
    write_digits(tmp_path / "data", per_class=15, classes=(1, 2, 3))
    # blank and d0: no images
    (tmp_path / "data" / "classes.txt").write_text("blank\nd0\nd1\nd2\nd3\n")
    write_config(tmp_path / "samprobe.yaml", data={"classes_file": "data/classes.txt"})
    cfg = str(tmp_path / "samprobe.yaml")
    for cmd in ("validate", "extract", "train"):
        assert main([cmd, "-c", cfg]) == 0
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["classes"]["active"] == [2, 3, 4] and ckpt["head"]["spec"]["num_classes"] == 3

    with open(tmp_path / "data" / "metadata.csv") as f:
        truth = {
            str(tmp_path / "data" / "images" / r["path"]): r["label"] for r in csv.DictReader(f)
        }
    # a metadata file: paths under the training data.image_root
    listing = tmp_path / "data" / "to_classify.csv"
    listing.write_text("path\n" + "".join(f"{Path(p).name}\n" for p in truth))
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(best),
                str(listing),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with open(out) as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == len(truth) and not any(p["error"] for p in preds)
    assert {p["label"] for p in preds} <= {"d1", "d2", "d3"}
    assert all(p["top_k"].split("|")[0].split(":")[0] == p["label"] for p in preds)
    accuracy = np.mean([truth[p["path"]] == p["label"] for p in preds])
    assert accuracy >= 0.8  # mostly its own training images: a shifted mapping would score ~0

    clf = Classifier.load(best, device="cpu")
    img = Image.open(next(iter(truth)))
    [pred] = clf.predict([img])
    assert pred.label in {"d1", "d2", "d3"} and 0 < pred.score <= 1


@pytest.mark.slow
def test_evaluate_counts_untrained_class_samples_as_errors(tmp_path: Path) -> None:
    write_digits(tmp_path / "data", per_class=12, classes=(0, 1, 2))
    meta = tmp_path / "data" / "metadata.csv"
    rows = read_csv_rows(meta)
    for r in rows:  # every d2 image goes to test: d2 is in the taxonomy but never trained
        r["split"] = (
            "test" if r["label"] == "d2" else ("test" if int(r["path"][4:8]) % 4 == 0 else "train")
        )
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    write_config(tmp_path / "samprobe.yaml", data={"split_column": "split"})
    cfg = str(tmp_path / "samprobe.yaml")
    for cmd in ("validate", "extract", "train"):
        assert main([cmd, "-c", cfg]) == 0
    assert (
        main(["evaluate", "-c", cfg, "--checkpoint", str(tmp_path / "run/checkpoints/best.pt")])
        == 0
    )
    metrics = json.loads((tmp_path / "run/eval/test/metrics.json").read_text())
    assert metrics["n_not_trained"] == 12 and metrics["not_trained_classes"] == ["d2"]
    assert metrics["accuracy"] <= 1 - 12 / metrics["n"] + 1e-9
    per_class = {r["class"]: r for r in read_csv_rows(tmp_path / "run/eval/test/per_class.csv")}
    assert per_class["d2"]["status"] == "not trained" and float(per_class["d2"]["recall"]) == 0.0


def test_train_without_extract_says_what_to_do(
    digits_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(digits_project / "samprobe.yaml")
    assert main(["validate", "-c", cfg]) == 0
    assert main(["train", "-c", cfg]) == 2
    assert "samprobe extract" in capsys.readouterr().err


def test_wrong_head_checkpoint_file_exits_2(
    digits_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = digits_project / "bogus.pt"
    bogus.write_bytes(b"this is not a checkpoint")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(bogus),
                str(digits_project),
                "--out",
                str(digits_project / "p.csv"),
            ]
        )
        == 2
    )
    assert "bogus.pt" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sam_hq", "sam2", "mobile_sam", "efficientvit_sam"])
def test_slice_each_sam_family_tiny_checkpoint(tmp_path: Path, family: str) -> None:
    """validate -> extract -> train -> evaluate -> predict through the CLI, `backbone.name:
    sam` detecting the family."""
    from helpers.family_factory import TINY

    backbone = TINY[family](tmp_path / "weights")
    backbone.update(name="sam", img_size=128 if family == "sam2" else 256)  # detected from the file
    write_digits(tmp_path / "data", per_class=8, classes=(0, 1))
    write_config(
        tmp_path / "samprobe.yaml",
        backbone=backbone,
        features={"pooling": ["neck_avg"], "num_workers": 0, "batch_size": 8},
        train={"epochs": 5, "patience": 5},
    )
    run = run_slice(tmp_path)
    check_outputs(tmp_path, run, n_images=16, dim=256)
    said = {
        "sam_hq": "SAM-HQ checkpoint",
        "sam2": "SAM 2.1 checkpoint",
        "mobile_sam": "MobileSAM checkpoint",
        "efficientvit_sam": "EfficientViT-SAM checkpoint",
    }
    assert said[family] in (run / "run.log").read_text()
