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


def build_official_sam(
    geometry: str = "tiny", img_size: int = 256, window_size: int = 14, seed: int = 0
) -> Sam:
    embed_dim, depth, heads, global_idx = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_idx,
        window_size=window_size,
        out_chans=256,
    )
    grid = img_size // 16
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02)
    return sam.eval()


def write_official_checkpoint(
    path: Path, geometry: str = "tiny", img_size: int = 256, seed: int = 0
) -> Path:
    """Save exactly as the official release does: ``torch.save(sam.state_dict())``."""
    sam = build_official_sam(geometry, img_size=img_size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


def build_official_sam_hq(geometry: str = "tiny", img_size: int = 256, seed: int = 0):
    """SAM-HQ (PyPI ``segment-anything-hq`` 0.3) with random weights, built as its ``_build_sam`` does:
    SAM's ViT encoder + ``MaskDecoderHQ`` (its extra hf_token / hf_mlp / compress_vit_feat... keys)."""
    from segment_anything_hq.modeling import ImageEncoderViT as HqEncoder
    from segment_anything_hq.modeling import MaskDecoderHQ
    from segment_anything_hq.modeling import PromptEncoder as HqPrompt
    from segment_anything_hq.modeling import Sam as HqSam
    from segment_anything_hq.modeling import TwoWayTransformer as HqTransformer

    embed_dim, depth, heads, global_idx = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    grid = img_size // 16
    sam = HqSam(
        image_encoder=HqEncoder(
            depth=depth,
            embed_dim=embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_idx,
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=HqPrompt(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=HqTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.copy_(torch.randn_like(p) * 0.02)
    return sam.eval()


def write_official_hq_checkpoint(
    path: Path, geometry: str = "tiny", img_size: int = 256, seed: int = 0
) -> Path:
    """As the SAM-HQ release: ``torch.save(sam.state_dict())`` of the whole HQ model."""
    sam = build_official_sam_hq(geometry, img_size=img_size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


# TinyViT geometries for mobile_sam.modeling.TinyViT: the release's, and a narrow one for fast tests
# (the last width must be one of 320/448/576: MobileSAM's rule that keeps the last stage at stride
# 16).
TINYVIT = {
    "tiny_vit_5m": dict(
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
    ),
    "tiny": dict(
        embed_dims=[16, 32, 64, 320],
        depths=[1, 1, 2, 1],
        num_heads=[1, 1, 2, 10],
        window_sizes=[7, 7, 14, 7],
    ),
}


def build_official_mobile_sam(geometry: str = "tiny", img_size: int = 1024, seed: int = 0):
    """MobileSAM (PyPI mobilesam-mirror's ``mobile_sam``) as its ``build_sam_vit_t`` builds it, random weights
    (BatchNorm statistics and the attention biases randomised too: the defaults would hide a mix-up)."""
    from mobile_sam.modeling import MaskDecoder as MDecoder
    from mobile_sam.modeling import PromptEncoder as MPrompt
    from mobile_sam.modeling import Sam as MSam
    from mobile_sam.modeling import TinyViT
    from mobile_sam.modeling import TwoWayTransformer as MTransformer

    torch.manual_seed(seed)
    grid = img_size // 16
    sam = MSam(
        image_encoder=TinyViT(
            img_size=img_size,
            in_chans=3,
            num_classes=1000,
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
            **TINYVIT[geometry],
        ),
        prompt_encoder=MPrompt(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MDecoder(
            num_multimask_outputs=3,
            transformer=MTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():
        for name, t in sam.image_encoder.state_dict().items():
            if name.endswith(("running_mean", "attention_biases")) or (name.endswith(".bn.weight")):
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if name.endswith(".bn.weight") else 0.0))
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
    sam.eval()
    for (
        m
    ) in sam.image_encoder.modules():  # eval() caches the biases ('ab') before they were randomised
        if hasattr(m, "ab"):
            m.train(False)
    return sam


def write_official_mobile_sam_checkpoint(
    path: Path, geometry: str = "tiny", img_size: int = 1024, seed: int = 0
) -> Path:
    """As the MobileSAM release (mobile_sam.pt): ``torch.save(sam.state_dict())``, flat."""
    sam = build_official_mobile_sam(geometry, img_size=img_size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


# EfficientViT-SAM geometries for efficientsam (PyPI; mit-han-lab/efficientvit at de7d773): the five
# releases by their model-zoo names, and narrow L- and XL-type ones for fast tests.
_TINY_EFFICIENTVIT = {
    "tiny": dict(
        backbone=dict(width_list=[8, 16, 32, 64, 128], depth_list=[1, 1, 1, 1, 1], qkv_dim=16),
        neck=dict(fid_list=["stage4", "stage3", "stage2"], in_channel_list=[128, 64, 32]),
        neck_expand=1,
    ),
    "tiny_xl": dict(
        backbone=dict(
            width_list=[8, 16, 32, 64, 128, 256],
            depth_list=[0, 1, 1, 1, 1, 1],
            block_list=["res", "fmb", "fmb", "fmb", "att@3", "att@3"],
            expand_list=[1, 4, 4, 4, 4, 6],
            fewer_norm_list=[False, False, False, False, True, True],
            qkv_dim=16,
        ),
        neck=dict(fid_list=["stage5", "stage4", "stage3"], in_channel_list=[256, 128, 64]),
        neck_expand=4,
    ),
}


def build_official_efficientvit_sam(geometry: str = "tiny", seed: int = 0):
    """EfficientViT-SAM as efficientsam's model zoo builds it (``create_efficientvit_sam_model``, norm
    eps 1e-6), random weights; BatchNorm statistics and affine parameters randomised too (the
    defaults, mean 0 / var 1 / identity, would hide a mix-up of two norms)."""
    from efficientsam.models.efficientvit.backbone import EfficientViTLargeBackbone
    from efficientsam.models.efficientvit.sam import (
        EfficientViTSamImageEncoder,
        SamNeck,
        build_efficientvit_sam,
    )
    from efficientsam.models.nn.norm import set_norm_eps
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    torch.manual_seed(seed)
    if geometry in _TINY_EFFICIENTVIT:
        spec = _TINY_EFFICIENTVIT[geometry]
        neck = SamNeck(
            **spec["neck"],
            head_width=32,
            head_depth=1,
            expand_ratio=spec["neck_expand"],
            middle_op="fmb",
        )
        encoder = EfficientViTSamImageEncoder(EfficientViTLargeBackbone(**spec["backbone"]), neck)
        model = build_efficientvit_sam(encoder, 512)
        set_norm_eps(model, 1e-6)
    else:  # l0 | l1 | l2 | xl0 | xl1
        model = create_efficientvit_sam_model(f"efficientvit-sam-{geometry}", pretrained=False)
    if next(model.parameters()).is_meta:
        return model.eval()
    with torch.no_grad():
        for m in model.image_encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.randn_like(m.weight) * 0.1 + 1.0)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
        norm = model.image_encoder.norm
        norm.weight.copy_(torch.randn_like(norm.weight) * 0.1 + 1.0)
        norm.bias.copy_(torch.randn_like(norm.bias) * 0.1)
    return model.eval()


def write_official_efficientvit_sam_checkpoint(
    path: Path, geometry: str = "tiny", seed: int = 0
) -> Path:
    """As the releases (efficientvit_sam_l0.pt ...): ``torch.save(model.state_dict())``, flat."""
    model = build_official_efficientvit_sam(geometry, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
