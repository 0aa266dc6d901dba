"""Training features that stay in the cache's shard files: read in shuffled chunks while the sweep
trains, never the whole set in memory.

``CachedRows`` stands for a split's features [N, D] (or token grids [N, T, C]) in the caller's
row order, the order of the targets. ``SweepTrainer`` takes one wherever it takes an array; then
only where its batches come from changes (one training loop):

- an epoch visits the rows by *chunks*: runs of the split's rows lying within ``CHUNK_ROWS``
  consecutive rows of one shard file (one raw read each). The chunks come in a random order and
  are read into a shuffle buffer of ``buffer_rows`` rows, a few dozen chunks from all over the
  cache, whose rows are shuffled together; the next buffer is read in a background thread while
  the heads train on this one. Every row is visited once per epoch, and the order comes from the
  trainer's checkpointed generator, so a resumed run continues bit for bit.
- the standardisation statistics are computed on the rows the in-memory path samples (every
  k-th, ``heads.stats_stride``), read one by one: both paths standardise alike.
- validation reads the split in storage order, a buffer at a time.

Reads go through ``read`` into buffers, not through the memory map: mapped pages count in the
process's RSS for as long as the kernel keeps them, which would grow to the whole cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from samprobe.errors import TrainingError
from samprobe.features.cache import FeatureCache, read_rows
from samprobe.train.heads import stats_stride

log = logging.getLogger("samprobe")

CHUNK_ROWS = 1024
"""Shard rows per read: 2.6 MB at 1280-d fp16, a size a disk reads at full speed, small enough
that a buffer mixes rows from dozens of places in the cache."""
MEMORY_SHARE = 0.5
"""``train.memory_budget_gb`` unset: this share of the memory available when training starts."""
BUFFER_SHARE = 0.25
"""Share of the budget one shuffle buffer takes (float32): two are held at once (the one trained
on, the one being read), leaving half the budget to the rest of the process."""


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (MemAvailable), or the
    physical memory where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(budget_gb: float | None) -> int:
    """``train.memory_budget_gb`` in bytes (unset: MEMORY_SHARE of the memory available now)."""
    return int(budget_gb * 1e9) if budget_gb is not None else int(MEMORY_SHARE * available_memory())


def in_memory_bytes(rows: int, row_values: int) -> int:
    """What the in-memory path holds for ``rows`` features of ``row_values`` values: one float32
    copy (the standardised batches are gathered from it)."""
    return rows * row_values * 4


def buffer_rows(budget: int, row_values: int) -> int:
    """Rows of one shuffle buffer within ``budget`` bytes (at least one chunk)."""
    return max(CHUNK_ROWS, int(budget * BUFFER_SHARE) // (row_values * 4))


def all_finite(x: np.ndarray) -> bool:
    """Whether every value is finite. A NaN or inf makes the float32 sum non-finite, so a finite
    sum settles it in one pass without a temporary; a non-finite sum (NaN/inf, or overflow of
    huge values) is checked exactly."""
    if x.size == 0:
        return True
    # fp16 input: no fp16 overflow
    total = torch.from_numpy(np.ascontiguousarray(x)).sum(dtype=torch.float32).item()
    return bool(np.isfinite(total)) or bool(np.isfinite(x).all())


def non_finite_error() -> TrainingError:
    return TrainingError(
        "features contain NaN/inf",
        fix="delete the cache entries of these images and rerun `samprobe extract`",
    )


class CachedRows:
    """The features of ``keys`` in a cache array, in the order of ``keys``, read from the shard
    files on demand. ``row_shape``: the shape of one row as the heads read it ((D,) pooled,
    (T, C) for a grid stored flat)."""

    def __init__(
        self,
        cache: FeatureCache,
        keys: Sequence[str],
        *,
        array: str,
        row_shape: tuple[int, ...],
        buffer_rows: int,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.dtype = cache.dtype
        self.shape = (len(keys), *row_shape)
        self.row_values = int(np.prod(row_shape))
        self.buffer_rows, self.chunk_rows = max(int(buffer_rows), 1), chunk_rows
        shard_of, row_of, self.files = cache.shard_files(list(keys), array)
        # storage order: by shard, then row; a chunk is a run of it within chunk_rows shard rows
        self.storage_order = np.lexsort((row_of, shard_of))
        shard_sorted, self.rows = shard_of[self.storage_order], row_of[self.storage_order]
        place = shard_sorted * (1 << 32) + self.rows // chunk_rows
        # chunk c: storage positions bounds[c]..bounds[c + 1] (no chunk at all for no rows)
        ends = [len(place)] if len(place) else []
        self.bounds = np.concatenate([[0], np.flatnonzero(np.diff(place)) + 1, ends]).astype(int)
        self.chunk_shard = shard_sorted[self.bounds[:-1]]
        self._order_tensor = torch.from_numpy(self.storage_order)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def chunks(self) -> int:
        return len(self.bounds) - 1

    def describe(self) -> str:
        mb = self.buffer_rows * self.row_values * 4 / 1e6
        return (
            f"{self.chunks} chunks of up to {self.chunk_rows} shard rows, shuffled through a buffer of "
            f"{self.buffer_rows} rows ({mb:.0f} MB)"
        )

    # --- reading -------------------------------------------------------------------------

    def _read_chunks(
        self, chunks: Sequence[int], out: np.ndarray, span: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 [R, *row_shape], their positions in ``keys`` [R]) of these chunks, in turn,
        read into the first R rows of ``out`` [>= R, row_values] through ``span`` (the cache's
        dtype, [chunk_rows, row_values]); the tensor is a view of ``out``."""
        at = 0
        for c in chunks:
            rows = self.rows[self.bounds[c] : self.bounds[c + 1]]
            start, size = int(rows[0]), len(rows)
            shard_rows = span[: int(rows[-1]) - start + 1]
            read_rows(self.files[int(self.chunk_shard[c])], start, shard_rows)
            # a chunk holding every row of its span (one split per shard) is copied as it is
            out[at : at + size] = (
                shard_rows if len(shard_rows) == size else shard_rows[rows - start]
            )
            at += size
        if not all_finite(out[:at]):
            raise non_finite_error()
        positions = np.concatenate(
            [self.storage_order[self.bounds[c] : self.bounds[c + 1]] for c in chunks]
        )
        return torch.from_numpy(out[:at]).view(-1, *self.shape[1:]), torch.from_numpy(positions)

    def _buffers(self, chunk_order: Sequence[int]) -> list[list[int]]:
        """``chunk_order`` cut into buffers of at most ``buffer_rows`` rows (one chunk at least)."""
        out: list[list[int]] = []
        rows = self.buffer_rows
        for c in chunk_order:
            size = int(self.bounds[c + 1] - self.bounds[c])
            if rows + size > self.buffer_rows and (not out or out[-1]):
                out.append([])
                rows = 0
            out[-1].append(int(c))
            rows += size
        return out

    def _read_ahead(self, buffers: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The buffers' contents in turn, the next one read in a thread while this one is used.

        Two float32 buffers, allocated once, take turns: a yielded tensor is a view of one and
        stays valid until the next is asked for (then the thread reads into it again): two are
        held, never more, and no buffer is mapped and zeroed anew per read. Callers keep copies,
        never the views (``epoch`` gathers its batches with index_select)."""
        if not buffers:
            return
        rows = max(sum(int(self.bounds[c + 1] - self.bounds[c]) for c in b) for b in buffers)
        outs = [np.empty((rows, self.row_values), dtype=np.float32) for _ in buffers[:2]]
        # a chunk's rows lie within chunk_rows consecutive shard rows
        span = np.empty((self.chunk_rows, self.row_values), dtype=self.dtype)
        with ThreadPoolExecutor(1, thread_name_prefix="samprobe-stream") as pool:
            pending = pool.submit(self._read_chunks, buffers[0], outs[0], span)
            for i in range(len(buffers)):
                got = pending.result()
                if i + 1 < len(buffers):
                    # outs[(i + 1) % 2] held buffer i - 1: the consumer asked past it
                    pending = pool.submit(
                        self._read_chunks, buffers[i + 1], outs[(i + 1) % 2], span
                    )
                yield got
                del got

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """float32 [len(positions), *row_shape] of the rows at these positions, read one by one."""
        out = np.empty((len(positions), self.row_values), dtype=np.float32)
        where = np.empty(len(self), dtype=np.int64)
        where[self.storage_order] = np.arange(len(self))
        chunk_of = np.searchsorted(self.bounds, where[positions], side="right") - 1
        one = np.empty((1, self.row_values), dtype=self.dtype)
        for i, (at, c) in enumerate(zip(where[positions], chunk_of)):
            read_rows(self.files[int(self.chunk_shard[c])], int(self.rows[at]), one)
            out[i] = one[0]
        if not all_finite(out):
            raise non_finite_error()
        return out.reshape(len(positions), *self.shape[1:])

    def stats_sample(self) -> np.ndarray:
        """The rows the standardisation statistics are computed on: those the in-memory path
        samples (``heads.stats_stride``)."""
        tokens = self.shape[1] if len(self.shape) == 3 else 1
        return self.sample(np.arange(0, len(self), stats_stride(len(self), tokens)))

    # --- what the trainer reads ------------------------------------------------------------

    def epoch(
        self, generator: torch.Generator, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 batch [B, *row_shape], its positions in ``keys`` [B]) covering every row once,
        in a random order drawn from ``generator``: ceil(N / batch_size) batches, the last
        possibly short. A batch may take rows from two consecutive buffers."""
        chunk_order = torch.randperm(self.chunks, generator=generator).tolist()
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        have = 0  # rows in parts
        for x, positions in self._read_ahead(self._buffers(chunk_order)):
            shuffle = torch.randperm(len(x), generator=generator)
            i = 0
            while i < len(x):
                take = shuffle[i : i + batch_size - have]
                i += len(take)
                parts.append((x.index_select(0, take), positions.index_select(0, take)))
                have += len(take)
                if have == batch_size:
                    yield _joined(parts)
                    parts, have = [], 0
        if parts:
            yield _joined(parts)

    def in_storage_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """float32 batches [<= batch_size, *row_shape] of every row in storage order
        (``storage_order`` maps them to positions in ``keys``)."""
        chunks = list(range(self.chunks))
        for x, _ in self._read_ahead(self._buffers(chunks)):
            yield from x.split(batch_size)

    def storage_order_on(self, device: torch.device) -> torch.Tensor:
        """``storage_order`` as a tensor on ``device``: targets in the order ``in_storage_order``
        yields the rows."""
        return self._order_tensor.to(device)


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cached_rows(
    cache: FeatureCache, keys: Sequence[str], *, array: str, spatial: int | None, budget: int
) -> CachedRows:
    """``CachedRows`` of ``keys`` with a shuffle buffer sized from ``budget`` bytes: pooled
    features [N, D], or with ``spatial`` the token grids [N, S*S, C] (stored flat)."""
    stored = cache.array_dim(array) or cache.dim
    tokens = spatial * spatial if spatial else 1
    row_shape = (tokens, stored // tokens) if spatial else (stored,)
    return CachedRows(
        cache, keys, array=array, row_shape=row_shape, buffer_rows=buffer_rows(budget, stored)
    )
