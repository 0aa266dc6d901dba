"""Head checkpoints: the schema of ``best.pt`` / ``last.pt`` / ``epoch_NNNN.pt`` and the checks
that a checkpoint fits the features, data and run it is used with.

On disk a checkpoint is a dict of plain tensors and builtins only, so
``torch.load(weights_only=True)`` reads it; ``HeadCheckpoint.to_dict`` / ``from_dict`` convert,
as nanoGPT stores ``model_args`` and rebuilds ``GPTConfig(**model_args)``. Written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samprobe.data.records import Record
from samprobe.data.splits import content_keys, image_set
from samprobe.errors import CheckpointError
from samprobe.io import atomic_torch_save
from samprobe.train.classes import ClassMapping

log = logging.getLogger("samprobe")

FORMAT = "samprobe.head"
# bump when a field changes meaning or is removed; from_dict refuses other versions
FORMAT_VERSION = 1


@dataclass
class FeatureSource:
    """What produced the features the head reads (``backbone`` on disk)."""

    config: dict[str, Any]  # the BackboneConfig, as JSON
    fingerprint: str  # names the cache folder; another fingerprint means other features
    weights_sha256: str | None  # predict finds moved weights by it (None: timm's own weights)
    precision: str  # resolved (bf16, not auto): another device computes features as these were
    pooling: list[str]
    dtype: str  # cache dtype
    input_size: int


@dataclass
class ImageSet:
    """A split's images as a checkpoint records them (``data.splits.image_set``)."""

    n: int
    digest: str  # sha256 of the sorted image sha256s
    keys: torch.Tensor  # int64 content keys [n], sorted: which evaluated images were trained on

    @classmethod
    def of(cls, records: list[Record]) -> ImageSet:
        info = image_set(r.sha256 for r in records)
        return cls(info["n"], info["digest"], torch.from_numpy(info["keys"]))


@dataclass
class HeadCheckpoint:
    classes: dict[str, Any]  # ClassMapping.to_dict()
    class_weights: list[float]
    backbone: FeatureSource
    cache_dir: str
    config: dict[str, Any]  # the run's whole Config, as JSON
    train_images: ImageSet
    val_images: ImageSet
    head_spec: dict[str, Any]  # rebuilds the head: heads.head_from_spec(head_spec, head_state)
    head_state: dict[str, torch.Tensor]
    epoch: int
    metrics: dict[str, Any]  # the epoch's row of the sweep (best.pt: the best head's best epoch)
    train_state: dict[str, Any] | None = None  # last.pt / epoch_NNNN.pt: SweepTrainer.state_dict()
    sweep: list[dict[str, Any]] | None = None  # best.pt: every head's best row

    @property
    def mapping(self) -> ClassMapping:
        return ClassMapping.from_dict(self.classes)

    @property
    def spatial(self) -> int | None:
        """Grid side the head reads (attentive), None for pooled features."""
        return self.head_spec["spatial"] if self.head_spec["kind"] == "attentive" else None

    def with_head(
        self, spec: dict[str, Any], state: dict[str, torch.Tensor], **changes: Any
    ) -> HeadCheckpoint:
        return dataclasses.replace(self, head_spec=spec, head_state=state, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": f"{FORMAT}/{FORMAT_VERSION}",
            "classes": self.classes,
            "class_weights": self.class_weights,
            "backbone": dataclasses.asdict(self.backbone),
            "cache_dir": self.cache_dir,
            "config": self.config,
            "train_images": dataclasses.asdict(self.train_images),
            "val_images": dataclasses.asdict(self.val_images),
            "head": {"spec": self.head_spec, "state_dict": self.head_state},
            "epoch": self.epoch,
            "metrics": self.metrics,
        }
        for optional in ("train_state", "sweep"):
            if getattr(self, optional) is not None:
                out[optional] = getattr(self, optional)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = "<checkpoint>") -> HeadCheckpoint:
        try:
            return cls(
                classes=d["classes"],
                class_weights=list(d["class_weights"]),
                backbone=FeatureSource(**d["backbone"]),
                cache_dir=d["cache_dir"],
                config=d["config"],
                train_images=ImageSet(**d["train_images"]),
                val_images=ImageSet(**d["val_images"]),
                head_spec=d["head"]["spec"],
                head_state=d["head"]["state_dict"],
                epoch=int(d["epoch"]),
                metrics=d["metrics"],
                train_state=d.get("train_state"),
                sweep=d.get("sweep"),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is a samprobe head checkpoint with a missing or unexpected field ({exc})",
                fix="pass a checkpoint written by this samprobe version's `samprobe train`",
            ) from None


def save_checkpoint(ckpt: HeadCheckpoint, path: Path) -> None:
    atomic_torch_save(ckpt.to_dict(), path)


def load_checkpoint(path: Path | str) -> HeadCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            fix="pass --checkpoint RUN_DIR/checkpoints/best.pt from a finished `samprobe train`",
        )
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or a pickle that wants code
        first_line = str(exc).splitlines()[0][:200]
        raise CheckpointError(
            f"{path} cannot be read as a samprobe checkpoint ({type(exc).__name__}: {first_line})",
            fix="pass a checkpoints/best.pt written by `samprobe train`",
        ) from None
    found = d.get("format") if isinstance(d, dict) else type(d).__name__
    if not isinstance(d, dict) or not str(found).startswith(f"{FORMAT}/"):
        raise CheckpointError(
            f"{path} is not a samprobe head checkpoint (format {found!r})",
            fix="pass checkpoints/best.pt from a samprobe run; SAM weights go in "
            "backbone.checkpoint",
        )
    if found != f"{FORMAT}/{FORMAT_VERSION}":
        raise CheckpointError(
            f"{path} is a samprobe head checkpoint of format {found!r}; this samprobe reads "
            f"{FORMAT}/{FORMAT_VERSION}",
            fix="train the head again with this samprobe version, or use the version that wrote it",
        )
    return HeadCheckpoint.from_dict(d, path)


# --- checks: does the checkpoint fit what it is used with ------------------------------------


def check_resumable(
    ckpt: HeadCheckpoint,
    path: Path | str,
    *,
    fingerprint: str,
    mapping: ClassMapping,
    train_images: ImageSet,
    val_images: ImageSet,
) -> None:
    """CheckpointError unless ``ckpt`` continues this run: its state, features, classes and the
    very train and val images."""
    if ckpt.train_state is None:
        raise CheckpointError(
            f"{path} holds no training state to resume from",
            fix="resume from the run's checkpoints/last.pt, or train without --resume",
        )
    if ckpt.backbone.fingerprint != fingerprint:
        raise CheckpointError(
            f"{path} was trained on features {ckpt.backbone.fingerprint}, this config gives "
            f"{fingerprint}",
            fix="resume with the run's own config (run_dir/config.yaml), or train without --resume",
        )
    if ckpt.classes != mapping.to_dict():
        raise CheckpointError(
            f"{path} was trained with other classes or splits than this config gives",
            fix="resume with the run's own config and splits.csv, or train without --resume",
        )
    for split, saved, now in (
        ("train", ckpt.train_images, train_images),
        ("val", ckpt.val_images, val_images),
    ):
        if saved.digest != now.digest:
            common = int(np.isin(now.keys.numpy(), saved.keys.numpy()).sum())
            raise CheckpointError(
                f"{path} was trained on {saved.n} {split} images, this run's splits.csv has "
                f"{now.n} "
                f"({common} of them the same): the data or the splits changed since, so the run "
                f"would not continue as it started",
                fix="resume with the data the run started with, or train without --resume (a "
                "fresh run)",
            )


def check_no_training_images(
    ckpt: HeadCheckpoint, checkpoint: Path, split: str, recs: list[Record]
) -> None:
    """CheckpointError when images of the evaluated split were in the checkpoint's train (or, for
    test, val) split: its metrics on them would be inflated."""
    seen_in = {"test": ("train", "val"), "val": ("train",)}.get(split, ())
    for name in seen_in:
        saved: ImageSet = getattr(ckpt, f"{name}_images")
        seen = np.isin(content_keys(r.sha256 for r in recs), saved.keys.numpy())
        if seen.any():
            raise CheckpointError(
                f"{int(seen.sum())} of the {len(recs)} {split} images were {name} images "
                f"of {checkpoint} (the splits changed since it was trained): its {split} metrics "
                "would be inflated",
                fix="evaluate with the splits the checkpoint was trained on (its run's "
                "splits.csv), or train again on the current splits",
            )


def check_fingerprint(ckpt: HeadCheckpoint, extractor: Any, source: str) -> None:
    """The extractor (``features.extract.Extractor``) gives the checkpoint's features: same
    backbone, weights, pooling, dtype and the checkpoint's precision (an extractor running at
    another precision, because the checkpoint's does not run on this device, is checked as if it
    ran at the checkpoint's)."""
    from samprobe.backbones.registry import fingerprint

    trained_at = ckpt.backbone.precision
    ours = (
        extractor.fingerprint
        if trained_at == extractor.precision
        else fingerprint(extractor.backbone, extractor.pooling, extractor.dtype, trained_at)
    )
    if ckpt.backbone.fingerprint != ours:
        raise CheckpointError(
            f"the checkpoint was trained on features {ckpt.backbone.fingerprint} "
            f"({ckpt.backbone.config['name']}, pooling {ckpt.backbone.pooling}) but {source} "
            f"gives {ours}",
            fix="use the config (backbone, checkpoint, img_size, pooling, dtype) the head was "
            "trained with",
        )


def rotate_epoch_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
