"""Image loading for the encoder: worker processes read, hash-check, decode and resize only.

Workers return uint8 tensors and never touch CUDA; normalisation happens on the device.
When CUDA is already initialised in the parent, forking would copy a CUDA context the child
cannot use ("Cannot re-initialize CUDA in forked subprocess"), so workers come from a
``forkserver`` instead (``worker_context``). Under torchrun the cores are shared by the ranks
of a node (``default_num_workers``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samprobe.data.images import decode_rgb
from samprobe.io import sha256_bytes

Preparer = Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]


@dataclass(frozen=True)
class LoadItem:
    key: str  # expected sha256 of the bytes ("" = do not check)
    file: str
    tag: int  # caller's index, returned untouched


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    valid_hw: torch.Tensor  # int64 [B, 2]
    tags: list[int]
    keys: list[str]  # sha256 of the bytes actually decoded
    # (tag, "kind: detail") for items that could not be loaded (failure_kind)
    failures: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory: the DataLoader's pin thread calls this (``pin_memory=True``),
        so that ``.to(device, non_blocking=True)`` really overlaps. Without it the loader passes a
        dataclass through unpinned and every copy waits."""
        return Batch(
            self.images.pin_memory(),
            self.valid_hw.pin_memory(),
            self.tags,
            self.keys,
            self.failures,
        )


class ImageDataset(Dataset):
    def __init__(
        self,
        items: list[LoadItem],
        prepare: Preparer,
        target_longest: int | None,
        max_pixels: int | None = None,
    ) -> None:
        self.items = items
        self.prepare = prepare
        self.target_longest = target_longest
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(
        self, i: int
    ) -> tuple[int, str, torch.Tensor | None, tuple[int, int] | None, str]:
        """(tag, sha256, uint8 [3, S, S] or None, (h', w') or None, failure "kind: detail" or "")."""
        item = self.items[i]
        try:
            data = Path(item.file).read_bytes()
        except FileNotFoundError:
            return item.tag, "", None, None, f"missing: no file at {item.file}"
        except OSError as exc:
            return item.tag, "", None, None, f"unreadable: {type(exc).__name__}: {exc}"
        try:
            image = decode_rgb(data, self.target_longest, self.max_pixels)
            tensor, hw = self.prepare(image)
        except Exception as exc:  # a bad file must not stop the run: reported by the caller
            return item.tag, "", None, None, f"unreadable: {type(exc).__name__}: {exc}"
        digest = sha256_bytes(data)
        if item.key and digest != item.key:
            # Still an image, but labels/splits/cache key were decided on other bytes.
            return (
                item.tag,
                digest,
                None,
                None,
                "changed: file changed since validate (sha256 differs); run validate again",
            )
        return item.tag, digest, tensor, hw, ""


def failure_kind(reason: str) -> tuple[str, str]:
    """Split a loader failure into (kind, detail); kinds: missing | unreadable | changed."""
    kind, _, detail = reason.partition(": ")
    return (
        (kind, detail) if kind in ("missing", "unreadable", "changed") else ("unreadable", reason)
    )


def collate(
    samples: list[tuple[int, str, torch.Tensor | None, tuple[int, int] | None, str]],
) -> Batch:
    ok = [s for s in samples if s[2] is not None]
    failures = [(s[0], s[4]) for s in samples if s[2] is None]
    if ok:
        images = torch.stack([s[2] for s in ok])  # type: ignore[misc]
        hw = torch.tensor([s[3] for s in ok], dtype=torch.int64)
    else:
        images, hw = (
            torch.empty(0, 3, 0, 0, dtype=torch.uint8),
            torch.empty(0, 2, dtype=torch.int64),
        )
    return Batch(images, hw, [s[0] for s in ok], [s[1] for s in ok], failures)


def available_cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity, unlike cpu_count)."""
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def default_num_workers() -> int:
    """Decoding workers for ``num_workers: auto``: this process's cores, shared by the ranks that
    torchrun started on this node (LOCAL_WORLD_SIZE): 8 ranks on 64 cores get 8 each, not 64."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, available_cores() // max(1, ranks_here))


PREFETCH_BATCHES = 4
"""Batches each worker keeps ready (DataLoader ``prefetch_factor``); they wait in /dev/shm."""

# Imported once by the fork server, so each worker forked from it starts with torch loaded.
_FORKSERVER_PRELOAD = ["samprobe.data.loader"]


def worker_context(num_workers: int) -> mp.context.BaseContext | None:
    """None (the platform default, fork on Linux) unless forking would be unsafe.

    A forked child inherits the parent's CUDA context but cannot use it ("Cannot re-initialize
    CUDA in forked subprocess"). Workers then come from a fork server: a clean process started
    before this one's CUDA state could reach it, which imports torch once (preload) and forks
    every worker from itself. spawn would also be safe but re-imports torch in every worker
    (~1.8 s, ~0.7 GB RSS each). The preparer and dataset are pickled to forkserver workers, so
    preparers must be module-level functions or ``functools.partial``s. Windows/macOS without
    fork keep spawn.
    """
    if num_workers == 0:
        return None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if "forkserver" not in mp.get_all_start_methods():
            return mp.get_context("spawn")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
        return ctx
    return None


def make_loader(
    items: list[LoadItem],
    prepare: Preparer,
    *,
    batch_size: int,
    num_workers: int | None = None,
    target_longest: int | None = None,
    max_pixels: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of uint8 images in item order. ``num_workers=None``: one per available core."""
    if num_workers is None:
        num_workers = default_num_workers()
    # No more workers than batches: each worker would start (and import torch) for nothing.
    num_workers = min(num_workers, -(-len(items) // batch_size)) if items else 0
    ctx = worker_context(num_workers)
    if ctx is not None and ctx.get_start_method() in ("spawn", "forkserver"):
        try:
            pickle.dumps(prepare)
        except Exception as exc:  # otherwise it fails later, inside the first worker, cryptically
            raise TypeError(
                f"{ctx.get_start_method()} workers need a picklable preparer "
                f"(a module-level function or functools.partial), got {prepare!r}: {exc}"
            ) from None
    return DataLoader(
        ImageDataset(items, prepare, target_longest, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        multiprocessing_context=ctx,
        persistent_workers=False,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
    )
