"""SAM image encoder as a samprobe backbone: official preprocessing, valid-region pooling.

The trunk is timm's ``VisionTransformerSAM`` built with the geometry found in the weights
(``sam_state_dict.infer_geometry``) and SAM's own LayerNorm eps (1e-6; timm's samvit default is
1e-5), with a faster inference attention (``sam_attention``). Preprocessing is the official
``ResizeLongestSide`` + ``Sam.preprocess``: the resize happens in ``prepare`` (CPU workers),
normalisation and zeroing of the padding on the device in ``encode``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samprobe.backbones.registry import (
    PooledFeature,
    PooledMapsBackbone,
    masked_avg,
    masked_max,
    pool_grid,
    pool_maps,
    valid_token_mask,
)
from samprobe.backbones.sam_attention import SamAttention, SamBlock
from samprobe.backbones.sam_state_dict import (
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

__all__ = [
    "SamBackbone",
    "SamGeometry",
    "infer_geometry",
    "build_encoder",
    "load_encoder_state",
    "load_timm_pretrained_state",
    "build_sam",
    "valid_token_mask",
    "masked_avg",
    "masked_max",
]


# ---------------------------------------------------------------------------------------
# weights -> encoder


def load_encoder_state(
    path: Path, variant: str = "auto"
) -> tuple[dict[str, torch.Tensor], SamGeometry]:
    """Weights file (any accepted layout) -> (timm-named encoder state dict, geometry); variant checked."""
    sd = to_timm_keys(read_checkpoint(path))
    geometry = infer_geometry(sd, where=str(path))
    check_variant(variant, geometry, str(path))
    return sd, geometry


def load_timm_pretrained_state(model_name: str, path: Path) -> dict[str, torch.Tensor]:
    """Load ``path`` through timm's own pretrained mechanism for ``model_name`` (e.g. samvit_base_patch16.sa1b)."""
    import timm

    if not model_name.startswith("samvit_"):
        raise ConfigError(
            f"backbone.timm_model {model_name!r} is not a timm SAM encoder",
            fix="use samvit_base_patch16.sa1b, samvit_large_patch16.sa1b or "
            "samvit_huge_patch16.sa1b",
        )
    # timm builds at its default 1024 px; the file decides the real size, so peek at it first.
    geometry = infer_geometry(to_timm_keys(read_checkpoint(path)), where=str(path))
    native = geometry.pos_embed_grid[0] * geometry.patch_size
    try:
        model = timm.create_model(
            model_name,
            pretrained=True,
            num_classes=0,
            img_size=native,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
    except RuntimeError as exc:  # load_state_dict size/key mismatch
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit timm model {model_name}: {first}",
            fix="pick the samvit_* name of the file's variant, or set backbone.variant: auto "
            "without backbone.timm_model",
        ) from None
    return model.state_dict()


def build_encoder(
    geometry: SamGeometry, state_dict: dict[str, torch.Tensor], img_size: int
) -> nn.Module:
    """timm ``VisionTransformerSAM`` of ``geometry`` at ``img_size`` loaded with ``state_dict`` (timm names)."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if img_size % geometry.patch_size:
        raise ConfigError(
            f"backbone.img_size {img_size} is not a multiple of the patch size "
            f"{geometry.patch_size}",
            fix=f"use e.g. {round(img_size / geometry.patch_size) * geometry.patch_size}",
        )
    grid = img_size // geometry.patch_size
    encoder = VisionTransformerSAM(
        img_size=img_size,
        patch_size=geometry.patch_size,
        embed_dim=geometry.embed_dim,
        depth=geometry.depth,
        num_heads=geometry.num_heads,
        mlp_ratio=geometry.mlp_ratio,
        use_rel_pos=True,
        window_size=geometry.window_size,
        global_attn_indexes=geometry.global_attn_indexes,
        neck_chans=geometry.out_chans,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        block_fn=SamBlock,
        device="meta",
    )
    sd = adapt_to_grid(state_dict, geometry, grid)
    missing, unexpected = encoder.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"SAM encoder weights do not match their own geometry: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}",
            fix="use an unmodified official SAM or timm samvit_* checkpoint",
        )
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------
# backbone


class SamBackbone(PooledMapsBackbone):
    name = "sam"
    default_pooling = ("neck_avg",)
    preprocess_version = "2"  # 2: official bilinear resize (1 used bicubic)
    decode_longest_side = True

    def __init__(
        self,
        encoder: nn.Module,
        geometry: SamGeometry,
        img_size: int,
        weights_path: Path | None = None,
        family: str = "sam1",
    ) -> None:
        super().__init__()
        self.family = family
        """"sam1" or "sam_hq" (same encoder; only the identity and the messages differ)."""
        self.encoder = encoder
        self.geometry = geometry
        self.input_size = img_size
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.grid = (img_size // geometry.patch_size, img_size // geometry.patch_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        img_size: int = 1024,
        variant: str = "auto",
        timm_model: str | None = None,
        family: str = "sam1",
    ) -> SamBackbone:
        path = Path(path)
        if timm_model:
            sd = load_timm_pretrained_state(timm_model, path)
            geometry = infer_geometry(sd, where=str(path))
            check_variant(variant, geometry, str(path))
        else:
            sd, geometry = load_encoder_state(path, variant)
        return cls(build_encoder(geometry, sd, img_size), geometry, img_size, path, family)

    def set_attention(self, impl: str | None) -> None:
        """Attention kernel of every block: ``chunked`` | ``sdpa`` | None (by device: ``choose_attention``)."""
        for module in self.encoder.modules():
            if isinstance(module, SamAttention):
                module.impl = impl

    def use_precision(self, device: torch.device, precision: str) -> None:
        """bf16 on the CPU: the encoder's weights cast to bf16 once, the forward in bf16 with
        autocast off. Under CPU autocast every forward re-casts each weight and runs each
        LayerNorm in fp32 with a cast in and out: vit_b bf16 (2 threads, AMX Xeon, same run)
        0.449 -> 0.392 s/img at 512 px and 2.37 -> 2.27 s/img at 1024 px, and the weights take
        half the memory. The residual stream is then bf16 (LayerNorm still accumulates in fp32
        inside the kernel): pooled cosine to fp32 >= 0.999, tested."""
        self.cast_for_cpu_bf16(device, precision, (self.encoder,))

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

    def features(self) -> dict[str, PooledFeature]:
        g = self.geometry
        interm = len(g.global_attn_indexes) * g.embed_dim
        return {
            "neck_avg": PooledFeature(
                "neck", "avg", g.out_chans, doc="the 256-d SAM image embedding, averaged"
            ),
            "neck_max": PooledFeature(
                "neck", "max", g.out_chans, doc="the SAM image embedding, max over tokens"
            ),
            "block_avg": PooledFeature(
                "block",
                "avg",
                g.embed_dim,
                layer_widths=(g.embed_dim,) * g.depth,
                doc="last ViT block, averaged; block_avg@i,j: blocks i and j (1-based)",
            ),
            "interm_avg": PooledFeature(
                "interm",
                "avg",
                interm,
                doc="the global-attention blocks' outputs, averaged and concatenated "
                "(SAM-HQ's interm_embeddings)",
            ),
        }

    def trunk(
        self, x: torch.Tensor, with_neck: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised [B, 3, S, S] -> (last block [B, C, gh, gw], neck [B, out_chans, gh, gw] or None)."""
        block, neck, _ = self.trunk_with_taps(x, with_neck)
        return block, neck

    def trunk_with_taps(
        self, x: torch.Tensor, with_neck: bool = True, taps: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """``trunk`` plus {1-based block number: its output [B, C, gh, gw]} for the blocks in ``taps``."""
        enc = self.encoder
        # patch_embed returns the conv's NCHW output permuted to [B, gh, gw, C] (a strided view);
        # the residual stream would keep that layout through every block, and every LayerNorm and
        # reshape would copy it (vit_b 1024 px bf16: 20% of the forward in strided copies).
        x = enc.patch_embed(x).contiguous()  # [B, gh, gw, C]
        x = x + enc.pos_embed  # pos_embed already resized to this grid at load time
        tapped = {}
        if taps:
            for i, blk in enumerate(enc.blocks, start=1):
                x = blk(x)
                if i in taps:
                    tapped[i] = x.permute(0, 3, 1, 2)
        else:
            x = enc.blocks(x)
        block = x.permute(0, 3, 1, 2)  # [B, C, gh, gw]
        return block, (enc.neck(block) if with_neck else None), tapped

    def _encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        requests = self.resolve(list(pooling))
        sources = {s for r in requests for s in r.sources}
        globals_1based = tuple(i + 1 for i in self.geometry.global_attn_indexes)
        taps = {int(s.split("@")[1]) for s in sources if s.startswith("block@")}
        taps |= set(globals_1based) if "interm" in sources else set()
        hw_cpu = valid_hw.cpu()  # the extractor passes host sizes: a no-op, not a device round trip
        x = self.preprocess(images, hw_cpu)  # slicing by CPU sizes: no device sync
        valid_hw = valid_hw.to(images.device, torch.long, non_blocking=True)
        x, compute = self.native_compute(x)
        with compute:
            block, neck, tapped = self.trunk_with_taps(
                x, with_neck=spatial is not None or "neck" in sources, taps=tuple(sorted(taps))
            )
        mask = valid_token_mask(valid_hw, self.grid, self.geometry.patch_size)  # [B, gh, gw]
        maps = {"neck": neck, "block": block, **{f"block@{i}": t for i, t in tapped.items()}}
        if "interm" in sources:  # one map: the global blocks' outputs stacked along channels
            maps["interm"] = torch.cat([tapped[i] for i in globals_1based], dim=1)
        feats = pool_maps(requests, maps, lambda _: mask)
        if spatial is None:
            return feats, None
        p = self.geometry.patch_size
        # [B, 2] = ceil(h'/p), ceil(w'/p)
        tokens_hw = torch.div(hw_cpu.long() + p - 1, p, rounding_mode="floor")
        return feats, pool_grid(neck, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        return (self.geometry.out_chans, *self.grid)

    def identity(self) -> dict[str, Any]:
        ident = {
            "name": "sam",
            "variant": self.geometry.variant,
            "geometry": self.geometry.as_dict(),
            "weights_sha256": weights_sha256(self.weights_path) if self.weights_path else None,
        }
        if self.family != "sam1":  # SAM 1 keys stay what they were
            ident["family"] = self.family
        return ident


def build_sam(cfg: BackboneConfig) -> SamBackbone:
    if cfg.checkpoint is None:
        raise ConfigError(
            "backbone.checkpoint is not set: the SAM backbone needs encoder weights",
            fix=DOWNLOAD_FIX,
        )
    return SamBackbone.from_checkpoint(
        cfg.checkpoint,
        img_size=cfg.img_size or 1024,
        variant=cfg.variant,
        timm_model=cfg.timm_model,
    )


def build_sam_family(cfg: BackboneConfig, path: Path, label: str) -> SamBackbone:
    """Builder for a detected SAM 1 or SAM-HQ checkpoint (``sam_family.build_detected``)."""
    family = "sam_hq" if label == "SAM-HQ" else "sam1"
    bb = SamBackbone.from_checkpoint(
        path,
        img_size=cfg.img_size or 1024,
        variant=cfg.variant,
        timm_model=cfg.timm_model,
        family=family,
    )
    bb.found = f"{label} checkpoint, {bb.geometry.describe()}"
    return bb
