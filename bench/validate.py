"""Validation at scale: rows/s of `samprobe validate` on a large metadata file of small real PNGs,
against reading the same files raw, and what a rerun after touching 1 % of the files re-reads.

Writes N (200 k; --quick 20 k) 32x32 PNG crops of skimage photos at random places under --dir,
a metadata CSV naming them, then in the same run:
- reads every file raw (open + read in a pool of validate's size: the disk's read speed for
  these files, warm page cache as validate's),
- `validate` (hash + full decode of every file, nothing remembered) in threads of this process
  and in worker processes: the same rows, ``rows_per_s.threads`` / ``rows_per_s.processes``,
- `run_validate` (the same checks in worker processes, splits, data report) from scratch:
  ``rows_per_s.first`` and ``ratios.vs_raw_read`` (its rows/s over the raw read's),
- touches 1 % of the files (new mtime), runs `run_validate` again and measures what it read.

Bytes read are counted two ways: image bytes by validate's own code path (data_report.json
`files.bytes_read`), and everything the process read (metadata, the validation record, images)
from /proc/self/io `rchar`. Pass: the rerun reads <= 2 % of the first run's image bytes, and no
image changed split.

Run from the repo root: PYTHONPATH=src python bench/validate.py [--quick] [--n N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from samprobe.config import load_config
from samprobe.data.validate import check_workers, validate
from samprobe.pipeline import run_validate

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "immunohistochemistry")
SIDE = 32
PER_FOLDER = 1000
TOUCHED_SHARE = 0.01
TARGET_REREAD_SHARE = 0.02


def write_pngs(root: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n PNG crops of real photos under root/images/<folder>/; [(relative path, label)]."""
    from skimage import data as skdata

    photos = {name: np.asarray(getattr(skdata, name)()) for name in PHOTOS}
    rng = np.random.default_rng(seed)
    names = rng.integers(0, len(PHOTOS), n)
    corners = rng.random((n, 2))

    def one(i: int) -> tuple[str, str]:
        label = PHOTOS[int(names[i])]
        photo = photos[label]
        y = int(corners[i, 0] * (photo.shape[0] - SIDE))
        x = int(corners[i, 1] * (photo.shape[1] - SIDE))
        rel = f"{i // PER_FOLDER:04d}/{i:07d}.png"
        Image.fromarray(np.ascontiguousarray(photo[y : y + SIDE, x : x + SIDE])).save(
            root / "images" / rel
        )
        return rel, label

    for f in range((n + PER_FOLDER - 1) // PER_FOLDER):
        (root / "images" / f"{f:04d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:  # zlib and file writes release the GIL
        return list(pool.map(one, range(n), chunksize=256))


def write_project(root: Path, rows: list[tuple[str, str]]) -> Path:
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    cfg = root / "samprobe.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(root / "run"),
                "device": "cpu",
                "data": {
                    "metadata": str(root / "metadata.csv"),
                    "image_root": str(root / "images"),
                    "on_bad_rows": "skip",
                },
            }
        )
    )
    return cfg


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def raw_read_seconds(files: list[Path], workers: int) -> tuple[float, int]:
    def read(p: Path) -> int:
        with open(p, "rb") as f:
            return len(f.read())

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(read, files, chunksize=256))
    return time.perf_counter() - t, total


def timed_validate(cfg_path: Path) -> dict[str, float | int]:
    before = io_counters()
    t = time.perf_counter()
    records, _ = run_validate(load_config(cfg_path), progress=False)
    seconds = time.perf_counter() - t
    after = io_counters()
    report = json.loads((Path(load_config(cfg_path).run_dir) / "data_report.json").read_text())
    return {
        "seconds": seconds,
        "ok": len(records),
        "rows": report["total"],
        "image_bytes_read": report["files"]["bytes_read"],
        "files_read": report["files"]["read"],
        "process_bytes_read": after["rchar"] - before["rchar"],
        "storage_bytes_read": after["read_bytes"] - before["read_bytes"],
    }


def splits_of(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "splits.csv", newline="", encoding="utf-8") as f:
        return {r["sha256"]: r["split"] for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 k rows instead of 200 k")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    n = args.n or (20_000 if args.quick else 200_000)
    logging.getLogger("samprobe").setLevel(logging.WARNING)
    root = Path(args.dir or tempfile.mkdtemp(prefix="samprobe-bench-validate-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        rows = write_pngs(root, n)
        cfg = write_project(root, rows)
        generate_s = time.perf_counter() - t
        files = [root / "images" / rel for rel, _ in rows]
        workers = check_workers()
        raw_s, raw_bytes = raw_read_seconds(files, workers)
        pooled = {}
        for how in ("threads", "processes"):
            t = time.perf_counter()
            validate(load_config(cfg).data, processes=how == "processes")
            pooled[how] = time.perf_counter() - t
        first = timed_validate(cfg)
        splits_before = splits_of(root / "run")
        rng = np.random.default_rng(1)
        touched = rng.choice(n, int(n * TOUCHED_SHARE), replace=False)
        later = time.time_ns() + 1_000_000_000
        for i in touched:
            os.utime(files[i], ns=(later, later))
        second = timed_validate(cfg)
        splits_after = splits_of(root / "run")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    moved = sum(splits_after.get(k) != s for k, s in splits_before.items())
    reread = second["image_bytes_read"] / max(1, first["image_bytes_read"])
    out = {
        "bench": "validate",
        "quick": args.quick,
        "rows": n,
        "workers": {"threads": workers, "processes": check_workers(processes=True)},
        "load": os.getloadavg()[0],
        "generate_s": round(generate_s, 1),
        "image_bytes": raw_bytes,
        "rows_per_s": {
            "first": round(n / first["seconds"]),
            "rerun": round(n / second["seconds"]),
            "raw_read": round(n / raw_s),
            "threads": round(n / pooled["threads"]),
            "processes": round(n / pooled["processes"]),
        },
        "bytes_read": {
            "first": {k: first[k] for k in first if "bytes" in k or k == "files_read"},
            "second": {k: second[k] for k in second if "bytes" in k or k == "files_read"},
        },
        "touched_files": len(touched),
        "images_moved_split": moved,
        "ratios": {
            "reread_share": round(reread, 5),
            "reread_share_process": round(
                second["process_bytes_read"] / max(1, first["process_bytes_read"]), 5
            ),
            "vs_raw_read": round(raw_s / first["seconds"], 3),
            "processes_vs_threads": round(pooled["threads"] / pooled["processes"], 2),
            "rerun_speedup": round(first["seconds"] / second["seconds"], 2),
        },
        "targets": {"reread_share": TARGET_REREAD_SHARE},
        "pass": bool(reread <= TARGET_REREAD_SHARE and moved == 0 and first["ok"] > 0),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
