"""Extraction: images -> pooled features in the cache, skipping what is already there.

Decoding runs in worker processes (``data.loader``); the device does normalisation, the
encoder and pooling under autocast. Each batch is committed to the cache as it finishes, so a
killed run loses at most the batch in flight and the next run resumes from there.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from samprobe.backbones.precision import autocast_context, resolve_device, resolve_precision
from samprobe.backbones.registry import Backbone, build_backbone, fingerprint
from samprobe.config import Config
from samprobe.data.loader import LoadItem, make_loader
from samprobe.data.metadata import Record
from samprobe.features.cache import FeatureCache

log = logging.getLogger("samprobe")


@dataclass
class ExtractResult:
    extracted: int = 0
    cached: int = 0
    seconds: float = 0.0
    failures: list[tuple[Record, str]] = field(default_factory=list)


@dataclass
class Extractor:
    """A built backbone plus everything needed to run it and to find its cache."""

    backbone: Backbone
    pooling: list[str]
    dtype: str
    device: torch.device
    precision: str
    fingerprint: str

    @property
    def dim(self) -> int:
        dims = self.backbone.feature_dims()
        return sum(dims[p] for p in self.pooling)

    @classmethod
    def from_config(cls, cfg: Config) -> "Extractor":
        if cfg.device != "cpu":
            # Must be set before CUDA initialises; the user's own setting wins.
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        device = resolve_device(cfg.device)
        precision = resolve_precision(device, cfg.precision)
        backbone = build_backbone(cfg.backbone).to(device)
        pooling = list(cfg.features.pooling) if cfg.features.pooling else list(backbone.default_pooling)
        backbone.check_pooling(pooling)
        return cls(backbone, pooling, cfg.features.dtype, device, precision,
                   fingerprint(backbone, pooling, cfg.features.dtype))

    def open_cache(self, cfg: Config) -> FeatureCache:
        meta = {"backbone": self.backbone.identity(), "pooling": self.pooling, "input_size": self.backbone.input_size}
        return FeatureCache(cfg.features.cache_dir, self.fingerprint, self.dim, self.dtype, meta)

    @torch.inference_mode()
    def encode_batch(self, images: torch.Tensor, valid_hw: torch.Tensor) -> np.ndarray:
        images = images.to(self.device, non_blocking=True)
        valid_hw = valid_hw.to(self.device)
        with autocast_context(self.device, self.precision):
            feats = self.backbone.encode(images, valid_hw, self.pooling)
        return feats.float().cpu().numpy()

    def run(self, records: Sequence[Record], cache: FeatureCache, batch_size: int, num_workers: int,
            max_pixels: int | None = None, progress: bool = True) -> ExtractResult:
        """Extract every record whose key is not in the cache yet."""
        result = ExtractResult()
        todo_keys = set(cache.missing(r.sha256 for r in records))
        todo = [r for r in records if r.sha256 in todo_keys]
        todo = list({r.sha256: r for r in todo}.values())  # same bytes twice: extract once
        result.cached = len(records) - len([r for r in records if r.sha256 in todo_keys])
        if not todo:
            return result
        items = [LoadItem(r.sha256, r.file, i) for i, r in enumerate(todo)]
        target = self.backbone.input_size if self.backbone.decode_longest_side else None
        loader = make_loader(items, self.backbone.preparer(), batch_size, num_workers, target, max_pixels,
                             pin_memory=self.device.type == "cuda")
        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress, dynamic_ncols=True)
        for batch in loader:
            for tag, reason in batch.failures:
                result.failures.append((todo[tag], reason))
            if batch.tags:
                feats = self.encode_batch(batch.images, batch.valid_hw)
                cache.put(batch.keys, feats)
                result.extracted += len(batch.tags)
            bar.update(len(batch.tags) + len(batch.failures))
        bar.close()
        result.seconds = time.perf_counter() - start
        return result


def load_features(cache: FeatureCache, records: Sequence[Record]) -> np.ndarray:
    """[N, D] float32 features in record order (every record must be in the cache)."""
    return cache.get([r.sha256 for r in records]) if records else np.zeros((0, cache.dim), np.float32)


def image_features(extractor: Extractor, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Pooled features of in-memory RGB uint8 images (notebook API; no cache)."""
    out = []
    for i in range(0, len(images), batch_size):
        prepared = [extractor.backbone.prepare(im) for im in images[i:i + batch_size]]
        batch = torch.stack([p[0] for p in prepared])
        hw = torch.tensor([p[1] for p in prepared], dtype=torch.int64)
        out.append(extractor.encode_batch(batch, hw))
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)
