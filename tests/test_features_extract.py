"""Extraction into the cache: kill/resume, content addressing, OOM splitting, torchrun, export, cache CLI."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.cache_corpus import PY, REPO, LogLines, index_count, make_corpus, write_config
from helpers.tolerance import close_after_storage, efficientnet_lite0_terms, magnitude
from samprobe.backbones.registry import Backbone, PooledFeature
from samprobe.cli import main
from samprobe.config import load_config
from samprobe.data.images import resize_square
from samprobe.data.records import Record, read_splits
from samprobe.errors import DeviceError
from samprobe.features.cache import FeatureCache
from samprobe.features.extract import Extractor
from samprobe.io import sha256_file
from samprobe.pipeline import run_extract, run_validate

N = 27  # images in the shared corpus: 5 photos x 3 crops + 12 digits


def _features(cfg_path: Path, keys: list[str]) -> np.ndarray:
    cfg = load_config(cfg_path)
    ex = Extractor.from_config(cfg)
    with ex.open_cache(cfg.features.cache_dir) as cache:
        assert cache.verify().bad_entries == 0
        return cache.get(keys)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """27 real images extracted once, uninterrupted, in this process (batch 2)."""
    root = tmp_path_factory.mktemp("baseline")
    images = make_corpus(root, n_digits=12, crops=3)
    cfg = write_config(root, images, batch_size=2)
    result = run_extract(load_config(cfg), progress=False)
    assert result.extracted == N and not result.failures
    keys = sorted({r.sha256 for r in read_splits(root / "run" / "splits.csv")})
    return {
        "root": root,
        "images": images,
        "cfg": cfg,
        "keys": keys,
        "x": _features(cfg, keys),
        "fingerprint": Extractor.from_config(load_config(cfg)).fingerprint,
    }


@pytest.mark.slow
def test_sigkill_mid_run_resumes_only_missing_and_matches_uninterrupted(baseline, tmp_path):
    cfg = write_config(tmp_path, baseline["images"], batch_size=2)
    fp_dir = tmp_path / "cache" / baseline["fingerprint"]
    proc = subprocess.Popen(
        [PY, "-m", "samprobe", "extract", "-c", str(cfg)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # same thread count as this process: oneDNN results depend on it
        env={
            **__import__("os").environ,
            "PYTHONPATH": str(REPO / "src"),
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
        },
    )
    committed = 0
    while proc.poll() is None:
        committed = index_count(fp_dir) if (fp_dir / "index.sqlite").exists() else 0
        if committed >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.002)
    assert proc.wait() == -signal.SIGKILL, "extract finished before it could be killed"
    at_kill = index_count(fp_dir)
    assert 4 <= at_kill < N
    result = run_extract(load_config(cfg), progress=False)
    assert result.extracted == N - at_kill and result.cached == at_kill
    assert main(["cache", "verify", "-c", str(cfg)]) == 0
    np.testing.assert_array_equal(_features(cfg, baseline["keys"]), baseline["x"])


@pytest.mark.slow
def test_torchrun_two_ranks_extract_each_image_once_and_match_single_process(baseline, tmp_path):
    cfg = write_config(tmp_path, baseline["images"], batch_size=2)
    torchrun = Path(PY).parent / "torchrun"
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "samprobe",
            "extract",
            "-c",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 reports the sum over ranks: N extractions for N distinct images, all N indexed -> none
    # twice
    assert f"extract: {N} extracted, 0 already cached, 0 failed" in p.stdout, p.stdout
    assert "2 ranks: 0 on cpu, 1 on cpu" in p.stdout  # each rank and its device
    fp_dir = tmp_path / "cache" / baseline["fingerprint"]
    assert index_count(fp_dir) == N
    x = _features(cfg, baseline["keys"])
    # other processes, batches and thread counts: one fp16 ulp where float32 sums cross a rounding
    # boundary
    np.testing.assert_allclose(
        x,
        baseline["x"],
        **close_after_storage(
            np.float16, terms=efficientnet_lite0_terms(), scale=magnitude(baseline["x"])
        ),
    )


@pytest.mark.slow
def test_rename_keeps_edit_reextracts_corruption_reextracts_and_fingerprint_changes(tmp_path):
    images = make_corpus(tmp_path, n_digits=4, crops=1)
    cfg_path = write_config(tmp_path, images)
    cfg = load_config(cfg_path)
    assert run_extract(cfg, progress=False).extracted == 9
    # rename + move: same bytes, same key, nothing to extract
    (images / "digit" / "d000_0.png").rename(images / "digit" / "renamed.png")
    shutil.move(images / "photo" / "chelsea_0.png", images / "photo" / "moved_cat.png")
    run_validate(cfg, progress=False)
    r = run_extract(cfg, progress=False)
    assert (r.extracted, r.cached) == (0, 9)
    # edited bytes: a new key, extracted once
    im = np.array(Image.open(images / "digit" / "renamed.png"))
    im[0, 0] = 255 - im[0, 0]
    Image.fromarray(im).save(images / "digit" / "renamed.png")
    run_validate(cfg, progress=False)
    assert run_extract(cfg, progress=False).extracted == 1
    # a damaged shard is detected by extract and its entries redone, never used
    ex = Extractor.from_config(cfg)
    with ex.open_cache(cfg.features.cache_dir) as cache:
        shard = next(iter(cache._shards().values()))
        n = cache.verify().entries
    with open(cache.shard_dir / shard.file, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(["cache", "verify", "-c", str(cfg_path)]) == 2
    r = run_extract(cfg, progress=False)
    # the one shard held all 9 current keys + the stale pre-edit one
    assert shard.rows == n == 10 and r.extracted == 9
    assert main(["cache", "verify", "-c", str(cfg_path)]) == 0
    # fingerprint: input size and checkpoint bytes matter, the checkpoint's path does not
    fps = {
        Extractor.from_config(load_config(cfg_path, [f"backbone.img_size={s}"])).fingerprint
        for s in (64, 96)
    }
    assert len(fps) == 2
    from samprobe.backbones.timm_models import efficientnet_lite0_weights

    src = efficientnet_lite0_weights()
    same = tmp_path / "copy.pth"
    shutil.copy(src, same)
    sd = torch.load(src, weights_only=True)
    first = next(iter(sd))
    sd[first] = sd[first] + 1e-3
    edited = tmp_path / "edited.pth"
    torch.save(sd, edited)
    fp = {
        p: Extractor.from_config(load_config(cfg_path, [f"backbone.checkpoint={p}"])).fingerprint
        for p in (same, edited)
    }
    assert fp[same] == ex.fingerprint != fp[edited]


@pytest.mark.slow
def test_cache_info_and_prune_drop_unreferenced_entries(tmp_path):
    images = make_corpus(tmp_path, n_digits=4, crops=1)
    cfg_path = write_config(tmp_path, images)
    cfg = load_config(cfg_path)
    run_extract(cfg, progress=False)
    with LogLines() as out:
        assert main(["cache", "info", "-c", str(cfg_path)]) == 0
        assert "(this config): 9 entries, 1 shards" in out.take()
        (images / "photo" / "rocket_0.png").unlink()
        (images / "digit" / "d001_1.png").unlink()
        run_validate(cfg, progress=False)
        out.take()
        assert main(["cache", "prune", "-c", str(cfg_path)]) == 0  # a dry run by default
        assert "would remove 2 of 9 entries, would free about" in out.take()
        assert main(["cache", "prune", "-c", str(cfg_path), "--yes"]) == 0
        assert "removed 2 of 9 entries, freed" in out.take()
    keys = [r.sha256 for r in read_splits(cfg.run_dir / "splits.csv")]
    with Extractor.from_config(cfg).open_cache(cfg.features.cache_dir) as cache:
        assert len(cache) == 7 and cache.missing(keys) == [] and cache.verify().bad_entries == 0
        assert cache.stats()["shard_bytes"] == 7 * 1280 * 2


@pytest.mark.slow
def test_features_export_npz_and_parquet(baseline, tmp_path):
    import pyarrow.parquet as pq

    cfg = baseline["cfg"]
    recs = read_splits(baseline["root"] / "run" / "splits.csv")
    x = _features(cfg, [r.sha256 for r in recs])
    assert (
        main(
            [
                "features",
                "export",
                "-c",
                str(cfg),
                "--split",
                "all",
                "--out",
                str(tmp_path / "f.npz"),
            ]
        )
        == 0
    )
    z = np.load(tmp_path / "f.npz")
    np.testing.assert_array_equal(z["features"], x)
    assert list(z["label"]) == [r.label for r in recs] and list(z["split"]) == [
        r.split for r in recs
    ]
    assert (
        main(
            [
                "features",
                "export",
                "-c",
                str(cfg),
                "--split",
                "val",
                "--out",
                str(tmp_path / "f.parquet"),
            ]
        )
        == 0
    )
    t = pq.read_table(tmp_path / "f.parquet").to_pydict()
    val = [i for i, r in enumerate(recs) if r.split == "val"]
    assert t["path"] == [recs[i].path for i in val] and set(t["split"]) == {"val"}
    np.testing.assert_array_equal(np.array(t["features"], dtype=np.float32), x[val])


# ----------------------------------------------------------------------------- out of memory


class OomBackbone(Backbone):
    """Raises CUDA out-of-memory (on the CPU) for batches larger than ``limit``; features = channel means."""

    name = "oom_fake"
    input_size = 32
    default_pooling = ("avg",)

    def __init__(self, limit: int, exc: type[Exception] = torch.cuda.OutOfMemoryError) -> None:
        super().__init__()
        self.limit, self.exc, self.calls = limit, exc, []

    def prepare(self, image):
        return torch.from_numpy(np.ascontiguousarray(resize_square(image, 32))).permute(2, 0, 1), (
            32,
            32,
        )

    def encode(self, images, valid_hw, pooling):
        self.calls.append(images.shape[0])
        if images.shape[0] > self.limit:
            raise self.exc("CUDA out of memory. Tried to allocate 2.00 GiB")
        return images.float().mean(dim=(2, 3))  # [B, 3]

    def features(self):
        return {"avg": PooledFeature("image", "avg", 3)}

    def identity(self):
        return {"model": "oom_fake"}


def _records(images: Path) -> list[Record]:
    files = sorted(images.rglob("*.png"))
    return [
        Record(i, f.name, str(f), f.parent.name, "train", sha256_file(f))
        for i, f in enumerate(files)
    ]


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_oom_splits_batches_down_and_matches_unsplit_features(tmp_path, exc):
    recs = _records(make_corpus(tmp_path, n_digits=6, crops=1))
    runs = {}
    for limit, bs in ((2, 8), (100, 1)):
        bb = OomBackbone(limit, exc)
        ex = Extractor(bb, ["avg"], "float32", torch.device("cpu"), "fp32", "oomfp")
        with FeatureCache(tmp_path / f"c{limit}", "oomfp", 3, "float32") as cache:
            r = ex.run(recs, cache, batch_size=bs, num_workers=0, progress=False)
            assert r.extracted == 11
            runs[limit] = (cache.get([x.sha256 for x in recs]), bb.calls)
    x_split, calls = runs[2]
    # 8 and 4 fail, 2 fits; the rest of the first batch and the next batch (3 images) go straight to
    # 2
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1]
    np.testing.assert_array_equal(x_split, runs[100][0])


def test_oom_at_batch_one_is_a_device_error(tmp_path):
    recs = _records(make_corpus(tmp_path, n_digits=3, crops=0))
    ex = Extractor(OomBackbone(0), ["avg"], "float32", torch.device("cpu"), "fp32", "oomfp")
    with FeatureCache(tmp_path / "c", "oomfp", 3, "float32") as cache:
        with pytest.raises(
            DeviceError, match="out of memory on cpu encoding a single image"
        ) as info:
            ex.run(recs, cache, batch_size=4, num_workers=0, progress=False)
        assert "bf16" in info.value.fix and len(cache) == 0
