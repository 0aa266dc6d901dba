"""Official-format SAM 2.1 checkpoints and reference outputs, written by PyPI ``sam2`` in a
subprocess (``sam2_reference.py``: importing sam2 initialises Hydra globally), once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("sam2_reference.py")
PHOTOS = ("chelsea", "astronaut", "coffee")
_made: dict[tuple, tuple[Path, Path]] = {}


def _run(*args: str) -> None:
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, str(SCRIPT), *args], check=True, env=env, capture_output=True)


def official_sam2(
    root: Path,
    size: str = "t",
    img_size: int = 256,
    images: tuple[str, ...] = PHOTOS,
    seed: int = 0,
) -> tuple[Path, Path]:
    """-> (sam2.1_hiera_SIZE.pt as the official release writes it, reference.pt of the official outputs)."""
    key = (size, img_size, images, seed)
    if key not in _made:
        out = Path(root) / f"sam2_{size.replace('+', 'p')}_{img_size}_{seed}"
        out.mkdir(parents=True, exist_ok=True)
        _run("checkpoint", size, str(img_size), str(seed), str(out), *images)
        _made[key] = (out / f"sam2.1_hiera_{size}.pt", out / "reference.pt")
    return _made[key]


def official_encoder_shapes(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{size: image-encoder state dict of meta tensors} for the four official SAM 2.1 configs."""
    out = Path(root) / "sam2_shapes.json"
    if not out.is_file():
        _run("shapes", str(out))
    return {
        size: {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
        for size, keys in json.loads(out.read_text()).items()
    }
