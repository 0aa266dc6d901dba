"""MobileSAM against its reference (PyPI mobilesam-mirror's ``mobile_sam``): encoder parity on real
photos, detection, variant mismatch, bad files, extra keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data

from helpers.sam_factory import build_official_mobile_sam, write_official_checkpoint
from samprobe.backbones.mobile_sam import MobileSamBackbone, infer_tinyvit_geometry
from samprobe.backbones.registry import build_backbone
from samprobe.config import BackboneConfig
from samprobe.errors import CheckpointError, ConfigError

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


def _photos() -> list[np.ndarray]:
    return [data.chelsea(), np.ascontiguousarray(data.astronaut()[:, 140:330]), data.coffee()]


def _official(sam, images: list[np.ndarray], size: int):
    """Official preprocessing (numpy ResizeLongestSide + Sam.preprocess) and the TinyViT encoder's
    trunk and neck. ``TinyViT.forward_features`` hard-codes a 64x64 map (1024 px); at other sizes the
    same official layers run here with the map reshaped to the input's own grid."""
    tf = ResizeLongestSide(size)
    resized = [tf.apply_image(img) for img in images]
    x = torch.cat(
        [sam.preprocess(torch.as_tensor(r).permute(2, 0, 1)[None].float()) for r in resized]
    )
    enc = sam.image_encoder
    with torch.no_grad():
        if size == 1024:
            neck = enc(x)
            trunk = None
        else:
            y = enc.patch_embed(x)
            for layer in enc.layers:
                y = layer(y)
            trunk = y.view(len(images), size // 16, size // 16, -1).permute(0, 3, 1, 2)
            neck = enc.neck(trunk)
    return neck, trunk, [r.shape[:2] for r in resized]


def _check_parity(sam, path, size: int) -> None:
    images = _photos()
    ref_neck, ref_trunk, hws = _official(sam, images, size)
    bb = build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=size))
    assert isinstance(bb, MobileSamBackbone) and bb.found.startswith("MobileSAM checkpoint")
    prepared = [bb.prepare(img) for img in images]
    x, valid = torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])
    assert [tuple(v) for v in valid.tolist()] == [tuple(h) for h in hws]
    from samprobe.data.images import sam_normalize_pad

    with torch.inference_mode():
        trunk, neck = bb.encoder(sam_normalize_pad(x, valid))
    assert (neck - ref_neck).abs().max().item() < 1e-4
    if ref_trunk is not None:
        assert (trunk - ref_trunk).abs().max().item() < 1e-4
    ref = torch.stack(
        [
            torch.cat(
                [
                    f[:, : math.ceil(h / 16), : math.ceil(w / 16)].mean((1, 2)),
                    f[:, : math.ceil(h / 16), : math.ceil(w / 16)].amax((1, 2)),
                ]
            )
            for f, (h, w) in zip(ref_neck, hws)
        ]
    )
    ours = bb.encode(x, valid, ["neck_avg", "neck_max"])
    assert F.cosine_similarity(ours, ref).min().item() >= 0.9999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = bb.encode(x, valid, ["neck_avg", "neck_max"])
    assert F.cosine_similarity(bf16, ref).min().item() >= 0.99


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sam = build_official_mobile_sam("tiny", img_size=256)
    path = tmp_path_factory.mktemp("ms") / "mobile_sam_tiny.pt"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_parity_tiny_at_256(tiny):
    _check_parity(*tiny, 256)


@pytest.mark.native  # the released TinyViT-5M at 1024 px, ours (fp32, bf16) and the official: 3 photos x 3 forwards
def test_parity_tiny_vit_5m_at_1024(tmp_path):
    sam = build_official_mobile_sam("tiny_vit_5m", img_size=1024)
    path = tmp_path / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    assert infer_tinyvit_geometry(sam.state_dict(), "f").variant == "tiny_vit_5m"
    _check_parity(sam, path, 1024)


def test_release_geometry_is_detected_from_shapes():
    # 10M parameters: builds in a second
    sam = build_official_mobile_sam("tiny_vit_5m", img_size=1024)
    g = infer_tinyvit_geometry(sam.state_dict(), "mobile_sam.pt")
    assert (g.variant, g.embed_dims, g.depths, g.num_heads[1:], g.window_sizes[1:]) == (
        "tiny_vit_5m",
        (64, 128, 160, 320),
        (2, 2, 6, 2),
        (4, 5, 10),
        (7, 14, 7),
    )


def test_variant_mismatch_truncated_and_other_kind(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(ConfigError) as err:
        build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=256, variant="vit_b"))
    assert "backbone.variant is vit_b" in str(err.value) and "MobileSAM custom encoder" in str(
        err.value
    )
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone(BackboneConfig(name="mobile_sam", checkpoint=cut))
    sam1 = write_official_checkpoint(tmp_path / "sam1.pth", "tiny", img_size=256)
    with pytest.raises(
        ConfigError, match="backbone.name is mobile_sam but .* is a SAM 1 checkpoint"
    ):
        build_backbone(BackboneConfig(name="mobile_sam", checkpoint=sam1))
    sd = torch.load(path, weights_only=True)
    no_neck = tmp_path / "no_neck.pt"
    torch.save({k: v for k, v in sd.items() if ".neck." not in k}, no_neck)
    with pytest.raises(CheckpointError, match="does not hold a MobileSAM TinyViT encoder"):
        build_backbone(BackboneConfig(name="sam", checkpoint=no_neck))


def test_extra_keys_are_ignored(tiny, tmp_path):
    _, path = tiny
    sd = torch.load(path, weights_only=True)
    assert any(k.startswith("mask_decoder.") for k in sd)
    extra = tmp_path / "extra.pt"
    torch.save(
        {**sd, "image_encoder.head.weight": torch.zeros(1000, 320), "adapter.bias": torch.ones(3)},
        extra,
    )
    a = MobileSamBackbone.from_checkpoint(path, img_size=256)
    b = MobileSamBackbone.from_checkpoint(extra, img_size=256)
    x, hw = a.prepare(data.coffee())
    # extra keys ignored: the same weights on the same input, bit for bit
    assert torch.equal(
        a.encode(x[None], torch.tensor([hw]), ["neck_avg", "trunk_avg"]),
        b.encode(x[None], torch.tensor([hw]), ["neck_avg", "trunk_avg"]),
    )
    with pytest.raises(ConfigError, match="multiple of 16"):
        MobileSamBackbone.from_checkpoint(path, img_size=250)
