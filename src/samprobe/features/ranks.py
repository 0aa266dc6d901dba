"""Extraction under ``torchrun``, possibly across hosts, with one process touching the index.

Rank 0 is the only process that opens the SQLite index: it reads which keys are missing and
sends every rank that answer (a bit per distinct key) over the process group. Every rank, rank
0 included, then writes its share through a ``ManifestWriter`` (its own shard files and its own
manifest) and never the index; after a barrier rank 0 merges the manifests. So the index never
sees two writers, nor two hosts: SQLite's WAL (shared memory) and its ``fcntl`` locks are never
relied on across machines, which is what a cache on NFS needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from samprobe import errors
from samprobe.data.records import Record
from samprobe.errors import SamprobeError
from samprobe.features.cache import FeatureCache, check_free_space
from samprobe.features.extract import Extractor, shard_for_rank

_T = TypeVar("_T")


def shared_error(exc: SamprobeError) -> tuple[str, str, str | None]:
    """A user error as a picklable payload for the other ranks (``raise_shared_error``)."""
    return type(exc).__name__, exc.message, exc.fix


def raise_shared_error(error: tuple[str, str, str | None]) -> None:
    kind, message, fix = error
    raise getattr(errors, kind, SamprobeError)(message, fix=fix)


def on_rank0(fn: Callable[[], _T], *, rank: int, world: int) -> _T:
    """``fn()`` run on rank 0 alone, its (small, picklable) result broadcast to every rank; a
    user error it raises is raised on every rank with its message: none is left waiting."""
    if world == 1:
        return fn()
    import torch.distributed as dist

    payload: list[object] = [None]
    if rank == 0:
        try:
            payload = [(fn(), None)]
        except SamprobeError as exc:
            payload = [(None, shared_error(exc))]
    dist.broadcast_object_list(payload, src=0)
    result, error = payload[0]  # type: ignore[misc]
    if error is not None:
        raise_shared_error(error)
    return result


@dataclass
class RankPlan:
    todo: list[Record]
    """This rank's records to extract, one per distinct image."""
    cached: int
    """Records (all ranks) whose image is already cached in every array."""
    missing: int
    """Distinct images (all ranks) missing from at least one array."""
    need: int
    """Disk bytes the missing entries will take."""
    free: int
    """Free bytes where the cache lives."""


def plan_ranks(
    extractor: Extractor,
    records: Sequence[Record],
    open_cache: Callable[[], FeatureCache],
    *,
    rank: int,
    world: int,
) -> tuple[FeatureCache | None, RankPlan]:
    """(the open cache on rank 0 and None on the other ranks, which never open the index; this
    rank's plan). Every rank raises the user error rank 0 met opening or reading the cache (a
    full disk, a cache of another layout), with its message: none is left waiting for a peer."""
    distinct = sorted({r.sha256 for r in records})
    payload: list[object] = [None]
    cache = None
    if rank == 0:
        try:
            cache = open_cache()
            missing = extractor.missing(cache, distinct)
            need = extractor.disk_need(cache, distinct)
            free = check_free_space(cache.root, need)
            mask = np.fromiter((k in missing for k in distinct), dtype=bool, count=len(distinct))
            payload = [(np.packbits(mask).tobytes(), need, free, None)]
        except SamprobeError as exc:
            if cache is not None:
                cache.close()
            if world == 1:
                raise
            payload = [(b"", 0, 0, shared_error(exc))]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(payload, src=0)
    packed, need, free, error = payload[0]  # type: ignore[misc]
    if error is not None:
        raise_shared_error(error)
    mask = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=len(distinct)).astype(bool)
    missing_keys = {k for k, m in zip(distinct, mask) if m}
    # Every key belongs to exactly one rank (a stable split of all keys, missing or not).
    mine = set(shard_for_rank(distinct, rank, world)) & missing_keys
    todo = list({r.sha256: r for r in records if r.sha256 in mine}.values())
    cached = sum(1 for r in records if r.sha256 not in missing_keys)
    return cache, RankPlan(todo, cached, len(missing_keys), need, free)
