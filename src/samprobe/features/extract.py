"""Extraction: images -> pooled features (and, with ``features.spatial``, a token grid) in the
cache, skipping what is already there.

Three stages overlap: worker processes decode the next batches (``data.loader``, prefetch),
the main thread copies a batch to the device (pinned memory, non_blocking) and runs the encoder
under autocast, and one writer thread commits finished batches to the cache. Each batch is
committed as it finishes, so a killed run loses at most the batches in flight and the next
run resumes from there. On CUDA out-of-memory a batch is split in halves and retried, down to
one image; later batches are cut to the size that worked.

Distributed: under ``torchrun`` (env RANK / WORLD_SIZE, one host or several) each rank extracts
a disjoint slice of the missing keys on the GPU of its LOCAL_RANK and writes its own shards and
its own manifest (``features.manifest``); only rank 0 opens the SQLite index, to plan and, after
a barrier, to merge the manifests and compact (``features.ranks``).

On CUDA nothing in the batch loop waits for the GPU: batches arrive pinned, sizes stay on the
host, and results are copied back asynchronously into pinned buffers and read one batch later
(``PendingFeatures``), while the GPU already runs the next batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from samprobe.backbones.registry import Backbone, build_backbone, fingerprint, grid_array
from samprobe.config import Config
from samprobe.data.loader import LoadItem, make_loader
from samprobe.data.records import Record
from samprobe.device import (
    autocast_context,
    is_oom,
    resolve_device,
    resolve_precision,
)
from samprobe.errors import DeviceError
from samprobe.features.cache import FeatureCache, estimate_bytes
from samprobe.features.manifest import ManifestWriter

log = logging.getLogger("samprobe")
_TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ExtractResult:
    extracted: int = 0
    cached: int = 0
    seconds: float = 0.0
    failures: list[tuple[Record, str]] = field(default_factory=list)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_for_rank(keys: Sequence[str], rank: int, world: int) -> list[str]:
    """This rank's disjoint share of ``keys``: every key goes to exactly one rank, in a stable order."""
    return sorted(keys)[rank::world]


class PendingFeatures:
    """One encoded batch on its way to the host: (pooled [B, D], grid [B, T, C] or None) parts.

    On CUDA each part is copied with ``non_blocking`` into pinned host memory after an event;
    ``result`` waits for that event only, so the caller can launch the next batch first."""

    def __init__(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor | None, Any]] = []

    def add(self, feats: torch.Tensor, grid: torch.Tensor | None) -> None:
        if feats.device.type != "cuda":
            self._parts.append((feats.cpu(), None if grid is None else grid.cpu(), None))
            return
        host = [
            None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            for t in (feats, grid)
        ]
        for dst, src in zip(host, (feats, grid)):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._parts.append((host[0], host[1], done))  # type: ignore[arg-type]

    def extend(self, other: PendingFeatures) -> None:
        self._parts.extend(other._parts)

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        for _, _, done in self._parts:
            if done is not None:
                done.synchronize()
        feats = np.concatenate([f.numpy() for f, _, _ in self._parts])
        grids = [g for _, g, _ in self._parts]
        return feats, None if grids[0] is None else np.concatenate([g.numpy() for g in grids])


@dataclass
class Extractor:
    """A built backbone plus everything needed to run it and to find its cache."""

    backbone: Backbone
    pooling: list[str]
    dtype: str
    device: torch.device
    precision: str
    fingerprint: str
    spatial: int | None = None
    """Grid side stored beside the pooled features (``features.spatial``); None = pooled only."""
    max_batch: int | None = None
    """Largest batch known to fit after an out-of-memory split (None: no limit seen)."""

    @property
    def dim(self) -> int:
        return self.backbone.pooled_dim(self.pooling)

    @property
    def grid_dim(self) -> int:
        """Values per image in the grid array: spatial*spatial tokens x C channels (0 when off)."""
        return 0 if self.spatial is None else self.spatial**2 * self.backbone.grid_shape()[0]

    def arrays(self) -> list[str]:
        """Cache arrays every image must have: "pooled", plus the grid when enabled."""
        return ["pooled"] + ([grid_array(self.spatial)] if self.spatial else [])

    def missing(self, cache: FeatureCache, keys: Iterable[str]) -> set[str]:
        """Keys missing any of ``arrays()`` (e.g. the grid, after features.spatial was turned on)."""
        keys = list(keys)
        return {k for a in self.arrays() for k in cache.missing(keys, a)}

    def disk_need(self, cache: FeatureCache, keys: Sequence[str]) -> int:
        """Bytes the missing entries of every array will take (pooled and grid counted apart)."""
        need = estimate_bytes(len(cache.missing(keys)), self.dim, self.dtype)
        if self.spatial:
            need += estimate_bytes(
                len(cache.missing(keys, grid_array(self.spatial))), self.grid_dim, self.dtype
            )
        return need

    @classmethod
    def from_config(
        cls, cfg: Config, *, on_device: bool = True, precision: str | None = None
    ) -> Extractor:
        """``on_device=False``: for the fingerprint and cache only (train, evaluate, export, cache
        commands): the weights stay memory-mapped on the host, nothing is moved to or allocated
        on the GPU; such an extractor does not encode. ``precision``: an already resolved
        precision (a checkpoint's) instead of ``cfg.precision``."""
        if cfg.device != "cpu":
            # Must be set before CUDA initialises; the user's own setting wins.
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        device = resolve_device(cfg.device)
        precision = precision or resolve_precision(device, cfg.precision)
        backbone = build_backbone(cfg.backbone)
        if on_device:
            backbone = backbone.to(device)
            backbone.use_precision(device, precision)
        pooling = backbone.resolve_pooling(cfg.features.pooling)
        spatial = cfg.features.spatial
        if spatial is not None:
            backbone.check_spatial(spatial)
        # The grid is a second array under the same fingerprint: turning it on or off never
        # invalidates the pooled features.
        return cls(
            backbone,
            pooling,
            cfg.features.dtype,
            device,
            precision,
            fingerprint(backbone, pooling, cfg.features.dtype, precision),
            spatial,
        )

    def open_cache(self, cache_dir: Path, *, readonly: bool = False) -> FeatureCache:
        """This extractor's cache under ``cache_dir`` (``features.cache_dir``); ``readonly`` for
        stages that only read it (needs read access only)."""
        meta = {
            "backbone": self.backbone.identity(),
            "pooling": self.pooling,
            "input_size": self.backbone.input_size,
        }
        return FeatureCache(
            cache_dir, self.fingerprint, self.dim, self.dtype, meta, readonly=readonly
        )

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor, valid_hw: torch.Tensor, grid: bool) -> PendingFeatures:
        images = images.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.precision):
            # valid_hw stays on the host: the backbone reads sizes there and copies them itself.
            if grid and self.spatial:
                # [B, D], [B, T, C]
                feats, tokens = self.backbone.encode_grid(
                    images, valid_hw, self.pooling, self.spatial
                )
            else:
                feats, tokens = self.backbone.encode(images, valid_hw, self.pooling), None  # [B, D]
        pending = PendingFeatures()
        # The grid travels in the cache dtype: half the device->host copy at fp16.
        pending.add(feats.float(), None if tokens is None else tokens.to(_TORCH_DTYPE[self.dtype]))
        return pending

    def encode_batch(self, images: torch.Tensor, valid_hw: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, S, S] -> float32 [B, D] pooled features (see ``encode_arrays``)."""
        return self.encode_arrays(images, valid_hw, grid=False)[0]

    def encode_arrays(
        self, images: torch.Tensor, valid_hw: torch.Tensor, grid: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [B, 3, S, S] -> (float32 [B, D], grid [B, T, C] in the cache dtype or None when off / not asked).

        On out-of-memory split the batch and retry, down to 1."""
        return self.encode_pending(images, valid_hw, grid).result()

    def encode_pending(
        self, images: torch.Tensor, valid_hw: torch.Tensor, grid: bool = True
    ) -> PendingFeatures:
        """``encode_arrays`` without waiting for the results (``PendingFeatures.result`` does)."""
        n = images.shape[0]
        step = min(n, self.max_batch or n)
        if step < n:
            pending = PendingFeatures()
            for i in range(0, n, step):
                pending.extend(
                    self.encode_pending(images[i : i + step], valid_hw[i : i + step], grid)
                )
            return pending
        try:
            return self._encode(images, valid_hw, grid)
        except Exception as exc:
            if not is_oom(exc):
                raise
        # Out of the except block, so the failed attempt's tensors can be freed before retrying.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if n == 1:
            raise DeviceError(
                f"out of memory on {self.device} encoding a single image at "
                f"{self.backbone.input_size}px ({self.backbone.name}, {self.precision})",
                fix="use precision bf16/fp16, a smaller backbone.img_size, a larger GPU, or "
                "device: cpu",
            )
        self.max_batch = max(1, n // 2)
        log.warning(f"extract: out of memory at batch {n}; retrying in batches of {self.max_batch}")
        return self.encode_pending(images, valid_hw, grid)

    def plan(
        self, records: Sequence[Record], cache: FeatureCache, rank: int = 0, world: int = 1
    ) -> tuple[list[Record], int]:
        """(records this rank must extract, one per distinct image; number already cached)."""
        # an image missing any array is re-extracted
        missing = self.missing(cache, (r.sha256 for r in records))
        # Partition *all* keys, not the missing ones: ranks look at the index at different moments
        # (another rank may already have committed), but every rank sees the same records.
        mine = set(shard_for_rank(list({r.sha256 for r in records}), rank, world)) & missing
        # same bytes twice: extract once
        todo = list({r.sha256: r for r in records if r.sha256 in mine}.values())
        return todo, sum(1 for r in records if r.sha256 not in missing)

    def run(
        self,
        records: Sequence[Record],
        cache: FeatureCache | ManifestWriter,
        *,
        batch_size: int,
        num_workers: int,
        max_pixels: int | None = None,
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
        plan: tuple[list[Record], int] | None = None,
    ) -> ExtractResult:
        """Extract every record whose key is not in the cache yet (this rank's share of them).

        ``cache``: where batches go (``put``): the cache itself, or under torchrun this rank's
        ``ManifestWriter``, which needs ``plan``. ``plan``: a precomputed ``self.plan(...)`` /
        ``plan_ranks(...)``, so ranks can all plan before any of them writes."""
        result = ExtractResult()
        if plan is None:
            if not isinstance(cache, FeatureCache):
                raise ValueError("a ManifestWriter has no index to plan from: pass plan")
            plan = self.plan(records, cache, rank, world)
        todo, result.cached = plan
        if not todo:
            return result
        items = [LoadItem(r.sha256, r.file, i) for i, r in enumerate(todo)]
        loader = make_loader(
            items,
            self.backbone.preparer(),
            batch_size=batch_size,
            num_workers=num_workers,
            target_longest=self.backbone.decode_target,
            max_pixels=max_pixels,
            pin_memory=self.device.type == "cuda",
        )
        start = time.perf_counter()
        bar = tqdm(
            total=len(todo),
            desc="extract" if world == 1 else f"extract rank {rank}",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        # One writer thread: the next batch is encoded while the previous one is fsynced and
        # committed.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samprobe-cache")
        pending: list[Future] = []
        in_flight: tuple[list[str], PendingFeatures] | None = None  # encoded, not yet on the host

        def commit(keys: list[str], encoded: PendingFeatures) -> None:
            nonlocal pending
            feats, grid = encoded.result()  # [B, D] float32, [B, T, C] or None
            # result() re-raises a failed write
            pending = [f for f in pending if not f.done() or f.result()]
            if len(pending) >= 2:  # bounded: never more than two batches waiting for the disk
                pending.pop(0).result()
            pending.append(writer.submit(self._put, cache, keys, feats, grid))

        try:
            for batch in loader:
                for tag, reason in batch.failures:
                    result.failures.append((todo[tag], reason))
                if batch.tags:
                    encoded = self.encode_pending(batch.images, batch.valid_hw)
                    # the previous batch's copy is done while this one runs
                    if in_flight is not None:
                        commit(*in_flight)
                        bar.update(len(in_flight[0]))
                    in_flight = (list(batch.keys), encoded)
                    result.extracted += len(batch.tags)
                bar.update(len(batch.failures))
            if in_flight is not None:
                commit(*in_flight)
                bar.update(len(in_flight[0]))
            for f in pending:
                f.result()
        finally:
            writer.shutdown(wait=True)
            bar.close()
        result.seconds = time.perf_counter() - start
        return result

    def _put(
        self,
        cache: FeatureCache | ManifestWriter,
        keys: list[str],
        feats: np.ndarray,
        grid: np.ndarray | None,
    ) -> None:
        """Commit one batch: pooled, then the grid. A kill in between leaves images without a grid,
        which ``plan`` sees as missing and re-extracts."""
        cache.put(keys, feats)
        if grid is not None:
            cache.put(keys, grid.reshape(len(keys), -1), array=grid_array(self.spatial))


def load_features(cache: FeatureCache, records: Sequence[Record]) -> np.ndarray:
    """[N, D] float32 features in record order (every record must be in the cache)."""
    return (
        cache.get([r.sha256 for r in records]) if records else np.zeros((0, cache.dim), np.float32)
    )


def load_grid(cache: FeatureCache, records: Sequence[Record], spatial: int) -> np.ndarray:
    """[N, spatial*spatial, C] float32 grids in record order (every record must have one: KeyError otherwise)."""
    array = grid_array(spatial)
    flat = cache.get([r.sha256 for r in records], array=array) if records else None
    if flat is None or flat.shape[0] == 0:
        return np.zeros(
            (0, spatial * spatial, (cache.array_dim(array) or 0) // spatial**2), np.float32
        )
    return flat.reshape(len(records), spatial * spatial, -1)


def load_head_inputs(
    cache: FeatureCache, records: Sequence[Record], spatial: int | None
) -> np.ndarray:
    """What a head reads: pooled features [N, D], or with ``spatial`` (attentive heads) the grid [N, S*S, C]."""
    return load_grid(cache, records, spatial) if spatial else load_features(cache, records)


def _prepared_batches(
    extractor: Extractor, images: Sequence[np.ndarray], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 [B, 3, S, S], valid_hw [B, 2]) batches of in-memory RGB uint8 images."""
    for i in range(0, len(images), batch_size):
        prepared = [extractor.backbone.prepare(im) for im in images[i : i + batch_size]]
        yield (
            torch.stack([p[0] for p in prepared]),
            torch.tensor([p[1] for p in prepared], dtype=torch.int64),
        )


def image_features(
    extractor: Extractor, images: Sequence[np.ndarray], batch_size: int = 8
) -> np.ndarray:
    """Pooled features of in-memory RGB uint8 images (notebook API; no cache)."""
    out = [
        extractor.encode_batch(batch, hw)
        for batch, hw in _prepared_batches(extractor, images, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)


def image_grids(
    extractor: Extractor, images: Sequence[np.ndarray], batch_size: int = 8
) -> np.ndarray:
    """Token grids [N, S*S, C] float32 of in-memory RGB uint8 images (``extractor.spatial`` = S; no
    cache), rounded through the cache dtype as ``load_grid`` returns them."""
    if not extractor.spatial:
        raise ValueError("image_grids needs an Extractor with spatial set (features.spatial)")
    out = [
        extractor.encode_arrays(batch, hw, grid=True)[1]
        for batch, hw in _prepared_batches(extractor, images, batch_size)
    ]
    C = extractor.backbone.grid_shape()[0]
    return (
        np.concatenate(out).astype(np.float32)
        if out
        else np.zeros((0, extractor.spatial**2, C), np.float32)
    )


def path_features(
    extractor: Extractor, paths: Sequence[str | Path], batch_size: int = 8
) -> np.ndarray:
    """Pooled features [N, D] float32 of image files (notebook API; no cache), decoded exactly as
    extraction decodes them:

        ex = Extractor.from_config(load_config("samprobe.yaml"))
        x = path_features(ex, ["a.jpg", "b.png"])
    """
    out = []
    for i in range(0, len(paths), batch_size):
        images = [extractor.backbone.decode(Path(p)) for p in paths[i : i + batch_size]]
        out.append(image_features(extractor, images, batch_size))
    return np.concatenate(out) if out else np.zeros((0, extractor.dim), np.float32)
