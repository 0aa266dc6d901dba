"""SAM 2 / 2.1 image encoder (Hiera trunk + FPN neck) as a samprobe backbone.

The trunk is timm's ``HieraDet`` (``hieradet_sam2``) loaded from an official ``{"model": ...}``
file through timm's own ``checkpoint_filter_fn`` (prefix ``image_encoder.trunk.``). The neck is
the part of SAM 2's ``FpnNeck`` that ``vision_features`` depends on, written out here (timm has
none): with the official configs (``scalp: 1``, ``fpn_top_down_levels: [2, 3]``, nearest
interpolation) the stride-16 level is ``conv1(stage 3) + upsample2(conv0(stage 4))``.

Preprocessing is the official ``SAM2Transforms``: a square resize to the input size (no padding,
aspect not kept; torchvision ``Resize``: bilinear with antialias) and ImageNet mean/std on the
0-1 scale. The resize runs in the CPU workers on uint8 (the official path resizes the 0-1 float
image), so inputs can differ from the official ones by the uint8 rounding, at most 1/255 before
normalisation; the encoder itself is exact (tests/test_sam2.py). The whole map is valid: every
token is pooled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samprobe.backbones.registry import (
    PooledFeature,
    PooledMapsBackbone,
    pool_grid,
    pool_maps,
)
from samprobe.backbones.sam_state_dict import check_variant, read_checkpoint
from samprobe.config import BackboneConfig
from samprobe.errors import CheckpointError, ConfigError
from samprobe.io import weights_sha256

# (embed_dim, blocks per stage) -> (variant, heads of stage 1, global-attention blocks, window per
# stage):
# the four official configs, configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (identical trunks in SAM
# 2).
# Heads, global blocks and windows leave no trace in tensor shapes, so they come from this table.
KNOWN_HIERA: dict[
    tuple[int, tuple[int, ...]], tuple[str, int, tuple[int, ...], tuple[int, ...]]
] = {
    (96, (1, 2, 7, 2)): ("hiera_t", 1, (5, 7, 9), (8, 4, 14, 7)),
    (96, (1, 2, 11, 2)): ("hiera_s", 1, (7, 10, 13), (8, 4, 14, 7)),
    (112, (2, 3, 16, 3)): ("hiera_b+", 2, (12, 16, 20), (8, 4, 14, 7)),
    (144, (2, 6, 36, 4)): ("hiera_l", 2, (23, 33, 43), (8, 4, 16, 8)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRUNK = "image_encoder.trunk."
_NECK = "image_encoder.neck."
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_FIX = "use an official SAM 2 / 2.1 checkpoint (sam2.1_hiera_tiny.pt, _small, _base_plus or _large)"


@dataclass(frozen=True)
class HieraGeometry:
    """The SAM 2 encoder shape a checkpoint implies."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    global_pos_size: tuple[int, int]
    d_model: int
    variant: str

    def describe(self) -> str:
        return f"SAM 2 {self.variant} encoder (embed {self.embed_dim}, stages {list(self.stages)})"

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def trunk_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official file -> timm ``HieraDet`` names, via timm's own filter (drops everything but the trunk)."""
    from timm.models.hieradet_sam2 import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state_dict), prefix=_TRUNK)


def infer_hiera_geometry(state_dict: Mapping[str, torch.Tensor], where: str) -> HieraGeometry:
    """Geometry from tensor SHAPES (works on meta tensors): embed width, blocks per stage, pos-embed sizes."""
    trunk = trunk_state(state_dict)
    if "patch_embed.proj.weight" not in trunk or "pos_embed" not in trunk:
        raise CheckpointError(
            f"{where} has image_encoder.trunk keys but no Hiera patch embedding / pos_embed",
            fix=_FIX,
        )
    embed_dim = int(trunk["patch_embed.proj.weight"].shape[0])
    depth = 1 + max(int(m.group(1)) for k in trunk if (m := _BLOCK.match(k)))
    # A stage starts where the width doubles: that block has a projection (blocks.i.proj).
    starts = [0] + [i for i in range(1, depth) if f"blocks.{i}.proj.weight" in trunk]
    stages = tuple(b - a for a, b in zip(starts, starts[1:] + [depth]))
    known = KNOWN_HIERA.get((embed_dim, stages))
    if known is None:
        names = ", ".join(
            f"{v[0]} (embed {e}, stages {list(s)})" for (e, s), v in KNOWN_HIERA.items()
        )
        raise CheckpointError(
            f"{where} holds a Hiera trunk of embed {embed_dim}, stages {list(stages)}, "
            f"which is none of the official SAM 2 encoders ({names})",
            fix=_FIX,
        )
    conv0 = f"{_NECK}convs.0.conv.weight"
    if conv0 not in state_dict or f"{_NECK}convs.1.conv.weight" not in state_dict:
        raise CheckpointError(
            f"{where} has a Hiera trunk but no FPN neck ({_NECK}convs.*)", fix=_FIX
        )
    variant, heads, global_blocks, windows = known
    pos = trunk["pos_embed"].shape  # [1, C, h, w]
    return HieraGeometry(
        embed_dim=embed_dim,
        num_heads=heads,
        stages=stages,
        global_att_blocks=global_blocks,
        window_spec=windows,
        global_pos_size=(int(pos[2]), int(pos[3])),
        d_model=int(state_dict[conv0].shape[0]),
        variant=variant,
    )


class Sam2Neck(nn.Module):
    """The two lateral 1x1 convs of SAM 2's ``FpnNeck`` that ``vision_features`` needs (official names
    ``convs.0.conv`` for the stride-32 stage, ``convs.1.conv`` for stride 16)."""

    def __init__(self, stage_dims: tuple[int, ...], d_model: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Sequential() for _ in range(2))
        self.convs[0].add_module("conv", nn.Conv2d(stage_dims[-1], d_model, 1, device="meta"))
        self.convs[1].add_module("conv", nn.Conv2d(stage_dims[-2], d_model, 1, device="meta"))

    def forward(self, stage3: torch.Tensor, stage4: torch.Tensor) -> torch.Tensor:
        """[B, C3, H, W], [B, C4, H/2, W/2] -> vision_features [B, d_model, H, W] (as ``FpnNeck``, level 2)."""
        top = self.convs[0](stage4)
        top_down = F.interpolate(top.to(torch.float32), scale_factor=2.0, mode="nearest")
        return self.convs[1](stage3) + top_down


def build_encoder(
    geometry: HieraGeometry, state_dict: Mapping[str, torch.Tensor]
) -> tuple[nn.Module, nn.Module]:
    """(timm HieraDet trunk, Sam2Neck) of ``geometry`` with the file's weights."""
    from timm.models.hieradet_sam2 import HieraDet

    trunk = HieraDet(
        embed_dim=geometry.embed_dim,
        num_heads=geometry.num_heads,
        stages=geometry.stages,
        global_att_blocks=geometry.global_att_blocks,
        window_spec=geometry.window_spec,
        global_pos_size=geometry.global_pos_size,
        num_classes=0,
        weight_init="skip",
        fix_init=False,
        device="meta",
    )
    trunk.head = nn.Identity()  # classifier head (and its norm): not part of SAM 2, never run
    missing, unexpected = trunk.load_state_dict(trunk_state(state_dict), strict=False, assign=True)
    neck = Sam2Neck(geometry.stage_dims, geometry.d_model)
    neck_sd = {
        k[len(_NECK) :]: v
        for k, v in state_dict.items()
        if k.startswith(_NECK + "convs.0.") or k.startswith(_NECK + "convs.1.")
    }
    neck_missing, _ = neck.load_state_dict(neck_sd, strict=False, assign=True)
    if missing or unexpected or neck_missing:
        raise CheckpointError(
            f"SAM 2 encoder weights do not match their own geometry: missing "
            f"{(missing + neck_missing)[:4]}, unexpected {unexpected[:4]}",
            fix=_FIX,
        )
    return trunk.eval().requires_grad_(False), neck.eval().requires_grad_(False)


def prepare_square_bilinear(size: int, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> (uint8 [3, size, size], (size, size)): torchvision ``Resize((size, size))``,
    bilinear with antialias, as ``SAM2Transforms`` (CPU only; runs in loader workers)."""
    from torchvision.transforms.v2.functional import resize

    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if chw.shape[1:] != (size, size):
        chw = resize(chw, [size, size], antialias=True)
    return chw.contiguous(), (size, size)


class Sam2Backbone(PooledMapsBackbone):
    name = "sam2"
    default_pooling = ("neck_avg",)
    preprocess_version = "1"

    def __init__(
        self,
        trunk: nn.Module,
        neck: nn.Module,
        geometry: HieraGeometry,
        img_size: int,
        weights_path: Path | None = None,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ConfigError(
                f"backbone.img_size {img_size} is not a multiple of 32 (the Hiera trunk's stride)",
                fix=f"use e.g. {max(32, round(img_size / 32) * 32)} (SAM 2's own size is 1024)",
            )
        self.trunk, self.neck, self.geometry = trunk, neck, geometry
        self.input_size = img_size
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.stage_ends = tuple(
            sum(geometry.stages[: i + 1]) - 1 for i in range(len(geometry.stages))
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_checkpoint(
        cls, path: Path, img_size: int = 1024, variant: str = "auto"
    ) -> Sam2Backbone:
        path = Path(path)
        sd = read_checkpoint(path)
        geometry = infer_hiera_geometry(sd, str(path))
        check_variant(variant, geometry, str(path))
        return cls(*build_encoder(geometry, sd), geometry, img_size, path)

    def features(self) -> dict[str, PooledFeature]:
        g = self.geometry
        return {
            "neck_avg": PooledFeature(
                "neck",
                "avg",
                g.d_model,
                doc="vision_features (the 256-d SAM 2 embedding, stride 16), averaged",
            ),
            "neck_max": PooledFeature(
                "neck", "max", g.d_model, doc="vision_features, max over tokens"
            ),
            "trunk_avg": PooledFeature(
                "stage",
                "avg",
                g.stage_dims[-1],
                layer_widths=g.stage_dims,
                doc="the trunk's last stage, averaged; trunk_avg@3,4: stages 3 and 4",
            ),
        }

    # -- worker side (CPU only) --------------------------------------------------------

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        return prepare_square_bilinear(self.input_size, image)

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        return partial(prepare_square_bilinear, self.input_size)

    # -- device side -------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> float [B, 3, S, S]: x / 255, then ImageNet mean/std (= ``SAM2Transforms``)."""
        return (images.float() / 255.0 - self.mean) / self.std

    def use_precision(self, device: torch.device, precision: str) -> None:
        """bf16 on the CPU: trunk and neck cast to bf16 once, the forward in bf16 with autocast
        off (as ``SamBackbone.use_precision``). hiera_t at 1024 px, 2 photos, same run, AMX Xeon:
        0.95 -> 0.72 s/img, pooled cosine to fp32 0.99995 (autocast: 0.99998)."""
        self.cast_for_cpu_bf16(device, precision, (self.trunk, self.neck))

    def forward_maps(self, x: torch.Tensor, sources: set[str]) -> dict[str, torch.Tensor]:
        """Normalised input -> {"stage@i": [B, C_i, h_i, w_i] (1-based), "stage": the last one,
        "neck": vision_features [B, d_model, S/16, S/16]}, as far as ``sources`` need."""
        n = len(self.stage_ends)
        want = {int(s.split("@")[1]) for s in sources if s.startswith("stage@")}
        want |= {n} if "stage" in sources else set()  # the plain name: the last stage
        want |= {n - 1, n} if "neck" in sources else set()
        last = max(self.stage_ends[i - 1] for i in want)  # stop after the deepest stage needed
        t = self.trunk
        x = t._pos_embed(t.patch_embed(x))  # [B, H/4, W/4, C]
        maps = {}
        for i, blk in enumerate(t.blocks[: last + 1]):
            x = blk(x)
            if i in self.stage_ends:
                maps[f"stage@{self.stage_ends.index(i) + 1}"] = x.permute(0, 3, 1, 2)
        if "stage" in sources:
            maps["stage"] = maps[f"stage@{n}"]
        if "neck" in sources:
            maps["neck"] = self.neck(maps[f"stage@{n - 1}"], maps[f"stage@{n}"])
        return maps

    def _encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        requests = self.resolve(list(pooling))
        sources = {s for r in requests for s in r.sources} | (
            {"neck"} if spatial is not None else set()
        )
        x, compute = self.native_compute(self.preprocess(images))
        with compute:
            maps = self.forward_maps(x, sources)
        # Square resize: every token is image, none is padding.
        feats = pool_maps(
            requests,
            maps,
            lambda m: torch.ones(m.shape[0], *m.shape[2:], dtype=torch.bool, device=m.device),
        )
        if spatial is None:
            return feats, None
        neck = maps["neck"]
        tokens_hw = torch.tensor(neck.shape[2:], dtype=torch.long).expand(neck.shape[0], 2)
        return feats, pool_grid(neck, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        return (self.geometry.d_model, self.input_size // 16, self.input_size // 16)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "sam2",
            "variant": self.geometry.variant,
            "geometry": self.geometry.as_dict(),
            "weights_sha256": weights_sha256(self.weights_path) if self.weights_path else None,
        }


def build_sam2_family(cfg: BackboneConfig, path: Path, label: str) -> Sam2Backbone:
    """Builder for a detected SAM 2 / 2.1 checkpoint (``sam_family.build_detected``)."""
    bb = Sam2Backbone.from_checkpoint(path, img_size=cfg.img_size or 1024, variant=cfg.variant)
    bb.found = f"{label} checkpoint, {bb.geometry.describe()}"
    return bb
