"""Decoding any reasonable image file to RGB uint8, and the official SAM letterbox.

Conversions are deterministic: EXIF orientation applied; alpha dropped (as the official
SAM path, which reads with cv2, does); 16-bit reduced to its high byte; palette and CMYK
converted by PIL. Large JPEGs are decoded at reduced scale (``draft``) when the image will be
shrunk by 2x or more anyway, which keeps the decode cheap without changing the output size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# A decompression bomb raises instead of allocating gigabytes; the limit is set per call.
Image.MAX_IMAGE_PIXELS = None


def longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """Official ``ResizeLongestSide.get_preprocess_shape`` rounding: (new_h, new_w)."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, deterministically.

    16-bit keeps the high byte (value >> 8), which is what PIL does for 16-bit RGB PNGs and
    cv2.imread (the official SAM reader) does for both; alpha is dropped, as cv2 does.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            grey = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        else:  # 32-bit integer image holding 8-bit values
            grey = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 HxW -> "L"
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(source: Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Open and check size from the header only (cheap): raises ValueError for a file that is not
    an image or is over the pixel limit."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.UnidentifiedImageError:  # PIL's message names a BytesIO address: useless to a user
        raise ValueError("not an image file (no known image format)") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} is over the pixel limit of {max_pixels}")
    return img


def decode_rgb(
    source: Path | bytes, target_longest: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB with EXIF orientation applied.

    ``target_longest``: the longest side the caller will resize to; lets JPEG decode at a
    reduced DCT scale that still leaves the image at least that large.
    """
    img = open_image(source, max_pixels)
    if target_longest is not None and img.format == "JPEG":
        h, w = longest_side_shape(img.height, img.width, target_longest)
        if max(img.height, img.width) >= 2 * target_longest:
            img.draft("RGB", (w, h))
    img = ImageOps.exif_transpose(img)
    return np.array(to_rgb(img))  # writable: torch.from_numpy needs it


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """HxWx3 uint8 -> h'xw'x3 uint8, as the official ``ResizeLongestSide.apply_image``.

    That calls torchvision's ``resize`` on a PIL image, whose default is PIL *bilinear*
    (PIL filters antialias when shrinking), not bicubic.
    """
    h, w = longest_side_shape(image.shape[0], image.shape[1], target)
    if (h, w) == image.shape[:2]:
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> (uint8 [3, size, size] with the resized image top-left, zeros elsewhere, (h', w')).

    CPU only (runs in loader workers). Padding is zero here but is zeroed again after
    normalisation (``sam_normalize_pad``), as the official path pads the normalised tensor.
    """
    resized = resize_longest_side(image, size)  # [h', w', 3]
    h, w = resized.shape[:2]
    out = np.zeros((3, size, size), dtype=np.uint8)
    # numpy's strided copy: ~40x faster than torch's permute copy here
    out[:, :h, :w] = resized.transpose(2, 0, 1)
    return torch.from_numpy(out), (h, w)


# Official SAM pixel statistics on the 0-255 scale (``Sam.pixel_mean`` / ``pixel_std``).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _sam_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's pixel mean and std [1, 3, 1, 1] on ``device``, made once: building them from lists
    for every batch was a host-to-device copy (and a wait for the GPU) per batch."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (
            torch.tensor(SAM_PIXEL_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(SAM_PIXEL_STD, device=device).view(1, 3, 1, 1),
        )
    return _MEAN_STD[device]


def sam_normalize_pad(images: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] letterboxed, int [B, 2] valid (h', w') -> float32 [B, 3, S, S].

    Exactly ``Sam.preprocess``: ``(x - mean) / std`` over the valid region, zero padding
    bottom/right. Runs on whatever device ``images`` is on (the device, not the workers).
    """
    mean, std = _sam_mean_std(images.device)
    x = images.float()  # [B, 3, S, S]
    x.sub_(mean).div_(std)  # in place: the batch is large (12 MB per 1024² image)
    # Zero the padding by slicing: a broadcast [B, 1, S, S] mask multiply is ~30x slower on CPU.
    for i, (h, w) in enumerate(valid_hw.tolist()):
        x[i, :, h:, :] = 0
        x[i, :, :h, w:] = 0
    return x


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 (aspect not kept), bicubic; the usual timm eval input."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
