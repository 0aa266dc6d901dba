"""EfficientViT-SAM against its reference (PyPI efficientsam, = mit-han-lab/efficientvit at de7d773):
encoder parity on real photos, detection of the five releases, variant mismatch, bad files, extra keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from helpers.sam_factory import (
    build_official_efficientvit_sam,
    write_official_checkpoint,
    write_official_efficientvit_sam_checkpoint,
)
from samprobe.backbones.efficientvit_sam import (
    GRID,
    EfficientVitSamBackbone,
    infer_efficientvit_geometry,
)
from samprobe.backbones.registry import build_backbone
from samprobe.config import BackboneConfig
from samprobe.data.images import sam_normalize_pad
from samprobe.errors import CheckpointError, ConfigError

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


def _photos() -> list[np.ndarray]:
    return [data.chelsea(), np.ascontiguousarray(data.astronaut()[:, 140:330]), data.coffee()]


def _official(model, images: list[np.ndarray], size: int):
    """The official preprocessing (``EfficientViTSam.transform``'s steps at ``size``: SamResize, ToTensor,
    Normalize, SamPad) and image encoder -> (embedding [B, 256, 64, 64], last stage, resized (h, w))."""
    import torchvision.transforms as T
    from efficientsam.models.efficientvit.sam import SamPad, SamResize

    norm = model.transform.transforms[2]  # the official Normalize (mean/std on the 0-1 scale)
    tf = T.Compose([SamResize(size), T.ToTensor(), norm, SamPad(size)])
    x = torch.stack([tf(img) for img in images])
    hws = [SamResize.get_preprocess_shape(*img.shape[:2], size) for img in images]
    with torch.no_grad():
        stages = model.image_encoder.backbone(x)
        neck = model.image_encoder(x)
    return neck, stages["stage_final"], hws


def _pooled(maps: torch.Tensor, hws, stride: float) -> torch.Tensor:
    """Mean and max over each image's valid tokens (ceil of the resized size over the stride)."""
    return torch.stack(
        [
            torch.cat(
                [
                    f[:, : math.ceil(h / stride), : math.ceil(w / stride)].mean((1, 2)),
                    f[:, : math.ceil(h / stride), : math.ceil(w / stride)].amax((1, 2)),
                ]
            )
            for f, (h, w) in zip(maps, hws)
        ]
    )


def _check_parity(model, path, size: int) -> None:
    images = _photos()
    ref_neck, ref_trunk, hws = _official(model, images, size)
    bb = build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=size))
    assert isinstance(bb, EfficientVitSamBackbone)
    assert bb.found.startswith("EfficientViT-SAM checkpoint")
    prepared = [bb.prepare(img) for img in images]
    x, valid = torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])
    assert [tuple(v) for v in valid.tolist()] == [tuple(h) for h in hws]
    with torch.inference_mode():
        trunk, neck = bb.encoder(sam_normalize_pad(x, valid))
    assert neck.shape == ref_neck.shape == (3, 256, GRID, GRID)
    assert (neck - ref_neck).abs().max().item() < 1e-4
    assert (trunk - ref_trunk).abs().max().item() < 1e-4
    ref = _pooled(ref_neck, hws, size / GRID)
    ours = bb.encode(x, valid, ["neck_avg", "neck_max"])
    assert F.cosine_similarity(ours, ref).min().item() >= 0.9999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = bb.encode(x, valid, ["neck_avg", "neck_max"])
    assert F.cosine_similarity(bf16, ref).min().item() >= 0.99
    trunk_ref = _pooled(ref_trunk, hws, bb.geometry.stride)[:, : bb.geometry.widths[-1]]
    trunk_ours = bb.encode(x, valid, ["trunk_avg"])
    assert F.cosine_similarity(trunk_ours, trunk_ref).min().item() >= 0.9999


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_official_efficientvit_sam("tiny")
    path = tmp_path_factory.mktemp("evit") / "efficientvit_sam_tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_parity_tiny_at_256(tiny):
    _check_parity(*tiny, 256)


def test_parity_tiny_xl_type_at_256(tmp_path):
    """The XL layout: six stages, a stem without blocks, 3x3 LiteMLA aggregation, neck expand 4."""
    model = build_official_efficientvit_sam("tiny_xl")
    path = tmp_path / "xl.pt"
    torch.save(model.state_dict(), path)
    _check_parity(model, path, 256)


@pytest.mark.native  # the released L0 at its own 512 px: 3 photos, ours (fp32, bf16) and the official
def test_parity_l0_at_512(tmp_path):
    model = build_official_efficientvit_sam("l0")
    path = tmp_path / "efficientvit_sam_l0.pt"
    torch.save(model.state_dict(), path)
    _check_parity(model, path, 512)


@pytest.mark.parametrize(
    ("release", "stages", "native"),
    [("l0", 5, 512), ("l1", 5, 512), ("l2", 5, 512), ("xl0", 6, 1024), ("xl1", 6, 1024)],
)
def test_release_geometry_is_detected_from_shapes(release, stages, native):
    with torch.device("meta"):  # shapes only: the 200M-parameter XL1 costs no memory
        model = build_official_efficientvit_sam(release)
    g = infer_efficientvit_geometry(model.state_dict(), f"efficientvit_sam_{release}.pt")
    assert (g.variant, len(g.widths), g.native_size) == (f"efficientvit_{release}", stages, native)


def test_variant_mismatch_truncated_and_other_kind(tiny, tmp_path):
    _, path = tiny
    with pytest.raises(ConfigError) as err:
        build_backbone(
            BackboneConfig(name="sam", checkpoint=path, img_size=256, variant="efficientvit_l0")
        )
    assert "backbone.variant is efficientvit_l0" in str(err.value)
    assert "EfficientViT-SAM custom encoder" in str(err.value)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone(BackboneConfig(name="efficientvit_sam", checkpoint=cut))
    sam1 = write_official_checkpoint(tmp_path / "sam1.pth", "tiny", img_size=256)
    with pytest.raises(ConfigError, match="backbone.name is efficientvit_sam but .* is a SAM 1"):
        build_backbone(BackboneConfig(name="efficientvit_sam", checkpoint=sam1))
    sd = torch.load(path, weights_only=True)
    no_neck = tmp_path / "no_neck.pt"
    torch.save({k: v for k, v in sd.items() if ".neck." not in k}, no_neck)
    with pytest.raises(CheckpointError, match="does not hold an EfficientViT-SAM encoder"):
        build_backbone(BackboneConfig(name="sam", checkpoint=no_neck))
    odd = tmp_path / "odd.pt"  # a stage's width edited: the shapes contradict the geometry rules
    key = "image_encoder.backbone.stages.1.op_list.1.main.spatial_conv.conv.weight"
    torch.save({**sd, key: torch.zeros(7, *sd[key].shape[1:])}, odd)
    with pytest.raises(CheckpointError, match="do not fit their own geometry"):
        build_backbone(BackboneConfig(name="sam", checkpoint=odd, img_size=256))
    for old, new, says in (
        (
            "stages.1.op_list.1.main.spatial_conv.",
            "stages.1.op_list.1.main.other.",
            "unknown EfficientViT block at image_encoder.backbone.stages.1.op_list.1.",
        ),
        (
            "neck.middle.op_list.0.main.spatial_conv.",
            "neck.middle.op_list.0.main.other.",
            "neck blocks other than fused MBConv are not supported",
        ),
    ):
        other = tmp_path / "other_layout.pt"
        torch.save({k.replace(old, new): v for k, v in sd.items()}, other)
        with pytest.raises(CheckpointError, match=says):
            build_backbone(BackboneConfig(name="sam", checkpoint=other, img_size=256))


def test_extra_keys_and_state_dict_wrapper_are_accepted(tiny, tmp_path):
    _, path = tiny
    sd = torch.load(path, weights_only=True)
    assert any(k.startswith("mask_decoder.") for k in sd)
    extra = tmp_path / "extra.pt"  # the official loader also reads {"state_dict": ...}
    torch.save(
        {"state_dict": {**sd, "adapter.bias": torch.ones(3), "image_encoder_ema.w": torch.ones(1)}},
        extra,
    )
    a = EfficientVitSamBackbone.from_checkpoint(path, img_size=256)
    b = build_backbone(BackboneConfig(name="sam", checkpoint=extra, img_size=256))
    x, hw = a.prepare(data.coffee())
    # extra keys and the wrapper ignored: the same weights on the same input, bit for bit
    assert torch.equal(
        a.encode(x[None], torch.tensor([hw]), ["neck_avg", "trunk_avg"]),
        b.encode(x[None], torch.tensor([hw]), ["neck_avg", "trunk_avg"]),
    )
    with pytest.raises(ConfigError, match="not a multiple of 64"):
        EfficientVitSamBackbone.from_checkpoint(path, img_size=288)


def test_native_size_is_the_default(tmp_path):
    path = write_official_efficientvit_sam_checkpoint(tmp_path / "evit.pt", "tiny")
    bb = build_backbone(BackboneConfig(name="efficientvit_sam", checkpoint=path))
    assert (bb.input_size, bb.patch, bb.grid_shape()) == (512, 8, (256, GRID, GRID))
