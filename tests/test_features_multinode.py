"""Extraction across nodes: per-rank shard manifests merged into the index by one process.

The manifest tests use real data (sklearn digits as 64-d feature rows); the torchrun tests launch
two single-process nodes with a 127.0.0.1 rendezvous extracting real images with a tiny
random-initialised SAM in the official checkpoint format.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.cache_corpus import PY, REPO, LogLines, index_count, make_corpus, write_config
from helpers.sam_factory import build_official_sam, write_official_checkpoint
from helpers.tolerance import close_after_storage, magnitude, reduction_terms
from samprobe.cli import main
from samprobe.config import load_config
from samprobe.data.records import read_splits
from samprobe.features.cache import ORPHAN_AGE_S, FeatureCache
from samprobe.features.extract import Extractor
from samprobe.features.manifest import ManifestWriter, manifest_files, read_manifest
from samprobe.io import sha256_bytes
from samprobe.pipeline import run_extract


@pytest.fixture(scope="module")
def digit_rows() -> tuple[list[str], np.ndarray]:
    """Real feature-like rows: the 1797 sklearn digits, 64 pixel values each, keyed by content."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:120]
    return [sha256_bytes(row.tobytes() + bytes([i % 7])) for i, row in enumerate(x)], x


def _open(tmp_path: Path, readonly: bool = False) -> FeatureCache:
    return FeatureCache(tmp_path / "cache", "fp", 64, "float16", readonly=readonly)


def _as_stored(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def test_merge_adds_each_manifest_line_once_and_deletes_closed_manifests(tmp_path, digit_rows):
    keys, x = digit_rows
    _open(tmp_path).close()  # the fingerprint folder and its index exist, as rank 0 leaves them
    root = tmp_path / "cache" / "fp"
    with ManifestWriter(root, np.float16, rank=0) as w0:
        w0.put(keys[:10], x[:10])
        w0.put(keys[10:20], x[10:20])
    live = ManifestWriter(root, np.float16, rank=1)  # a rank still extracting
    live.put(keys[20:30], x[20:30])
    with _open(tmp_path) as cache:  # opening for writing merges what is there
        assert len(cache) == 30
        np.testing.assert_array_equal(cache.get(keys[:30]), _as_stored(x[:30]))
        assert manifest_files(root) == [live.path]  # closed one merged and deleted, live one kept
    live.put(keys[30:40], x[30:40])
    with _open(tmp_path) as cache:
        assert cache.merge_manifests() == 0  # the open already merged the new line, once
        assert len(cache) == 40
        cache.remove(keys[20:25])  # a user's removal is not undone by merging the line again
        cache.compact()  # the merged shard files are packed away and deleted
    live.close()
    with LogLines() as logs, _open(tmp_path) as cache:
        # lines merged before are not read again (their shard files are compacted away by now)
        assert "re-extracted" not in logs.take()
        assert len(cache) == 35 and sorted(cache.missing(keys[:40])) == sorted(keys[20:25])
        np.testing.assert_array_equal(cache.get(keys[25:40]), _as_stored(x[25:40]))
        assert cache.verify().bad_entries == 0
    assert manifest_files(root) == []


def test_merge_skips_torn_line_and_missing_shard_then_drops_dead_manifest(tmp_path, digit_rows):
    keys, x = digit_rows
    _open(tmp_path).close()
    root = tmp_path / "cache" / "fp"
    dead = ManifestWriter(root, np.float16, rank=3)
    dead.put(keys[:8], x[:8])
    dead.put(keys[8:16], x[8:16])
    lost = read_manifest(dead.path)[0][-1][1].shard.file
    (root / "shards" / lost).unlink()  # a line naming a shard that is not there (lost file)
    dead.put(keys[16:24], x[16:24])
    whole = dead.path.read_bytes()
    dead.put(keys[24:32], x[24:32])
    os.close(dead._fd)  # killed: no closed line...
    # ...and its last line torn half-way through the write
    with open(dead.path, "r+b") as f:
        f.truncate(len(whole) + (len(dead.path.read_bytes()) - len(whole)) // 2)
    with LogLines() as logs, _open(tmp_path) as cache:
        assert "re-extracted" in logs.take()  # the missing shard is said, not hidden
        assert len(cache) == 16
        assert sorted(cache.missing(keys[:32])) == sorted(keys[8:16] + keys[24:32])
        np.testing.assert_array_equal(cache.get(keys[16:24]), _as_stored(x[16:24]))
    assert manifest_files(root) == [dead.path]  # young: its writer may still be alive
    with LogLines() as logs, _open(tmp_path, readonly=True) as reader:
        assert "not merged into the index yet" in logs.take()  # readers say what they miss
        assert len(reader) == 16
    old = time.time() - ORPHAN_AGE_S - 1
    os.utime(dead.path, (old, old))
    for p in (root / "shards").iterdir():
        os.utime(p, (old, old))
    with _open(tmp_path) as cache:
        assert manifest_files(root) == []  # untouched for ORPHAN_AGE_S: its writer died
        assert cache.remove_orphans() == 1  # the torn line's shard: nothing points at it
        assert len(cache) == 16 and cache.verify().bad_entries == 0


# ---------------------------------------------------------------------------------------
# two nodes on loopback

N_IMAGES = 40  # 5 photos x 4 crops + 20 digits
SIZE = 512  # ~0.1 s per image on one thread: a node's share takes long enough to be killed mid-run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sam_config(root: Path, images: Path, ckpt: Path) -> Path:
    cfg = {
        "run_dir": str(root / "run"),
        "device": "cpu",
        "precision": "fp32",
        "data": {"image_root": str(images), "format": "folder", "val_fraction": 0.2},
        "backbone": {"name": "sam", "checkpoint": str(ckpt), "img_size": SIZE},
        "features": {"cache_dir": str(root / "cache"), "batch_size": 1, "num_workers": 0},
    }
    path = root / "samprobe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch_node(cfg: Path, node_rank: int, port: int) -> subprocess.Popen:
    """One of two single-process torchrun nodes meeting at 127.0.0.1:port."""
    torchrun = Path(PY).parent / "torchrun"
    return subprocess.Popen(
        [
            str(torchrun),
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "samprobe",
            "extract",
            "-c",
            str(cfg),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each worker in a session of its own, so
    killing the agent's process group would leave the worker running)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the field after the parenthesised name: state, then the parent pid
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(parents.get(tree[-1], []))
    return tree


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's agent and workers at once, as when its machine goes down."""
    for pid in _process_tree(node.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.communicate()


def _run_nodes(cfg: Path) -> str:
    port = _free_port()
    nodes = [_launch_node(cfg, r, port) for r in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    for n, out in zip(nodes, outs):
        assert n.returncode == 0, out[-3000:]
    return outs[0]


def _manifest_keys(root: Path) -> list[str]:
    return [k for p in manifest_files(root) for _, rec in read_manifest(p)[0] for k in rec.keys]


@pytest.fixture(scope="module")
def sam_corpus(tmp_path_factory):
    """40 real images, a tiny SAM checkpoint, and their features from one uninterrupted process."""
    root = tmp_path_factory.mktemp("single")
    images = make_corpus(root, n_digits=20, crops=4)
    ckpt = write_official_checkpoint(root / "sam_tiny.pth", "tiny", img_size=SIZE)
    cfg = _sam_config(root, images, ckpt)
    assert run_extract(load_config(cfg), progress=False).extracted == N_IMAGES
    keys = sorted({r.sha256 for r in read_splits(root / "run" / "splits.csv")})
    with Extractor.from_config(load_config(cfg)).open_cache(root / "cache") as cache:
        x = cache.get(keys)
    terms = reduction_terms(
        build_official_sam("tiny", img_size=SIZE).image_encoder, tokens=(SIZE // 16) ** 2
    )
    return {"images": images, "ckpt": ckpt, "keys": keys, "x": x, "terms": terms}


def _check_matches_single_process(cfg: Path, sam_corpus, dead: tuple[Path, ...] = ()) -> None:
    """Every image indexed once, no manifest left but ``dead`` ones, verify clean, features as
    one process made them."""
    config = load_config(cfg)
    ex = Extractor.from_config(config)
    root = Path(config.features.cache_dir) / ex.fingerprint
    assert index_count(root) == N_IMAGES
    assert manifest_files(root) == list(dead)  # this run's merged and deleted
    assert main(["cache", "verify", "-c", str(cfg)]) == 0
    with ex.open_cache(config.features.cache_dir, readonly=True) as cache:
        x = cache.get(sam_corpus["keys"])
    # other processes and thread counts: one fp16 ulp where float32 sums cross a rounding boundary
    np.testing.assert_allclose(
        x,
        sam_corpus["x"],
        **close_after_storage(
            np.float16, terms=sam_corpus["terms"], scale=magnitude(sam_corpus["x"])
        ),
    )


@pytest.mark.slow
def test_two_nodes_on_loopback_extract_each_image_once_and_match_single_process(
    sam_corpus, tmp_path
):
    cfg = _sam_config(tmp_path, sam_corpus["images"], sam_corpus["ckpt"])
    out = _run_nodes(cfg)
    # rank 0 reports the sum over both nodes: N extractions for N distinct images
    assert f"extract: {N_IMAGES} extracted, 0 already cached, 0 failed" in out, out
    assert "2 ranks: 0 on cpu, 1 on cpu" in out
    _check_matches_single_process(cfg, sam_corpus)


@pytest.mark.slow
def test_killed_node_rerun_resumes_with_nothing_lost(sam_corpus, tmp_path):
    cfg = _sam_config(tmp_path, sam_corpus["images"], sam_corpus["ckpt"])
    root = tmp_path / "cache" / Extractor.from_config(load_config(cfg)).fingerprint
    port = _free_port()
    nodes = [_launch_node(cfg, r, port) for r in (0, 1)]
    # node 1 goes down (agent and worker, SIGKILL) once it has committed a few batches
    deadline, rank1 = time.monotonic() + 240, []
    while time.monotonic() < deadline and nodes[1].poll() is None:
        rank1 = [p for p in manifest_files(root) if p.name.startswith("rank1-")]
        if rank1 and len(read_manifest(rank1[0])[0]) >= 2:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            nodes[1].wait(timeout=0.005)
    _kill_node(nodes[1])
    assert rank1, "node 1 never committed a batch"
    rank1_records, rank1_closed = read_manifest(rank1[0])
    assert not rank1_closed and len(rank1_records) < N_IMAGES // 2  # killed mid-run
    # node 0 finishes its share, then finds its peer gone and fails
    try:
        nodes[0].communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_node(nodes[0])
    assert nodes[0].returncode != 0
    committed = _manifest_keys(root)
    assert len(committed) == len(set(committed)) > 0  # nothing committed twice
    out = _run_nodes(cfg)
    # what was committed before the kill is kept; only the rest is extracted
    done = f"extract: {N_IMAGES - len(committed)} extracted, {len(committed)} already cached"
    assert done in out, out
    # the killed writer's manifest is merged but kept until it is ORPHAN_AGE_S old: nothing
    # tells a dead writer from a slow one on another host
    _check_matches_single_process(cfg, sam_corpus, dead=(rank1[0],))
    old = time.time() - ORPHAN_AGE_S - 1
    os.utime(rank1[0], (old, old))
    with Extractor.from_config(load_config(cfg)).open_cache(tmp_path / "cache") as cache:
        assert manifest_files(root) == [] and len(cache) == N_IMAGES


@pytest.mark.slow
def test_user_error_on_rank_0_reaches_every_rank(tmp_path):
    """Only rank 0 opens the index: when that fails (here a cache of another layout), every rank
    stops with rank 0's message and the user-error exit, none waits for a peer that gave up."""
    images = make_corpus(tmp_path, n_digits=4, crops=1)
    cfg = write_config(tmp_path, images)
    fp_dir = tmp_path / "cache" / Extractor.from_config(load_config(cfg)).fingerprint
    fp_dir.mkdir(parents=True)
    (fp_dir / "meta.json").write_text(json.dumps({"layout": "shards-v0"}))
    p = subprocess.run(
        [str(Path(PY).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
        + ["-m", "samprobe", "extract", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert out.count("was written in cache layout 'shards-v0'") == 2, out[-3000:]
    assert "exitcode  : 2" in out and "exitcode  : 1" not in out, out[-3000:]
