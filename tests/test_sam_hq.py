"""SAM-HQ checkpoints (reference: PyPI segment-anything-hq 0.3): detected, SAM's own encoder,
its extra decoder keys accepted, its intermediate (global-block) features offered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data

from helpers.sam_factory import build_official_sam_hq, write_official_checkpoint
from samprobe.backbones.registry import build_backbone
from samprobe.backbones.sam import SamBackbone
from samprobe.config import BackboneConfig
from samprobe.errors import CheckpointError, ConfigError

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


def _photos() -> list[np.ndarray]:
    # landscape, portrait
    return [
        data.chelsea(),
        np.ascontiguousarray(data.astronaut()[:, 140:330]),
    ]


def _hq(geometry: str, root):
    """(official HQ model, its checkpoint as the release writes it) at 256 px."""
    sam = build_official_sam_hq(geometry, img_size=256)
    path = root / f"sam_hq_{geometry}.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture(scope="module")
def hq(tmp_path_factory):
    return _hq("tiny", tmp_path_factory.mktemp("hq"))


def _reference(sam, images):
    """Official preprocessing (numpy ResizeLongestSide + Sam.preprocess) and HQ encoder outputs."""
    tf = ResizeLongestSide(256)
    resized = [tf.apply_image(img) for img in images]
    x = torch.cat(
        [sam.preprocess(torch.as_tensor(r).permute(2, 0, 1)[None].float()) for r in resized]
    )
    with torch.no_grad():
        neck, interm = sam.image_encoder(x)  # HQ's encoder returns the global blocks' outputs too
    return neck, [t.permute(0, 3, 1, 2) for t in interm], [r.shape[:2] for r in resized]


def _valid_avg(maps: torch.Tensor, hws) -> torch.Tensor:
    return torch.stack(
        [
            m[:, : math.ceil(h / 16), : math.ceil(w / 16)].mean((1, 2))
            for m, (h, w) in zip(maps, hws)
        ]
    )


def test_hq_checkpoint_is_detected_and_matches_the_official_encoder(hq):
    _check_hq_parity(*hq)


@pytest.mark.native  # vit_b at 256 px, ours and the official: ~7 s idle, 40 s at load 12 on 2 cores
def test_hq_vit_b_geometry_matches_the_official_encoder(tmp_path):
    sam, path = _hq("vit_b", tmp_path)
    _check_hq_parity(sam, path)
    assert (
        build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=256)).geometry.variant
        == "vit_b"
    )


def _check_hq_parity(sam, path) -> None:
    bb = build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=256))
    assert (
        isinstance(bb, SamBackbone)
        and bb.family == "sam_hq"
        and bb.found.startswith("SAM-HQ checkpoint")
    )
    images = _photos()
    ref_neck, ref_interm, hws = _reference(sam, images)
    prepared = [bb.prepare(img) for img in images]
    x, valid = torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])
    with torch.inference_mode():
        _, neck = bb.trunk(bb.preprocess(x, valid))
    assert (neck - ref_neck).abs().max().item() < 1e-4
    ours = bb.encode(x, valid, ["neck_avg", "interm_avg"])
    ref = torch.cat([_valid_avg(ref_neck, hws), *[_valid_avg(t, hws) for t in ref_interm]], dim=1)
    assert ours.shape == ref.shape == (2, 256 + len(ref_interm) * bb.geometry.embed_dim)
    assert F.cosine_similarity(ours, ref).min().item() >= 0.9999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = bb.encode(x, valid, ["neck_avg", "interm_avg"])
    assert F.cosine_similarity(bf16, ref).min().item() >= 0.99


def test_hq_extra_keys_are_accepted_and_the_encoder_is_sams(hq, tmp_path):
    """The HQ decoder's keys are ignored; the same encoder weights in a SAM 1 file give the same features
    (but another cache identity: the family is part of it)."""
    sam, path = hq
    sd = torch.load(path, weights_only=True)
    assert any(k.startswith("mask_decoder.hf_token.") for k in sd)
    sam1 = tmp_path / "as_sam1.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("image_encoder.")}, sam1)
    a = build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=256))
    b = build_backbone(BackboneConfig(name="sam", checkpoint=sam1, img_size=256))
    assert (
        b.family == "sam1" and "family" not in b.identity() and a.identity()["family"] == "sam_hq"
    )
    x, valid = a.prepare(data.coffee())
    torch.testing.assert_close(
        a.encode(x[None], torch.tensor([valid]), ["neck_avg"]),
        b.encode(x[None], torch.tensor([valid]), ["neck_avg"]),
        rtol=0,
        atol=0,
    )


def test_hq_variant_mismatch_names_both(hq):
    _, path = hq
    with pytest.raises(ConfigError) as err:
        build_backbone(BackboneConfig(name="sam", checkpoint=path, img_size=256, variant="hiera_t"))
    assert "backbone.variant is hiera_t" in str(err.value) and str(path) in str(err.value)


def test_hq_truncated_and_name_mismatch(hq, tmp_path):
    _, path = hq
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone(BackboneConfig(name="sam_hq", checkpoint=cut, img_size=256))
    with pytest.raises(ConfigError, match="backbone.name is sam2 but .* is a SAM-HQ checkpoint"):
        build_backbone(BackboneConfig(name="sam2", checkpoint=path, img_size=256))


def test_sam1_file_under_the_sam_hq_name_is_the_same_encoder(tmp_path):
    path = write_official_checkpoint(tmp_path / "sam1.pth", "tiny", img_size=256)
    bb = build_backbone(BackboneConfig(name="sam_hq", checkpoint=path, img_size=256))
    assert bb.family == "sam1" and bb.found.startswith("SAM 1 checkpoint")
