"""``backbone.name: sam``: read the checkpoint, decide which SAM family wrote it, build that.

Families are told apart by the keys each official release writes (shapes then give the
geometry, in each family's own module):
- SAM 2 / 2.1: ``{"model": ...}`` with ``image_encoder.trunk.*`` (Hiera) and ``image_encoder.neck.*``;
  2.1 files add ``no_obj_embed_spatial``.
- SAM-HQ: SAM 1's flat layout plus its HQ decoder (``mask_decoder.hf_token.*``,
  ``mask_decoder.compress_vit_feat.*``...); the image encoder is SAM's own.
- MobileSAM: flat ``image_encoder.*`` of a TinyViT (``image_encoder.patch_embed.seq.*``,
  ``image_encoder.layers.*``); SAM-HQ's light ``vit_tiny`` has the same encoder.
- EfficientViT-SAM: flat ``image_encoder.backbone.stages.*`` + ``image_encoder.neck.input_ops.*``
  (mit-han-lab's ``EfficientViTSamImageEncoder``), maybe inside ``{"state_dict": ...}``.
- SAM 1: flat ``image_encoder.*`` (or a timm ``samvit_*`` encoder state dict).
Only ``torch.load(weights_only=True)`` ever reads a file (``sam_state_dict.read_checkpoint``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from samprobe.backbones.registry import Backbone
from samprobe.backbones.sam_state_dict import DOWNLOAD_FIX, read_checkpoint
from samprobe.config import BackboneConfig
from samprobe.errors import ConfigError

log = logging.getLogger("samprobe")

FAMILY_NAMES = {
    "sam1": "SAM 1",
    "sam_hq": "SAM-HQ",
    "sam2": "SAM 2",
    "mobile_sam": "MobileSAM",
    "efficientvit_sam": "EfficientViT-SAM",
}
"""family -> how messages name it."""

_HQ_DECODER = (
    "mask_decoder.hf_token.",
    "mask_decoder.hf_mlp.",
    "mask_decoder.compress_vit_feat.",
    "mask_decoder.embedding_encoder.",
    "mask_decoder.embedding_maskfeature.",
)


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Flat state dict (wrappers removed) -> a ``FAMILY_NAMES`` key (from key names only)."""
    keys = list(state_dict)
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        return "sam2"
    if any(k.startswith("image_encoder.backbone.stages.") for k in keys):
        return "efficientvit_sam"
    # TinyViT (also SAM-HQ's light vit_tiny)
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return "mobile_sam"
    if any(k.startswith(_HQ_DECODER) for k in keys):
        return "sam_hq"
    return "sam1"  # infer_geometry says clearly when it is no SAM encoder at all


def family_label(family: str, state_dict: Mapping[str, torch.Tensor]) -> str:
    if family == "sam2" and "no_obj_embed_spatial" in state_dict:
        return "SAM 2.1"
    if family == "mobile_sam" and any(k.startswith(_HQ_DECODER) for k in state_dict):
        return "SAM-HQ (light, TinyViT)"
    return FAMILY_NAMES[family]


def _builders() -> dict[str, Callable[[BackboneConfig, Path, str], Backbone]]:
    from samprobe.backbones.efficientvit_sam import build_efficientvit_sam_family
    from samprobe.backbones.mobile_sam import build_mobile_sam_family
    from samprobe.backbones.sam import build_sam_family
    from samprobe.backbones.sam2 import build_sam2_family

    return {
        "sam1": build_sam_family,
        "sam_hq": build_sam_family,
        "sam2": build_sam2_family,
        "mobile_sam": build_mobile_sam_family,
        "efficientvit_sam": build_efficientvit_sam_family,
    }


def _checkpoint(cfg: BackboneConfig) -> Path:
    if cfg.checkpoint is None:
        raise ConfigError(
            "backbone.checkpoint is not set: the SAM backbone needs encoder weights",
            fix=DOWNLOAD_FIX,
        )
    return Path(cfg.checkpoint)


def build_detected(cfg: BackboneConfig, expected: str | None = None) -> Backbone:
    """Build whatever SAM family ``cfg.checkpoint`` holds; ``expected``: the family ``backbone.name`` named."""
    path = _checkpoint(cfg)
    sd = read_checkpoint(path)  # memory-mapped: reading the keys costs no weight I/O
    family = detect_family(sd)
    label = family_label(family, sd)
    if expected is not None and family != expected and {family, expected} != {"sam1", "sam_hq"}:
        raise ConfigError(
            f"backbone.name is {expected} but {path} is a {label} checkpoint",
            fix=f"set backbone.name: sam (detects the family), or point backbone.checkpoint at "
            f"{FAMILY_NAMES[expected]} weights",
        )
    backbone = _builders()[family](cfg, path, label)
    log.info(f"backbone: {path} is a {backbone.found}")
    return backbone


def build_any_sam(cfg: BackboneConfig) -> Backbone:
    return build_detected(cfg)


def build_sam_hq(cfg: BackboneConfig) -> Backbone:
    return build_detected(cfg, "sam_hq")


def build_sam2(cfg: BackboneConfig) -> Backbone:
    return build_detected(cfg, "sam2")


def build_mobile_sam(cfg: BackboneConfig) -> Backbone:
    return build_detected(cfg, "mobile_sam")


def build_efficientvit_sam(cfg: BackboneConfig) -> Backbone:
    return build_detected(cfg, "efficientvit_sam")
