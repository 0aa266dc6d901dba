"""Decoding and SAM letterbox preprocessing on real photos, against segment_anything itself."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from helpers.images import photos, png16
from samprobe.data.images import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    decode_rgb,
    letterbox,
    longest_side_shape,
    resize_longest_side,
    sam_normalize_pad,
)

S = 1024


@pytest.fixture(scope="module")
def official_sam():
    from helpers.sam_factory import build_official_sam

    return build_official_sam("tiny", img_size=S)


def official_input(path: Path, sam) -> torch.Tensor:
    """What a user's script feeds the official encoder: full decode, apply_image, Sam.preprocess."""
    image = np.array(Image.open(path).convert("RGB"))  # cv2.imread + BGR->RGB equivalent
    resized = ResizeLongestSide(S).apply_image(image)  # numpy path (the torch path is buggy)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    with torch.no_grad():
        return sam.preprocess(x)  # [1, 3, S, S]


def samprobe_input(path: Path) -> torch.Tensor:
    padded, hw = letterbox(decode_rgb(path, target_longest=S), S)  # worker side: uint8 [3, S, S]
    return sam_normalize_pad(padded[None], torch.tensor([hw]))  # device side


# 1: SAM enlarges the photo; 4: SAM shrinks it (antialias)
@pytest.mark.parametrize("upscale", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_letterbox_matches_official_sam_preprocess(
    tmp_path: Path, official_sam, upscale: int
) -> None:
    assert official_sam.pixel_mean.flatten().tolist() == pytest.approx(SAM_PIXEL_MEAN)
    assert official_sam.pixel_std.flatten().tolist() == pytest.approx(SAM_PIXEL_STD)
    for name, photo in photos().items():
        if upscale > 1:
            photo = np.array(
                Image.fromarray(photo).resize((photo.shape[1] * upscale, photo.shape[0] * upscale))
            )
        path = tmp_path / f"{name}.png"
        Image.fromarray(photo).save(path, compress_level=1)  # lossless either way; fast
        ours, ref = samprobe_input(path), official_input(path, official_sam)
        assert ours.shape == ref.shape == (1, 3, S, S), name
        assert ours.dtype == torch.float32
        diff = (ours - ref).abs().max().item()
        assert diff <= 0.02, f"{name} x{upscale}: max abs diff {diff}"
        # the resized pixels themselves are the official ones, bit for bit
        official_resized = ResizeLongestSide(S).apply_image(
            np.array(Image.open(path).convert("RGB"))
        )
        assert np.array_equal(resize_longest_side(decode_rgb(path), S), official_resized), name
        h, w = longest_side_shape(*photo.shape[:2], S)
        assert (
            max(h, w) == S and ours[..., h:, :].abs().sum() == 0 and ours[..., w:].abs().sum() == 0
        )


def test_large_jpeg_draft_decode_stays_close_to_full_decode(tmp_path: Path, official_sam) -> None:
    """Large JPEGs decode at reduced DCT scale before the exact resize; the result is not bit-exact
    with a full decode, so bound how far it moves the normalised input."""
    photo = np.array(
        Image.fromarray(photos()["rocket"]).resize((2560, 1708), Image.Resampling.BICUBIC)
    )
    path = tmp_path / "big.jpg"
    Image.fromarray(photo).save(path, quality=90)
    ours, ref = samprobe_input(path), official_input(path, official_sam)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    # measured 0.003 / 0.23, (diff.mean().item(), diff.max().item())
    assert diff.mean().item() < 0.01 and diff.max().item() < 0.5


def test_sam_normalize_pad_zeroes_only_padding() -> None:
    images = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    out = sam_normalize_pad(images, torch.tensor([[8, 5], [3, 8]]))
    expect = (200 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    assert torch.allclose(out[0, :, :, :5], expect.view(3, 1, 1).expand(3, 8, 5))
    assert out[0, :, :, 5:].abs().max() == 0 and out[1, :, 3:].abs().max() == 0
    assert torch.allclose(out[1, :, :3], expect.view(3, 1, 1).expand(3, 3, 8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_every_mode_decodes_to_rgb_deterministically() -> None:
    rgb = photos()["square"][:64, :96]  # 64 x 96 real photo
    grey = np.array(Image.fromarray(rgb).convert("L"))
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(rgb.shape[0], 0)
    cases = {
        "grey": (_encode(Image.fromarray(grey), "PNG"), np.stack([grey] * 3, -1), 0),
        "grey_alpha": (
            _encode(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), "PNG"),
            np.stack([grey] * 3, -1),
            0,
        ),
        "rgba": (
            _encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
            rgb,
            0,
        ),  # alpha dropped, as cv2
        # 16-bit keeps the high byte, as PIL does for 16-bit RGB and cv2.imread for both
        "grey16": (png16(grey.astype(np.uint16) * 256 + 255), np.stack([grey] * 3, -1), 0),
        "rgb16": (png16(rgb.astype(np.uint16) * 256 + 255), rgb, 0),
        "cmyk_jpeg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb, 12),
    }
    pal = Image.fromarray(rgb).quantize(64)
    cases["palette_gif"] = (_encode(pal, "GIF"), np.array(pal.convert("RGB")), 0)
    for name, (data, expect, tol) in cases.items():
        out = decode_rgb(data)
        assert out.dtype == np.uint8 and out.shape == rgb.shape, name
        err = np.abs(out.astype(int) - expect.astype(int))
        assert (err.mean() if tol else err.max()) <= tol, (
            f"{name}: error {err.mean():.2f} / {err.max()}"
        )
        assert np.array_equal(out, decode_rgb(data)), name


def test_exif_orientation_is_applied() -> None:
    rgb = photos()["wide_3to1"]  # 170 x 510
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer must rotate 90 degrees clockwise
    data = _encode(
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))), "JPEG", quality=95, exif=exif
    )
    out = decode_rgb(data)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 4
    # letterbox sees the upright image: wide, so the valid region is full width
    _, (h, w) = letterbox(out, 64)
    assert (h, w) == longest_side_shape(170, 510, 64) and w == 64


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = _encode(Image.fromarray(photos()["square"]), "PNG")
    with pytest.raises(ValueError, match="over the pixel limit"):
        decode_rgb(data, max_pixels=300 * 300 - 1)
    assert decode_rgb(data, max_pixels=300 * 300).shape == (300, 300, 3)
