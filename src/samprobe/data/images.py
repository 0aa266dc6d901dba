"""Decoding any reasonable image file to RGB uint8, and the official SAM resize.

Conversions are deterministic: EXIF orientation applied; alpha dropped (as the official
SAM path, which reads with cv2, does); 16-bit grey scaled to 8 bits; palette and CMYK
converted by PIL. Large JPEGs are decoded at reduced scale (``draft``) when the image will be
shrunk by 2x or more anyway, which keeps the decode cheap without changing the output size.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A decompression bomb raises instead of allocating gigabytes; the limit is set per call.
Image.MAX_IMAGE_PIXELS = None


def longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    """Official ``ResizeLongestSide.get_preprocess_shape`` rounding: (new_h, new_w)."""
    scale = target * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, deterministically."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(source: Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Open and check size from the header only (cheap): raises ValueError over the pixel limit."""
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} is over the pixel limit of {max_pixels}")
    return img


def decode_rgb(source: Path | bytes, target_longest: int | None = None,
               max_pixels: int | None = None) -> np.ndarray:
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
    return np.asarray(to_rgb(img))


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """HxWx3 uint8 -> h'xw'x3 uint8, exactly as the official ``ResizeLongestSide.apply_image``.

    That calls torchvision ``resize`` on a PIL image with its default BILINEAR mode, i.e.
    PIL's (antialiased) bilinear filter -- not bicubic.
    """
    h, w = longest_side_shape(image.shape[0], image.shape[1], target)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 (aspect not kept), bicubic; the usual timm eval input."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
