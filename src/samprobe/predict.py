"""Classify new images with a trained head: the CLI's ``predict`` and a notebook API.

clf = Classifier.load("runs/exp1/checkpoints/best.pt")   # weights=PATH when the SAM weights moved
clf.predict([PIL.Image.open("cat.jpg"), "dog.png", numpy_rgb_array])
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samprobe.config import BackboneConfig, Config
from samprobe.data.images import to_rgb
from samprobe.data.records import IMAGE_SUFFIXES, Record
from samprobe.errors import CheckpointError, DataError
from samprobe.features.extract import Extractor, load_head_inputs
from samprobe.io import atomic_open, ensure_writable_file, sha256_file, weights_sha256
from samprobe.train.checkpoint import HeadCheckpoint, check_fingerprint, load_checkpoint
from samprobe.train.heads import head_from_spec, rows_per_step
from samprobe.train.stream import CachedRows

log = logging.getLogger("samprobe")


def predict_features(
    ckpt: HeadCheckpoint, x: np.ndarray | CachedRows, *, top_k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Cached features [N, D] (attentive heads: grids [N, S*S, C]) -> (top-k taxonomy indices [N, k],
    their probabilities [N, k]). ``x`` a ``CachedRows`` (a split over ``train.memory_budget_gb``):
    read from the shard files a buffer at a time. Only the top k of each batch is kept, never the
    [N, classes] probabilities."""
    head = head_from_spec(ckpt.head_spec, ckpt.head_state)
    mapping = ckpt.mapping
    k = min(top_k, mapping.num_active)
    idx = np.empty((len(x), k), dtype=np.int64)
    scores = np.empty((len(x), k), dtype=np.float32)
    rows = rows_per_step(int(np.prod(x.shape[1:])), max(len(x), 1))  # grids: bounded activations
    if isinstance(x, CachedRows):
        batches: Iterator[torch.Tensor] = x.in_storage_order(rows)
        order = x.storage_order  # the i-th row read is row order[i] of x
    else:
        batches = (torch.from_numpy(x[i : i + rows]).float() for i in range(0, len(x), rows))
        order = np.arange(len(x))
    at = 0
    with torch.no_grad():
        for batch in batches:
            top = torch.softmax(head(batch), dim=1).topk(k, dim=1)
            where = order[at : at + len(batch)]
            scores[where], idx[where] = top.values.numpy(), top.indices.numpy()
            at += len(batch)
    return np.array(mapping.active, dtype=np.int64)[idx], scores


@dataclass
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]


class Classifier:
    def __init__(self, ckpt: HeadCheckpoint, extractor: Extractor, source: str) -> None:
        self.ckpt = ckpt
        self.extractor = extractor
        self.mapping = ckpt.mapping
        self.spatial = ckpt.spatial  # attentive heads read the token grid
        check_fingerprint(ckpt, extractor, f"the backbone of {source}")

    @classmethod
    def load(
        cls,
        checkpoint: Path | str,
        device: str = "auto",
        precision: str | None = None,
        weights: Path | str | None = None,
    ) -> Classifier:
        """``precision`` None: the one the head was trained with, or the closest that runs on this
        device (``runnable_precision``: a head trained on fp16 GPU features predicts on the CPU at fp32).
        ``weights``: the backbone weights file, when it is no longer where training read it (by default
        it is looked for there, then by name and content next to the checkpoint and in weights/ folders)."""
        from samprobe.device import resolve_device, runnable_precision

        ckpt = load_checkpoint(checkpoint)
        trained_at = ckpt.backbone.precision
        run_at = (
            runnable_precision(resolve_device(device), trained_at) if precision is None else None
        )
        precision = precision or ckpt.config.get("precision", "auto")
        backbone = dict(ckpt.backbone.config)
        if weights is not None or backbone.get("checkpoint"):
            backbone["checkpoint"] = str(find_weights(ckpt, Path(checkpoint), weights))
        cfg = Config(device=device, precision=precision, backbone=BackboneConfig(**backbone))
        cfg.features.pooling = list(ckpt.backbone.pooling)
        cfg.features.dtype = ckpt.backbone.dtype
        # the extractor then also computes (and caches) the grid
        cfg.features.spatial = ckpt.spatial
        extractor = Extractor.from_config(cfg, precision=run_at)
        other = trained_at != extractor.precision
        log.info(
            f"predict: features at precision {extractor.precision} on {extractor.device}"
            + (f" (the head was trained on {trained_at} features)" if other else "")
        )
        return cls(ckpt, extractor, str(checkpoint))

    def _predictions(self, feats: np.ndarray, top_k: int) -> list[Prediction]:
        idx, scores = predict_features(self.ckpt, feats, top_k=top_k)
        tax = self.mapping.taxonomy
        return [
            Prediction(tax[row[0]], float(sc[0]), [(tax[i], float(s)) for i, s in zip(row, sc)])
            for row, sc in zip(idx, scores)
        ]

    def predict(
        self,
        images: Sequence[Image.Image | np.ndarray | str | Path],
        top_k: int = 5,
        *,
        batch_size: int = 8,
    ) -> list[Prediction]:
        """``batch_size``: images per encoder forward pass (bounds the activations' memory)."""
        prepared = [self.prepare(as_rgb_array(im, self.decode)) for im in images]
        preds: list[Prediction] = []
        for i in range(0, len(prepared), batch_size):
            preds.extend(self.predict_prepared(prepared[i : i + batch_size], top_k=top_k))
        return preds

    def decode(self, source: Path | bytes, max_pixels: int | None = None) -> np.ndarray:
        """An image file or its bytes -> HxWx3 uint8 RGB, decoded as extraction decoded the images
        the head was trained on (``Backbone.decode``)."""
        return self.extractor.backbone.decode(source, max_pixels)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """HxWx3 uint8 RGB -> what the encoder reads (resized, on the host). No model involved:
        safe to run on other threads while ``predict_prepared`` encodes (``samprobe serve``)."""
        return self.extractor.backbone.prepare(image)

    def predict_prepared(
        self, prepared: Sequence[PreparedImage], top_k: int = 5
    ) -> list[Prediction]:
        """``prepare``'s outputs, all in one encoder forward pass -> one prediction each."""
        if not prepared:
            return []
        batch = torch.stack([p[0] for p in prepared])
        valid_hw = torch.tensor([p[1] for p in prepared], dtype=torch.int64)
        # Features go through the cache dtype so results match cached evaluation exactly.
        if self.spatial:
            grid = self.extractor.encode_arrays(batch, valid_hw, grid=True)[1]  # [N, S*S, C]
            feats = grid.astype(np.float32)
        else:
            feats = self.extractor.encode_batch(batch, valid_hw)
            feats = feats.astype(self.extractor.dtype).astype(np.float32)
        return self._predictions(feats, top_k)


PreparedImage = tuple[torch.Tensor, tuple[int, int]]
"""uint8 [3, S, S] and the valid (h, w) inside it: ``Backbone.prepare``'s output."""


def as_rgb_array(
    image: Image.Image | np.ndarray | str | Path, decode: Callable[[Path], np.ndarray]
) -> np.ndarray:
    """A path (read with ``decode``), PIL image or array -> HxWx3 uint8 RGB, as
    ``Classifier.predict`` reads each input."""
    if isinstance(image, (str, Path)):
        return decode(Path(image))
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(
            f"Classifier.predict got a {arr.dtype} array; images must be uint8 (0-255)",
            fix="pass (array * 255).round().astype(np.uint8) for 0-1 floats, or a PIL image",
        )
    return np.asarray(to_rgb(Image.fromarray(arr)))  # grey, RGBA -> RGB as for files


def _weights_places(checkpoint: Path) -> list[Path]:
    """Folders where moved weights are looked for: the checkpoint's, its run's and project's, each
    with its weights/ subfolder, and ./weights (where `samprobe weights download` puts them)."""
    out: list[Path] = []
    for folder in list(checkpoint.resolve().parents)[:3]:
        out += [folder, folder / "weights"]
    out.append(Path.cwd() / "weights")
    return [p for i, p in enumerate(out) if p.is_dir() and p not in out[:i]]


def find_weights(ckpt: HeadCheckpoint, checkpoint: Path, weights: Path | str | None = None) -> Path:
    """The backbone weights file for a head checkpoint: ``weights`` if given; else where training
    read it; else a file of the same name, or of the same sha256 (recorded in the checkpoint), in
    ``_weights_places``. CheckpointError when none is found (the fingerprint check then proves the
    file found is the one trained with)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise CheckpointError(
                f"--weights {weights} does not exist",
                fix="pass the backbone weights file the head was trained with",
            )
        return Path(weights)
    trained = Path(ckpt.backbone.config["checkpoint"])
    if trained.is_file():
        return trained
    places = _weights_places(checkpoint)
    by_name = [p / trained.name for p in places if (p / trained.name).is_file()]
    if by_name:
        log.info(f"predict: backbone weights {trained} moved; using {by_name[0]}")
        return by_name[0]
    want = ckpt.backbone.weights_sha256
    if want:
        for p in places:
            for f in sorted(p.iterdir()):
                if (
                    f.suffix in (".pth", ".pt", ".bin", ".safetensors")
                    and f.is_file()
                    and weights_sha256(f) == want
                ):
                    log.info(
                        f"predict: backbone weights {trained} moved; found the same file (sha256) "
                        f"at {f}"
                    )
                    return f
    raise CheckpointError(
        f"the backbone weights {trained} the head was trained with do not exist (moved or "
        f"deleted), and no "
        f"file of that name or content is next to {checkpoint} or in a weights/ folder",
        fix="pass --weights PATH to predict (Classifier.load(..., weights=PATH) in Python), or "
        "put the file next to the checkpoint",
    )


def training_image_root(ckpt: HeadCheckpoint) -> Path | None:
    """Where the training metadata's paths were relative to (data.image_root, else the metadata's folder)."""
    data = ckpt.config.get("data", {})
    if data.get("image_root"):
        return Path(data["image_root"])
    return Path(data["metadata"]).parent if data.get("metadata") else None


def collect_inputs(
    inputs: Sequence[str], image_root: Path | None = None, path_column: str = "path"
) -> list[Path]:
    """Image files, folders (recursive) and metadata files (csv/jsonl with a ``path_column``);
    a metadata file's relative paths are under ``image_root`` (None: the file's own folder)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(
                sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif p.suffix.lower() in (".csv", ".jsonl", ".parquet"):
            from samprobe.config import DataConfig
            from samprobe.data.tables import read_rows

            rows, _ = read_rows(DataConfig(metadata=p))
            root = image_root if image_root is not None else p.parent
            for i, r in enumerate(rows, start=1):
                if not r or not str(r.get(path_column) or "").strip():
                    raise DataError(
                        f"predict input {p}, data row {i}, has no {path_column!r} value",
                        fix=f"give every row a path (relative to --image-root, {root}) in a "
                        f"column named {path_column}",
                    )
                out.append(root / str(r[path_column]).strip())
        elif p.exists():
            out.append(p)
        else:
            raise DataError(
                f"predict input {p} does not exist",
                fix="pass image files, folders or a metadata csv/jsonl",
            )
    return out


def run_predict(
    checkpoint: Path,
    inputs: Sequence[str],
    out_csv: Path,
    *,
    top_k: int = 5,
    device: str = "auto",
    num_workers: int = 0,
    batch_size: int = 8,
    image_root: Path | None = None,
    weights: Path | None = None,
    cache_dir: Path | None = None,
) -> int:
    """Classify ``inputs`` into ``out_csv``; returns the number that failed. A metadata file's paths
    are under ``image_root`` (default: the training config's). Features go to ``cache_dir`` when
    given (e.g. the training cache, to reuse them), else to a temporary cache removed after:
    predict never writes into the training cache unless asked. DataError when nothing was classified."""
    ensure_writable_file(out_csv, "--out", "predictions.csv")  # before any image is read or encoded
    clf = Classifier.load(checkpoint, device=device, weights=weights)
    data = clf.ckpt.config.get("data", {})
    root = image_root if image_root is not None else training_image_root(clf.ckpt)
    files = collect_inputs(inputs, root, data.get("path_column") or "path")
    if not files:
        raise DataError(
            "no images found in the predict inputs",
            fix="pass image files, folders or a metadata file",
        )
    records, errors = [], {}
    for i, f in enumerate(files):
        try:
            records.append(Record(i, str(f), str(f.resolve()), "", None, sha256_file(f)))
        except OSError as exc:
            errors[i] = f"{type(exc).__name__}: {exc}"
    with tempfile.TemporaryDirectory(prefix="samprobe-predict-") as private:
        cache = clf.extractor.open_cache(Path(cache_dir or private))
        with cache:
            result = clf.extractor.run(
                records, cache, batch_size=batch_size, num_workers=num_workers, progress=True
            )
            errors.update({r.row: reason for r, reason in result.failures})
            good = [r for r in records if r.row not in errors]
            preds = (
                clf._predictions(load_head_inputs(cache, good, clf.spatial), top_k) if good else []
            )
    by_row = dict(zip((r.row for r in good), preds))
    with atomic_open(out_csv, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", "top_k", "error"])
        for i, path in enumerate(files):
            p = by_row.get(i)
            if p is None:
                w.writerow([str(path), "", "", "", errors.get(i, "not predicted")])
            else:
                w.writerow(
                    [
                        str(path),
                        p.label,
                        f"{p.score:.6f}",
                        "|".join(f"{n}:{s:.4f}" for n, s in p.top_k),
                        "",
                    ]
                )
    log.info(
        f"predict: {len(by_row)} images classified, {len(files) - len(by_row)} failed; wrote "
        f"{out_csv}"
    )
    if not by_row:
        first = next(iter(errors.items()), (0, "not predicted"))
        raise DataError(
            f"none of the {len(files)} images could be classified (first: {files[first[0]]}: "
            f"{first[1]}); the reasons are in {out_csv}",
            fix=f"check the paths: a metadata file's paths are relative to --image-root (default "
            f"the training data.image_root, here {root})",
        )
    return len(files) - len(by_row)
