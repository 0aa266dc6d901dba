"""SAM image encoder as a samprobe backbone: official preprocessing, valid-region pooling.

The trunk is timm's ``VisionTransformerSAM`` built with the geometry found in the weights
(``sam_weights.infer_geometry``) and SAM's own LayerNorm eps (1e-6; timm's samvit default is
1e-5), with a faster inference attention (``sam_attention``). Preprocessing is the official
``ResizeLongestSide`` + ``Sam.preprocess``: the resize happens in ``prepare`` (CPU workers),
normalisation and zeroing of the padding on the device in ``encode``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from samprobe.backbones.registry import Backbone, pool_grid, register
from samprobe.backbones.sam_attention import SamAttention, SamBlock
from samprobe.backbones.sam_weights import (
    DOWNLOAD_FIX,
    SamGeometry,
    adapt_to_grid,
    check_variant,
    infer_geometry,
    read_checkpoint,
    to_timm_keys,
)
from samprobe.config import BackboneConfig
from samprobe.data.images import letterbox, sam_normalize_pad
from samprobe.errors import CheckpointError, ConfigError
from samprobe.io import weights_sha256

__all__ = ["SamBackbone", "SamGeometry", "infer_geometry", "build_encoder", "load_encoder_state",
           "load_timm_pretrained_state", "build_sam"]



# ---------------------------------------------------------------------------------------
# weights -> encoder


def load_encoder_state(path: Path, variant: str = "auto") -> tuple[dict[str, torch.Tensor], SamGeometry]:
    """Weights file (any accepted layout) -> (timm-named encoder state dict, geometry); variant checked."""
    sd = to_timm_keys(read_checkpoint(path))
    geometry = infer_geometry(sd, where=str(path))
    check_variant(variant, geometry, str(path))
    return sd, geometry


def load_timm_pretrained_state(model_name: str, path: Path) -> dict[str, torch.Tensor]:
    """Load ``path`` through timm's own pretrained mechanism for ``model_name`` (e.g. samvit_base_patch16.sa1b)."""
    import timm

    if not model_name.startswith("samvit_"):
        raise ConfigError(f"backbone.timm_model {model_name!r} is not a timm SAM encoder",
                          fix="use samvit_base_patch16.sa1b, samvit_large_patch16.sa1b or samvit_huge_patch16.sa1b")
    # timm builds at its default 1024 px; the file decides the real size, so peek at it first.
    geometry = infer_geometry(to_timm_keys(read_checkpoint(path)), where=str(path))
    native = geometry.pos_embed_grid[0] * geometry.patch_size
    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=native,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    except RuntimeError as exc:  # load_state_dict size/key mismatch
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit timm model {model_name}: {first}",
                              fix="pick the samvit_* name of the file's variant, or set backbone.variant: auto "
                                  "without backbone.timm_model") from None
    return model.state_dict()


def build_encoder(geometry: SamGeometry, state_dict: dict[str, torch.Tensor], img_size: int) -> nn.Module:
    """timm ``VisionTransformerSAM`` of ``geometry`` at ``img_size`` loaded with ``state_dict`` (timm names)."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if img_size % geometry.patch_size:
        raise ConfigError(f"backbone.img_size {img_size} is not a multiple of the patch size {geometry.patch_size}",
                          fix=f"use e.g. {round(img_size / geometry.patch_size) * geometry.patch_size}")
    grid = img_size // geometry.patch_size
    encoder = VisionTransformerSAM(
        img_size=img_size, patch_size=geometry.patch_size, embed_dim=geometry.embed_dim, depth=geometry.depth,
        num_heads=geometry.num_heads, mlp_ratio=geometry.mlp_ratio, use_rel_pos=True,
        window_size=geometry.window_size, global_attn_indexes=geometry.global_attn_indexes,
        neck_chans=geometry.out_chans, num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), block_fn=SamBlock, device="meta",
    )
    sd = adapt_to_grid(state_dict, geometry, grid)
    missing, unexpected = encoder.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"SAM encoder weights do not match their own geometry: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}",
                              fix="use an unmodified official SAM or timm samvit_* checkpoint")
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------
# pooling


def valid_token_mask(valid_hw: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """int [B, 2] resized (h', w') -> bool [B, gh, gw]: rows < ceil(h'/p) and cols < ceil(w'/p)."""
    rows = torch.div(valid_hw[:, 0] + patch - 1, patch, rounding_mode="floor")  # [B]
    cols = torch.div(valid_hw[:, 1] + patch - 1, patch, rounding_mode="floor")
    r = torch.arange(grid[0], device=valid_hw.device)
    c = torch.arange(grid[1], device=valid_hw.device)
    return (r[None, :, None] < rows[:, None, None]) & (c[None, None, :] < cols[:, None, None])


def masked_avg(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, C, gh, gw], mask bool [B, gh, gw] -> fp32 [B, C] mean over valid tokens."""
    m = mask[:, None].to(torch.float32)
    return (x.float() * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, C, gh, gw], mask bool [B, gh, gw] -> fp32 [B, C] max over valid tokens."""
    return x.float().masked_fill(~mask[:, None], float("-inf")).amax((2, 3))


# ---------------------------------------------------------------------------------------
# backbone


class SamBackbone(Backbone):
    name = "sam"
    feature_names = ("neck_avg", "neck_max", "block_avg")
    default_pooling = ("neck_avg",)
    preprocess_version = "2"  # 2: official bilinear resize (1 used bicubic)
    decode_longest_side = True

    def __init__(self, encoder: nn.Module, geometry: SamGeometry, img_size: int,
                 weights_path: Path | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.geometry = geometry
        self.input_size = img_size
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.grid = (img_size // geometry.patch_size, img_size // geometry.patch_size)

    @classmethod
    def from_checkpoint(cls, path: Path, img_size: int = 1024, variant: str = "auto",
                        timm_model: str | None = None) -> "SamBackbone":
        path = Path(path)
        if timm_model:
            sd = load_timm_pretrained_state(timm_model, path)
            geometry = infer_geometry(sd, where=str(path))
            check_variant(variant, geometry, str(path))
        else:
            sd, geometry = load_encoder_state(path, variant)
        return cls(build_encoder(geometry, sd, img_size), geometry, img_size, path)

    def set_attention(self, impl: str | None) -> None:
        """Attention kernel of every block: ``chunked`` | ``sdpa`` | None (by device: ``choose_attention``)."""
        for module in self.encoder.modules():
            if isinstance(module, SamAttention):
                module.impl = impl

    # -- worker side (CPU only) --------------------------------------------------------

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HxWx3 uint8 -> (uint8 [3, S, S]: official resize top-left, zeros elsewhere; (h', w'))."""
        return letterbox(image, self.input_size)

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        return partial(letterbox, size=self.input_size)  # picklable, no weights

    # -- device side -------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> float [B, 3, S, S]: (x - mean) / std, then padding zeroed (= Sam.preprocess)."""
        return sam_normalize_pad(images, valid_hw)

    def trunk(self, x: torch.Tensor, with_neck: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised [B, 3, S, S] -> (last block [B, C, gh, gw], neck [B, out_chans, gh, gw] or None)."""
        enc = self.encoder
        x = enc.patch_embed(x)  # [B, gh, gw, C]
        x = x + enc.pos_embed  # pos_embed already resized to this grid at load time
        x = enc.blocks(x)
        block = x.permute(0, 3, 1, 2)  # [B, C, gh, gw]
        return block, (enc.neck(block) if with_neck else None)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str]) -> torch.Tensor:
        """uint8 [B, 3, S, S], int [B, 2] -> fp32 [B, D] pooled over the valid tokens, in ``pooling`` order."""
        return self._encode(images, valid_hw, pooling, None)[0]

    @torch.inference_mode()
    def encode_grid(self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str],
                    spatial: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (fp32 [B, D], fp32 [B, spatial*spatial, out_chans]): the neck's valid tokens pooled to a grid."""
        pooled, grid = self._encode(images, valid_hw, pooling, spatial)
        assert grid is not None
        return pooled, grid

    def _encode(self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str],
                spatial: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.check_pooling(list(pooling))
        hw_cpu = valid_hw.cpu()  # the extractor passes host sizes: a no-op, not a device round trip
        x = self.preprocess(images, hw_cpu)  # slicing by CPU sizes: no device sync
        valid_hw = valid_hw.to(images.device, torch.long, non_blocking=True)
        block, neck = self.trunk(x,
                                 with_neck=spatial is not None or any(p.startswith("neck") for p in pooling))
        mask = valid_token_mask(valid_hw, self.grid, self.geometry.patch_size)  # [B, gh, gw]
        pooled = {
            "neck_avg": lambda: masked_avg(neck, mask),
            "neck_max": lambda: masked_max(neck, mask),
            "block_avg": lambda: masked_avg(block, mask),
        }
        feats = torch.cat([pooled[p]() for p in pooling], dim=1)
        if spatial is None:
            return feats, None
        p = self.geometry.patch_size
        tokens_hw = torch.div(hw_cpu.long() + p - 1, p, rounding_mode="floor")  # [B, 2] = ceil(h'/p), ceil(w'/p)
        return feats, pool_grid(neck, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        return (self.geometry.out_chans, *self.grid)

    def feature_dims(self) -> dict[str, int]:
        g = self.geometry
        return {"neck_avg": g.out_chans, "neck_max": g.out_chans, "block_avg": g.embed_dim}

    def identity(self) -> dict[str, Any]:
        return {
            "name": "sam",
            "variant": self.geometry.variant,
            "geometry": self.geometry.as_dict(),
            "weights_sha256": weights_sha256(self.weights_path) if self.weights_path else None,
        }


@register("sam")
def build_sam(cfg: BackboneConfig) -> SamBackbone:
    if cfg.checkpoint is None:
        raise ConfigError("backbone.checkpoint is not set: the SAM backbone needs encoder weights",
                          fix=DOWNLOAD_FIX)
    return SamBackbone.from_checkpoint(cfg.checkpoint, img_size=cfg.img_size or 1024, variant=cfg.variant,
                                       timm_model=cfg.timm_model)
