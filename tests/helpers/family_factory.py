"""One tiny, real-format checkpoint per registry entry: the backbone contract test builds every
entry from here, so a backbone added to the table without a tiny checkpoint fails that test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from helpers.sam2_factory import official_sam2
from helpers.sam_factory import (
    write_official_checkpoint,
    write_official_efficientvit_sam_checkpoint,
    write_official_hq_checkpoint,
    write_official_mobile_sam_checkpoint,
)


def _sam(root: Path) -> dict:
    return {
        "name": "sam",
        "checkpoint": str(write_official_checkpoint(root / "sam_tiny.pth", "tiny", img_size=256)),
        "img_size": 256,
    }


def _sam_hq(root: Path) -> dict:
    path = write_official_hq_checkpoint(root / "sam_hq_tiny.pth", "tiny", img_size=256)
    return {"name": "sam_hq", "checkpoint": str(path), "img_size": 256}


def _sam2(root: Path) -> dict:
    return {"name": "sam2", "checkpoint": str(official_sam2(root)[0]), "img_size": 256}


def _mobile_sam(root: Path) -> dict:
    path = write_official_mobile_sam_checkpoint(root / "mobile_sam_tiny.pt", "tiny", img_size=256)
    return {"name": "mobile_sam", "checkpoint": str(path), "img_size": 256}


def _efficientvit_sam(root: Path) -> dict:
    path = write_official_efficientvit_sam_checkpoint(root / "efficientvit_sam_tiny.pt", "tiny")
    return {"name": "efficientvit_sam", "checkpoint": str(path), "img_size": 256}


def _efficientnet_lite0(root: Path) -> dict:
    return {"name": "efficientnet_lite0", "img_size": 96}  # bundled real ImageNet weights


def _timm(root: Path) -> dict:
    import timm

    torch.manual_seed(0)
    path = root / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    return {"name": "timm", "timm_model": "test_resnet", "checkpoint": str(path), "img_size": 64}


TINY: dict[str, Callable[[Path], dict]] = {
    "sam": _sam,
    "sam_hq": _sam_hq,
    "sam2": _sam2,
    "mobile_sam": _mobile_sam,
    "efficientvit_sam": _efficientvit_sam,
    "efficientnet_lite0": _efficientnet_lite0,
    "timm": _timm,
}
"""registry name -> writes a tiny checkpoint under the folder given, returns the backbone config."""
