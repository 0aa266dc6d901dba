"""Random-initialised SAM checkpoints in the official format, built with ``segment_anything``.

Official SAM initialises ``pos_embed`` and the relative-position tables to zeros; parity tests
against zeros would not notice a mix-up, so they get small random values here.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

GEOMETRIES = {
    # name: (embed_dim, depth, heads, global_attn_indexes)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "tiny": (64, 2, 2, (1,)),
}


def build_official_sam(geometry: str = "tiny", img_size: int = 256, window_size: int = 14,
                       seed: int = 0) -> Sam:
    embed_dim, depth, heads, global_idx = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx,
        window_size=window_size, out_chans=256,
    )
    grid = img_size // 16
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02)
    return sam.eval()


def write_official_checkpoint(path: Path, geometry: str = "tiny", img_size: int = 256,
                              seed: int = 0) -> Path:
    """Save exactly as the official release does: ``torch.save(sam.state_dict())``."""
    sam = build_official_sam(geometry, img_size=img_size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path
