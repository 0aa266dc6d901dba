"""Classify new images with a trained head: the CLI's ``predict`` and a notebook API.

    clf = Classifier.load("runs/exp1/checkpoints/best.pt")
    clf.predict([PIL.Image.open("cat.jpg"), "dog.png", numpy_rgb_array])
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from samprobe.config import BackboneConfig, Config
from samprobe.data.images import decode_rgb, to_rgb
from samprobe.data.metadata import IMAGE_SUFFIXES, Record
from samprobe.errors import DataError
from samprobe.features.cache import FeatureCache
from samprobe.features.extract import Extractor, image_features, image_grids, load_head_inputs
from samprobe.io import atomic_open, sha256_file
from samprobe.pipeline import check_fingerprint, head_spatial, predict_features, stored_precision
from samprobe.train.checkpoint import load_checkpoint
from samprobe.train.classes import ClassMapping

log = logging.getLogger("samprobe")


@dataclass
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]


class Classifier:
    def __init__(self, ckpt: dict[str, Any], extractor: Extractor, source: str) -> None:
        self.ckpt = ckpt
        self.extractor = extractor
        self.mapping = ClassMapping.from_dict(ckpt["classes"])
        self.spatial = head_spatial(ckpt["head"]["spec"])  # attentive heads read the token grid
        check_fingerprint(ckpt, extractor, f"the backbone of {source}")

    @classmethod
    def load(cls, checkpoint: Path | str, device: str = "auto", precision: str | None = None) -> "Classifier":
        """``precision`` None: the one the head was trained with, or the closest that runs on this
        device (``runnable_precision``: a head trained on fp16 GPU features predicts on the CPU at fp32)."""
        from samprobe.backbones.precision import resolve_device, runnable_precision

        ckpt = load_checkpoint(checkpoint)
        trained_at = stored_precision(ckpt)
        run_at = runnable_precision(resolve_device(device), trained_at) if precision is None and trained_at else None
        precision = precision or ckpt["config"].get("precision", "auto")
        cfg = Config(device=device, precision=precision, backbone=BackboneConfig(**ckpt["backbone"]["config"]))
        cfg.features.pooling = list(ckpt["backbone"]["pooling"])
        cfg.features.dtype = ckpt["backbone"]["dtype"]
        cfg.features.spatial = head_spatial(ckpt["head"]["spec"])  # the extractor then also computes (and caches) the grid
        extractor = Extractor.from_config(cfg, precision=run_at)
        other = trained_at not in (None, extractor.precision)
        log.info(f"predict: features at precision {extractor.precision} on {extractor.device}"
                 + (f" (the head was trained on {trained_at} features)" if other else ""))
        return cls(ckpt, extractor, str(checkpoint))

    def _predictions(self, feats: np.ndarray, top_k: int) -> list[Prediction]:
        idx, scores = predict_features(self.ckpt, feats, top_k)
        tax = self.mapping.taxonomy
        return [Prediction(tax[row[0]], float(sc[0]), [(tax[i], float(s)) for i, s in zip(row, sc)])
                for row, sc in zip(idx, scores)]

    def predict(self, images: Sequence[Image.Image | np.ndarray | str | Path], top_k: int = 5) -> list[Prediction]:
        arrays = []
        for im in images:
            if isinstance(im, (str, Path)):
                arrays.append(decode_rgb(Path(im)))
            elif isinstance(im, Image.Image):
                arrays.append(np.asarray(to_rgb(im)))
            else:
                arr = np.asarray(im)
                if arr.dtype != np.uint8:
                    raise DataError(f"Classifier.predict got a {arr.dtype} array; images must be uint8 (0-255)",
                                    fix="pass (array * 255).round().astype(np.uint8) for 0-1 floats, or a PIL image")
                arrays.append(np.asarray(to_rgb(Image.fromarray(arr))))  # grey, RGBA -> RGB as for files
        # Features go through the cache dtype so results match cached evaluation exactly.
        if self.spatial:
            feats = image_grids(self.extractor, arrays)  # [N, S*S, C]
        else:
            feats = image_features(self.extractor, arrays).astype(self.extractor.dtype).astype(np.float32)
        return self._predictions(feats, top_k)


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files, folders (recursive) and metadata files (csv/jsonl with a ``path`` column)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.suffix.lower() in (".csv", ".jsonl", ".parquet"):
            from samprobe.config import DataConfig
            from samprobe.data.metadata import read_rows

            rows, _ = read_rows(DataConfig(metadata=p))
            for i, r in enumerate(rows, start=1):
                if not r or not str(r.get("path") or "").strip():
                    raise DataError(f"predict input {p}, data row {i}, has no 'path' value",
                                    fix="give every row a path (relative to the file's folder) in a column named path")
                out.append(p.parent / str(r["path"]).strip())
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"predict input {p} does not exist", fix="pass image files, folders or a metadata csv/jsonl")
    return out


def run_predict(checkpoint: Path, inputs: Sequence[str], out_csv: Path, top_k: int = 5,
                device: str = "auto", num_workers: int = 0, batch_size: int = 8) -> int:
    clf = Classifier.load(checkpoint, device=device)
    files = collect_inputs(inputs)
    if not files:
        raise DataError("no images found in the predict inputs", fix="pass image files, folders or a metadata file")
    records, errors = [], {}
    for i, f in enumerate(files):
        try:
            records.append(Record(i, str(f), str(f.resolve()), "", None, sha256_file(f)))
        except OSError as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
    cache_dir = Path(clf.ckpt.get("cache_dir") or out_csv.parent / ".samprobe-cache")
    try:
        cache = clf.extractor.open_cache(Config(features={"cache_dir": cache_dir}))  # type: ignore[arg-type]
    except Exception:  # the training cache may be gone or read-only: use a private one
        cache = FeatureCache(out_csv.parent / ".samprobe-cache", clf.extractor.fingerprint, clf.extractor.dim, clf.extractor.dtype)
    with cache:
        result = clf.extractor.run(records, cache, batch_size, num_workers, progress=True)
        errors.update({r.row: reason for r, reason in result.failures})
        good = [r for r in records if r.row not in errors]
        preds = clf._predictions(load_head_inputs(cache, good, clf.spatial), top_k) if good else []
    by_row = dict(zip((r.row for r in good), preds))
    with atomic_open(out_csv, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", "top_k", "error"])
        for i, path in enumerate(files):
            p = by_row.get(i)
            if p is None:
                w.writerow([str(path), "", "", "", errors.get(i, "not predicted")])
            else:
                w.writerow([str(path), p.label, f"{p.score:.6f}", "|".join(f"{n}:{s:.4f}" for n, s in p.top_k), ""])
    log.info(f"predict: {len(by_row)} images classified, {len(files) - len(by_row)} failed; wrote {out_csv}")
    return len(files) - len(by_row)
