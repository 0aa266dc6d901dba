"""features.spatial: a pooled token grid per image beside the pooled features (second cache array)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data

from helpers.cache_corpus import make_corpus, write_config
from helpers.digits_run import write_digits_project
from helpers.sam_factory import build_official_sam, write_official_checkpoint
from helpers.tolerance import (
    close_after_rounding,
    close_after_storage,
    efficientnet_lite0_terms,
    eps,
    magnitude,
    reduction_terms,
    rounding_atol,
)
from samprobe.backbones.registry import grid_array, pool_grid
from samprobe.backbones.sam import SamBackbone
from samprobe.cli import main
from samprobe.config import load_config
from samprobe.data.records import read_splits
from samprobe.errors import ConfigError
from samprobe.features.cache import estimate_bytes
from samprobe.features.extract import Extractor, load_features, load_grid
from samprobe.pipeline import run_extract

N = 9  # corpus: 5 photo crops (96x80) + 4 digits (32x32)


def _records(root: Path):
    return sorted(read_splits(root / "run" / "splits.csv"), key=lambda r: r.path)


def _open(cfg_path: Path):
    cfg = load_config(cfg_path)
    ex = Extractor.from_config(cfg)
    return ex, ex.open_cache(cfg.features.cache_dir)


# ---------------------------------------------------------------------------------------
# pooling


def test_pool_grid_uses_valid_tokens_only():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 10)  # [B, C, gh, gw]
    valid = torch.tensor([[4, 6], [6, 10]])  # image 0: rows < 4, cols < 6 valid
    clean = pool_grid(x, valid, 2)
    poisoned = x.clone()
    poisoned[0, :, 4:, :] = 1e6  # padding rows
    poisoned[0, :, :, 6:] = -1e6  # padding cols
    # padding never enters the sums (masked out before them): the result is the same bits
    assert torch.equal(pool_grid(poisoned, valid, 2), clean)
    # 4x6 valid region to 2x2 -> 2x3 blocks; token order row-major
    blocks = x[0, :, :4, :6].reshape(8, 2, 2, 2, 3).mean((2, 4))  # [C, 2, 2]
    torch.testing.assert_close(clean[0], blocks.flatten(1).T)
    assert clean.shape == (2, 4, 8) and clean.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# SAM: grid = official neck's valid region pooled


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_official_checkpoint(
        tmp_path_factory.mktemp("w") / "tiny.pth", "tiny", img_size=256
    )


def _official_grids(
    ckpt_sam, images: list[np.ndarray], size: int, spatial: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid from the valid region, grid from the whole map) of segment_anything's own neck output."""
    tf = ResizeLongestSide(size)
    valid, whole = [], []
    for img in images:
        r = tf.apply_image(img)
        x = ckpt_sam.preprocess(torch.as_tensor(r).permute(2, 0, 1)[None].float())
        with torch.no_grad():
            neck = ckpt_sam.image_encoder(x)[0]  # [256, gh, gw]
        region = neck[:, : math.ceil(r.shape[0] / 16), : math.ceil(r.shape[1] / 16)]
        valid.append(F.adaptive_avg_pool2d(region, spatial).flatten(1).T)
        whole.append(F.adaptive_avg_pool2d(neck, spatial).flatten(1).T)
    return torch.stack(valid), torch.stack(whole)


def test_sam_grid_is_official_neck_valid_region_pooled(tiny_ckpt):
    sam = build_official_sam("tiny", img_size=256)  # same seed -> the weights in tiny_ckpt
    bb = SamBackbone.from_checkpoint(tiny_ckpt, img_size=256)
    # square, wide, tall
    images = [
        data.astronaut(),
        data.chelsea(),
        np.ascontiguousarray(data.astronaut()[:, 140:330]),
    ]
    prepared = [bb.prepare(im) for im in images]
    x, hw = torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])
    pooled, grid = bb.encode_grid(x, hw, ["neck_avg"], 4)
    ref, whole = _official_grids(sam, images, 256, 4)
    assert grid.shape == (3, 16, 256) and grid.dtype == torch.float32
    # timm's attention vs the official one: same sums in another order; scale: the encoder's neck is
    # layer-normed, its inputs O(1) normalised pixels; 16x16 = 256 tokens per attention
    terms = reduction_terms(sam.image_encoder, tokens=256)
    torch.testing.assert_close(
        grid, ref, **close_after_rounding(torch.float32, terms=terms, scale=magnitude(ref, 1.0))
    )
    # padding really is excluded: for the wide and the tall image, pooling the whole map differs
    for i in (1, 2):
        assert (whole[i] - ref[i]).abs().max().item() > 1e-2
    # same forward as encode(); the grid's mean is not the pooled mean (adaptive bins overlap), so
    # compare encode
    torch.testing.assert_close(
        pooled,
        bb.encode(x, hw, ["neck_avg"]),
        **close_after_rounding(torch.float32, terms=terms + 256, scale=magnitude(ref, 1.0)),
    )


@pytest.mark.slow
def test_sam_extract_stores_fp16_grid_matching_official(tiny_ckpt, tmp_path):
    images = make_corpus(tmp_path, n_digits=4, crops=1)
    cfg = write_config(tmp_path, images, spatial=4)
    raw = yaml.safe_load(cfg.read_text())
    raw["backbone"] = {"name": "sam", "checkpoint": str(tiny_ckpt), "img_size": 256}
    cfg.write_text(yaml.safe_dump(raw))
    assert run_extract(load_config(cfg), progress=False).extracted == N
    recs = _records(tmp_path)
    ex, cache = _open(cfg)
    with cache:
        stored = cache.get([r.sha256 for r in recs], array=grid_array(4), dtype=None)
        grid = load_grid(cache, recs, 4)
    assert stored.dtype == np.float16 and stored.shape == (N, 16 * 256)
    assert grid.shape == (N, 16, 256) and grid.dtype == np.float32
    from PIL import Image

    ref, _ = _official_grids(
        build_official_sam("tiny", img_size=256),
        [np.asarray(Image.open(r.file).convert("RGB")) for r in recs],
        256,
        4,
    )
    terms = reduction_terms(build_official_sam("tiny", img_size=256).image_encoder, tokens=256)
    np.testing.assert_allclose(
        grid, ref.numpy(), **close_after_storage(np.float16, terms=terms, scale=magnitude(ref, 1.0))
    )


# ---------------------------------------------------------------------------------------
# efficientnet_lite0 (timm): extraction, fingerprint, resume, export, disk estimate


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    images = make_corpus(root, n_digits=4, crops=1)
    # pooled only, own folder (write_config writes <folder>/samprobe.yaml), the cache shared with
    # _with_spatial's
    (root / "plain").mkdir()
    plain = write_config(root / "plain", images, cache_dir=root / "cache")
    assert run_extract(load_config(plain), progress=False).extracted == N
    ex, cache = _open(plain)
    with cache:
        pooled = load_features(cache, _records(root / "plain"))
    return {
        "root": root,
        "images": images,
        "plain": plain,
        "pooled": pooled,
        "fingerprint": ex.fingerprint,
    }


def _with_spatial(lite, spatial: int = 2) -> Path:
    return write_config(lite["root"], lite["images"], spatial=spatial)


@pytest.mark.slow
def test_lite_grid_shape_dtype_and_unchanged_pooled_fingerprint(lite):
    cfg = _with_spatial(lite)
    ex = Extractor.from_config(load_config(cfg))
    assert ex.fingerprint == lite["fingerprint"]  # turning the grid on keeps the pooled cache
    result = run_extract(load_config(cfg), progress=False)
    assert result.extracted == N  # every image lacked its grid
    recs = _records(lite["root"])
    with ex.open_cache(load_config(cfg).features.cache_dir) as cache:
        grid = load_grid(cache, recs, 2)
        assert cache.get([r.sha256 for r in recs], array="grid2", dtype=None).dtype == np.float16
        # the same entries, not re-extracted
        np.testing.assert_array_equal(load_features(cache, recs), lite["pooled"])
    # 64 px -> 2x2 map of 1280 channels
    assert grid.shape == (N, 4, 1280) and grid.dtype == np.float32
    # at 64 px the map is 2x2: the 2x2 grid is the map itself, whose mean is the global average pool
    # both rounded to fp16 from one forward: half an fp16 ulp of the largest token plus half of the
    # mean's, and the float32 means of 4 values on either side (the pool's, this one)
    np.testing.assert_allclose(
        grid.mean(1),
        lite["pooled"],
        rtol=0,
        atol=eps(np.float16) * magnitude(grid)
        + 2 * rounding_atol(torch.float32, terms=4, scale=magnitude(grid)),
    )
    assert run_extract(load_config(cfg), progress=False).extracted == 0  # nothing left to do


@pytest.mark.slow
def test_cache_info_counts_each_array(lite):
    cfg = _with_spatial(lite)
    run_extract(load_config(cfg), progress=False)
    from samprobe.features.manage import cache_info

    row = next(r for r in cache_info(load_config(cfg)) if r["current"])
    assert row["arrays"] == {"grid2": N, "pooled": N} and row["entries"] == 2 * N


@pytest.mark.slow
def test_resume_re_extracts_only_images_missing_their_grid(lite):
    cfg = _with_spatial(lite)
    run_extract(load_config(cfg), progress=False)
    recs = _records(lite["root"])
    ex, cache = _open(cfg)
    with cache:
        before = load_grid(cache, recs, 2)
    gone = [recs[0].sha256, recs[3].sha256, recs[7].sha256]
    db = sqlite3.connect(lite["root"] / "cache" / lite["fingerprint"] / "index.sqlite")
    with db:
        db.executemany("DELETE FROM entries WHERE array='grid2' AND key=?", [(k,) for k in gone])
    db.close()
    result = run_extract(load_config(cfg), progress=False)
    assert result.extracted == 3 and result.cached == N - 3
    with Extractor.from_config(load_config(cfg)).open_cache(
        load_config(cfg).features.cache_dir
    ) as cache:
        np.testing.assert_allclose(
            load_grid(cache, recs, 2),
            before,  # re-extracted in another batch: one fp16 ulp
            **close_after_storage(
                np.float16, terms=efficientnet_lite0_terms(), scale=magnitude(before)
            ),
        )
        assert cache.verify().bad_entries == 0


@pytest.mark.slow
def test_export_npz_contains_grid(lite, tmp_path):
    cfg = _with_spatial(lite)
    run_extract(load_config(cfg), progress=False)
    out = tmp_path / "all.npz"
    assert main(["features", "export", "-c", str(cfg), "--split", "all", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["spatial"].shape == (N, 4, 1280) and z["spatial"].dtype == np.float32
    ex, cache = _open(cfg)
    with cache:
        by_key = dict(
            zip(
                [r.sha256 for r in _records(lite["root"])],
                load_grid(cache, _records(lite["root"]), 2),
            )
        )
    for key, g in zip(z["sha256"], z["spatial"]):
        np.testing.assert_array_equal(g, by_key[str(key)])
    plain = tmp_path / "plain.npz"
    assert (
        main(
            ["features", "export", "-c", str(lite["plain"]), "--split", "all", "--out", str(plain)]
        )
        == 0
    )
    assert "spatial" not in np.load(plain).files


@pytest.mark.slow
def test_disk_estimate_counts_the_grid(lite, tmp_path, capsys):
    fresh = write_config(tmp_path, lite["images"], cache_dir=tmp_path / "cache", spatial=2)
    ex, cache = _open(fresh)
    keys = [f"k{i}" for i in range(10)]
    with cache:
        assert ex.disk_need(cache, keys) == estimate_bytes(10, 1280, "float16") + estimate_bytes(
            10, 4 * 1280, "float16"
        )
        ex.spatial = None
        assert ex.disk_need(cache, keys) == estimate_bytes(10, 1280, "float16")
    project = write_digits_project(tmp_path / "doctor", per_class=2)

    def need_mb(*sets: str) -> float:
        argv = ["doctor", "-c", str(project)] + [a for s in sets for a in ("--set", s)]
        main(argv)
        line = next(ln for ln in capsys.readouterr().out.splitlines() if " free disk:" in ln)
        return float(line.split("cache needs about ")[1].split(" MB")[0])

    plain, grid = need_mb(), need_mb("features.spatial=2")
    assert grid > 4 * plain  # 4 tokens x 1280 channels on top of 1280 pooled values


@pytest.mark.slow
def test_extract_logs_estimate_with_grid(lite, tmp_path, caplog):
    fresh = write_config(tmp_path, lite["images"], cache_dir=tmp_path / "cache", spatial=2)
    with caplog.at_level("INFO", logger="samprobe"):
        run_extract(load_config(fresh), progress=False)
    line = next(
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("extract: ") and "MB on disk" in r.getMessage()
    )
    mb = float(line.split("~")[1].split(" MB")[0])
    assert mb == pytest.approx(
        estimate_bytes(N, 1280, "float16") / 1e6 + estimate_bytes(N, 4 * 1280, "float16") / 1e6,
        abs=0.05,
    )
    assert "2x2 grid of 1280-d tokens" in line


@pytest.mark.slow
def test_spatial_larger_than_feature_map_is_a_config_error(lite, capsys):
    cfg = _with_spatial(lite, spatial=3)  # efficientnet_lite0 at 64 px has a 2x2 map
    with pytest.raises(ConfigError) as exc:
        Extractor.from_config(load_config(cfg))
    assert "features.spatial 3" in str(exc.value) and "2x2" in exc.value.fix + str(exc.value)
    assert main(["extract", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (
        "features.spatial 3 is larger than the 2x2 feature map of backbone 'efficientnet_lite0' "
        "at 64px" in err
    )
    assert "at most 2" in err
    assert main(["doctor", "-c", str(cfg)]) == 2
    assert any(
        " backbone checkpoint:" in ln and ln.split()[0] == "FAIL" and "features.spatial 3" in ln
        for ln in capsys.readouterr().out.splitlines()
    )


@pytest.mark.slow
def test_spatial_must_be_positive(lite, capsys):
    assert main(["extract", "-c", str(lite["plain"]), "--set", "features.spatial=0"]) == 2
    assert "features.spatial" in capsys.readouterr().err
