"""Helpers for data tests: real photos from skimage, 16-bit PNGs PIL cannot write."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey HxW or RGB HxWx3 uint16); PIL can read these but not write RGB ones."""
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def photos() -> dict[str, np.ndarray]:
    """Real RGB photos shipped with scikit-image, cropped to several aspect ratios (h:w)."""
    from skimage import data

    astronaut, coffee, chelsea, rocket = (
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
    )
    return {
        "wide_3to1": astronaut[100:270, :510],  # 170 x 510
        "tall_2to1": coffee[:400, 150:350],  # 400 x 200
        "square": chelsea[:300, 100:400],  # 300 x 300
        "rocket": rocket,  # 427 x 640
    }
