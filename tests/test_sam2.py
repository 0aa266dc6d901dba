"""SAM 2.1 (Hiera) against the official code (PyPI sam2 1.1.0, run in its own process by
sam2_factory): encoder parity, official preprocessing, detection from shapes, failures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage import data

from helpers.sam2_factory import PHOTOS, official_encoder_shapes, official_sam2
from helpers.sam_factory import write_official_checkpoint
from samprobe.backbones.registry import build_backbone, fingerprint
from samprobe.backbones.sam2 import Sam2Backbone, infer_hiera_geometry
from samprobe.backbones.sam_family import detect_family
from samprobe.config import BackboneConfig
from samprobe.errors import CheckpointError, ConfigError

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow

_STAGE_FEATURES = ["trunk_avg@1,2,3,4"]


@pytest.fixture(scope="module")
def t256(tmp_path_factory):
    """(checkpoint, reference outputs) of a random sam2.1_hiera_t, official code, photos at 256 px."""
    ckpt, ref = official_sam2(tmp_path_factory.mktemp("sam2"), "t", 256)
    return ckpt, torch.load(ref, weights_only=True)


def _prepared(bb: Sam2Backbone):
    prepared = [bb.prepare(getattr(data, name)()) for name in PHOTOS]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


def _check_parity(bb: Sam2Backbone, ref: dict) -> None:
    # 1. the encoder, from the official input: vision_features and every trunk stage
    with torch.inference_mode():
        maps = bb.forward_maps(ref["input"], {"neck", "stage@1", "stage@2", "stage@3", "stage@4"})
    assert maps["neck"].shape[1:] == (256, bb.input_size // 16, bb.input_size // 16)
    assert (maps["neck"] - ref["vision_features"]).abs().max().item() < 1e-4
    for i, stage in enumerate(ref["stages"], start=1):
        assert (maps[f"stage@{i}"] - stage).abs().max().item() < 1e-4, i
    # 2. end to end from the photos: our uint8 square resize vs the official float one
    x, valid = _prepared(bb)
    assert valid.tolist() == [[bb.input_size] * 2] * len(PHOTOS)
    ref_pooled = torch.cat(
        [ref["vision_features"].mean((2, 3)), *[s.mean((2, 3)) for s in ref["stages"]]], dim=1
    )
    ours = bb.encode(x, valid, ["neck_avg", *_STAGE_FEATURES])
    assert ours.shape == ref_pooled.shape
    assert F.cosine_similarity(ours, ref_pooled).min().item() >= 0.9999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = bb.encode(x, valid, ["neck_avg", *_STAGE_FEATURES])
    assert F.cosine_similarity(bf16, ref_pooled).min().item() >= 0.99
    # as the extractor runs it at bf16 on the CPU: weights cast once, autocast off inside
    bb.use_precision(torch.device("cpu"), "bf16")
    assert {p.dtype for p in bb.parameters()} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = bb.encode(x, valid, ["neck_avg", *_STAGE_FEATURES])
    assert native.dtype == torch.float32
    assert F.cosine_similarity(native, ref_pooled).min().item() >= 0.999


def test_parity_hiera_t(t256):
    ckpt, ref = t256
    _check_parity(Sam2Backbone.from_checkpoint(ckpt, img_size=256), ref)


def test_preprocessing_is_the_official_square_resize_and_imagenet_stats(t256):
    """Same input as SAM2Transforms up to the uint8 rounding of the resize (1/255 before /std)."""
    _, ref = t256
    bb = Sam2Backbone.from_checkpoint(t256[0], img_size=256)
    x, _ = _prepared(bb)
    level = (1 / 255) / min(0.229, 0.224, 0.225)  # one grey level after normalisation
    diff = (bb.preprocess(x) - ref["input"]).abs()
    assert diff.max().item() <= level + 1e-5
    # rounding to the nearest level, not an offset or another filter
    assert diff.mean().item() <= 0.5 * level


@pytest.mark.native  # hiera_b+ (80M params) written by sam2 in a subprocess, then both forwards at 512 px
def test_parity_hiera_b_plus_geometry(tmp_path):
    ckpt, ref = official_sam2(tmp_path, "b+", 512)
    bb = Sam2Backbone.from_checkpoint(ckpt, img_size=512)
    assert bb.geometry.variant == "hiera_b+" and bb.geometry.global_pos_size == (14, 14)
    _check_parity(bb, torch.load(ref, weights_only=True))


def test_detected_from_the_file_and_said(t256, caplog):
    ckpt, _ = t256
    sd = torch.load(ckpt, weights_only=True)
    assert set(sd) == {"model"} and detect_family(sd["model"]) == "sam2"
    with caplog.at_level("INFO", logger="samprobe"):
        bb = build_backbone(BackboneConfig(name="sam", checkpoint=ckpt, img_size=256))
    assert isinstance(bb, Sam2Backbone) and bb.geometry.variant == "hiera_t"
    assert "SAM 2.1 checkpoint, SAM 2 hiera_t encoder" in bb.found and bb.found in caplog.text
    assert bb.default_pooling == ("neck_avg",) and bb.feature_dims()["neck_avg"] == 256


@pytest.mark.parametrize(
    "size, variant, heads, global_blocks",
    [
        ("t", "hiera_t", 1, (5, 7, 9)),
        ("s", "hiera_s", 1, (7, 10, 13)),
        ("b+", "hiera_b+", 2, (12, 16, 20)),
        ("l", "hiera_l", 2, (23, 33, 43)),
    ],
)
def test_geometry_detected_from_official_shapes(
    tmp_path_factory, size, variant, heads, global_blocks
):
    shapes = official_encoder_shapes(tmp_path_factory.getbasetemp())[size]
    g = infer_hiera_geometry(shapes, "the file")
    assert (g.variant, g.num_heads, g.global_att_blocks, g.d_model) == (
        variant,
        heads,
        global_blocks,
        256,
    )
    assert g.stage_dims[-1] == shapes["image_encoder.neck.convs.0.conv.weight"].shape[1]


def test_variant_and_name_mismatch_name_both(t256, tmp_path):
    ckpt, _ = t256
    for wrong in ("hiera_l", "vit_b"):
        with pytest.raises(ConfigError) as err:
            build_backbone(BackboneConfig(name="sam", checkpoint=ckpt, img_size=256, variant=wrong))
        assert f"backbone.variant is {wrong}" in str(err.value) and "hiera_t" in str(err.value)
    sam1 = write_official_checkpoint(tmp_path / "sam1.pth", "tiny", img_size=256)
    with pytest.raises(ConfigError, match="backbone.name is sam2 but .* is a SAM 1 checkpoint"):
        build_backbone(BackboneConfig(name="sam2", checkpoint=sam1, img_size=256))


def test_truncated_and_other_kind_files(t256, tmp_path):
    ckpt, _ = t256
    cut = tmp_path / "cut.pt"
    with open(ckpt, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone(BackboneConfig(name="sam", checkpoint=cut))
    sd = torch.load(ckpt, weights_only=True)["model"]
    no_neck = tmp_path / "no_neck.pt"
    torch.save({"model": {k: v for k, v in sd.items() if ".neck." not in k}}, no_neck)
    with pytest.raises(CheckpointError, match="no FPN neck"):
        build_backbone(BackboneConfig(name="sam", checkpoint=no_neck))
    odd = tmp_path / "odd_trunk.pt"  # a trunk with one block less: no official geometry
    torch.save(
        {
            "model": {
                k: v for k, v in sd.items() if not k.startswith("image_encoder.trunk.blocks.11.")
            }
        },
        odd,
    )
    with pytest.raises(CheckpointError, match="none of the official SAM 2 encoders"):
        build_backbone(BackboneConfig(name="sam", checkpoint=odd))


def test_extra_keys_are_ignored_and_identity_is_stable(t256, tmp_path):
    """The official file holds the whole SAM 2 (memory attention, decoders...): only the encoder counts."""
    ckpt, _ = t256
    sd = torch.load(ckpt, weights_only=True)["model"]
    assert any(k.startswith("memory_attention.") for k in sd)
    extra = tmp_path / "extra.pt"
    torch.save({"model": {**sd, "my_adapter.weight": torch.randn(4, 4)}}, extra)
    a = Sam2Backbone.from_checkpoint(ckpt, img_size=256)
    b = Sam2Backbone.from_checkpoint(extra, img_size=256)
    x, valid = _prepared(a)
    # the same weights on the same input: bitwise the same features
    assert torch.equal(
        a.encode(x[:1], valid[:1], ["neck_avg"]), b.encode(x[:1], valid[:1], ["neck_avg"])
    )
    assert fingerprint(a, ["neck_avg"], "float16", "fp32") != fingerprint(
        b, ["neck_avg"], "float16", "fp32"
    )


def test_grid_is_vision_features_pooled(t256):
    ckpt, ref = t256
    bb = Sam2Backbone.from_checkpoint(ckpt, img_size=256)
    x, valid = _prepared(bb)
    pooled, grid = bb.encode_grid(x, valid, ["neck_avg"], 4)
    assert grid.shape == (3, 16, 256) and bb.grid_shape() == (256, 16, 16)
    torch.testing.assert_close(grid.mean(1), pooled, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="multiple of 32"):
        Sam2Backbone.from_checkpoint(ckpt, img_size=250)
