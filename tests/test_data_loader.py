"""Loader: uint8 batches from worker processes, failures reported, forkserver when CUDA is initialised,
pinned batches, workers shared by the ranks of a node."""

from __future__ import annotations

import functools
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.images import photos
from samprobe.data.images import decode_rgb, letterbox
from samprobe.data.loader import (
    Batch,
    LoadItem,
    default_num_workers,
    failure_kind,
    make_loader,
    worker_context,
)
from samprobe.io import sha256_file

S = 64


def _items(tmp: Path) -> list[LoadItem]:
    items = []
    for k, (name, photo) in enumerate(photos().items()):
        path = tmp / f"{name}.jpg"
        Image.fromarray(photo).save(path, quality=90)
        items.append(LoadItem(sha256_file(path), str(path), k))
    return items


def _expected(item: LoadItem) -> tuple[torch.Tensor, tuple[int, int]]:
    return letterbox(decode_rgb(Path(item.file), S), S)


def _collect(loader) -> dict[int, tuple[torch.Tensor, tuple[int, int], str]]:
    out = {}
    for batch in loader:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, S, S)
        for j, tag in enumerate(batch.tags):
            out[tag] = (batch.images[j], tuple(batch.valid_hw[j].tolist()), batch.keys[j])
    return out


@pytest.mark.slow
def test_forkserver_context_when_cuda_is_initialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _items(tmp_path)
    assert worker_context(2) is None  # plain CPU run: the fast default (fork)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert worker_context(0) is None  # no workers, nothing to fork
    # picklable: the fork server ships it to the workers
    prepare = functools.partial(letterbox, size=S)
    loader = make_loader(items, prepare, batch_size=2, num_workers=2, target_longest=S)
    assert loader.num_workers == 2
    # Workers fork from a clean server process (torch preloaded there), never from this one.
    assert loader.multiprocessing_context is mp.get_context("forkserver")
    with pytest.raises(TypeError, match="picklable preparer"):
        make_loader(items, lambda im: letterbox(im, S), batch_size=2, num_workers=2)
    got = _collect(loader)
    assert sorted(got) == [it.tag for it in items]
    for it in items:
        image, hw, key = got[it.tag]
        ref_image, ref_hw = _expected(it)
        assert torch.equal(image, ref_image) and hw == ref_hw and key == it.key


def test_failures_are_reported_with_their_kind_and_the_rest_load(tmp_path: Path) -> None:
    items = _items(tmp_path)
    Path(items[0].file).unlink()
    Path(items[1].file).write_bytes(b"not an image")
    # edited after validate
    Image.fromarray(photos()["square"][::-1].copy()).save(items[2].file, quality=90)
    loader = make_loader(
        items, functools.partial(letterbox, size=S), batch_size=4, num_workers=1, target_longest=S
    )
    batches = list(loader)
    failures = {tag: failure_kind(reason) for b in batches for tag, reason in b.failures}
    assert {t: k for t, (k, _) in failures.items()} == {0: "missing", 1: "unreadable", 2: "changed"}
    assert "not an image file" in failures[1][1] and "run validate again" in failures[2][1]
    assert [t for b in batches for t in b.tags] == [3]


def test_default_workers_are_the_available_cores(tmp_path: Path) -> None:
    items = _items(tmp_path)
    assert default_num_workers() >= 1
    loader = make_loader(items, functools.partial(letterbox, size=S), batch_size=1)
    assert loader.num_workers == min(default_num_workers(), len(items))
    assert (
        make_loader(
            items, functools.partial(letterbox, size=S), batch_size=8, num_workers=4
        ).num_workers
        == 1
    )


def test_workers_per_rank_share_the_node_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc_per_node=8
    assert default_num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert default_num_workers() == 1


def test_the_loader_pin_thread_pins_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's pin step (what DataLoader(pin_memory=True) runs on every batch) reaches each tensor
    of a Batch. Pinning itself needs a CUDA driver: here ``Tensor.pin_memory`` is replaced by a
    recorder that returns a copy, so the test checks which tensors go through it (without
    ``Batch.pin_memory`` none did: the dataclass came back as it was, unpinned)."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    items = _items(tmp_path)
    batch = next(
        iter(make_loader(items, functools.partial(letterbox, size=S), batch_size=2, num_workers=0))
    )
    pinned: list[torch.Tensor] = []

    def record(t: torch.Tensor, device: object = None) -> torch.Tensor:
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    out = loader_pin(batch)
    assert isinstance(out, Batch) and out is not batch
    assert [id(t) for t in pinned] == [id(batch.images), id(batch.valid_hw)]
    assert (
        torch.equal(out.images, batch.images) and out.tags == batch.tags and out.keys == batch.keys
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA driver")
def test_batches_are_really_pinned_on_a_gpu_machine(tmp_path: Path) -> None:
    items = _items(tmp_path)
    loader = make_loader(
        items, functools.partial(letterbox, size=S), batch_size=2, num_workers=1, pin_memory=True
    )
    for batch in loader:
        assert batch.images.is_pinned() and batch.valid_hw.is_pinned()
