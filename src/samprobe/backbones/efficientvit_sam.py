"""EfficientViT-SAM (L0-L2 at 512 px, XL0-XL1 at 1024 px) image encoder as a samprobe backbone.

A port of mit-han-lab/efficientvit's ``EfficientViTLargeBackbone`` + ``SamNeck`` +
``EfficientViTSamImageEncoder`` (Apache-2.0; reference: PyPI ``efficientsam`` 1.0.0, which is
that repository at de7d773 with its imports renamed), inference only: same module and parameter
names, so an official ``efficientvit_sam_*.pt`` (flat ``image_encoder.*`` state dict, or one
inside ``{"state_dict": ...}``) loads unchanged. As in the official model zoo every BatchNorm
and LayerNorm uses eps 1e-6 (``set_norm_eps(model, 1e-6)``); GELU is the tanh approximation.

Shapes for L0 at 512 px: stages of width 32/64/128/256/512 at strides 2/4/8/16/32; the neck
projects the last three stages to 256 channels, resizes each to a fixed 64x64 grid (bicubic,
as the official ``UpSampleLayer(size=(64, 64))``), adds them, runs fused-MBConv blocks and a
1x1 conv, then LayerNorm2d: the 256x64x64 SAM embedding. XL models add a sixth stage (stride
64) and read stages 5/4/3. The grid stays 64x64 at any input size (the official rule), so one
embedding token covers ``img_size / 64`` pixels.

Preprocessing is the official ``EfficientViTSam.transform``: longest side to the input size
(PIL bilinear, ``SamResize``'s rounding, which is SAM 1's), SAM's pixel mean/std, zero padding
bottom/right: SAM 1's, so ``letterbox`` + ``sam_normalize_pad``. Pooling covers valid tokens only.
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

from samprobe.backbones.mobile_sam import LayerNorm2d
from samprobe.backbones.registry import (
    PooledFeature,
    PooledMapsBackbone,
    neck_features,
    pool_grid,
    pool_maps,
    valid_token_mask,
)
from samprobe.backbones.sam_state_dict import check_variant, read_checkpoint
from samprobe.config import BackboneConfig
from samprobe.data.images import letterbox, sam_normalize_pad
from samprobe.errors import CheckpointError, ConfigError
from samprobe.io import weights_sha256

EPS = 1e-6  # the model zoo's set_norm_eps(model, 1e-6), for BatchNorm and LayerNorm alike
GRID = 64  # SamNeck's UpSampleLayer(size=(64, 64)): the embedding is 64x64 at every input size
_PREFIX = "image_encoder."
_FIX = (
    "use an official EfficientViT-SAM checkpoint (efficientvit_sam_l0.pt ... _xl1.pt, "
    "`samprobe weights list`)"
)


@dataclass(frozen=True)
class EfficientVitGeometry:
    """The encoder shape a checkpoint implies (one entry per stage, stage 0 = the stem)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    blocks: tuple[str, ...]
    """Per stage: "res" | "fmb" | "mb" | "att@5" | "att@3" (LiteMLA with that aggregation kernel)."""
    expands: tuple[float, ...]
    fewer_norm: tuple[bool, ...]
    qkv_dim: int
    neck_depth: int
    neck_expand: float
    head_width: int = 256
    out_chans: int = 256
    variant: str = "custom"  # efficientvit_l0 ... efficientvit_xl1 | custom

    @property
    def native_size(self) -> int:
        """L models run at 512 px, XL (six stages) at 1024: the official ``image_size``."""
        return 512 if len(self.widths) == 5 else 1024

    @property
    def stride(self) -> int:
        """Stride of the last stage (the trunk map): each stage halves the resolution."""
        return 2 ** len(self.widths)

    def describe(self) -> str:
        name = (
            self.variant.replace("efficientvit_", "").upper()
            if self.variant != "custom"
            else "custom"
        )
        return f"EfficientViT-SAM {name} encoder (widths {list(self.widths)}, depths {list(self.depths)})"

    def shape_key(self) -> tuple:
        return (self.widths, self.depths, self.blocks, self.expands, self.fewer_norm)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The five released encoders: efficientvit/models/efficientvit/{backbone,sam}.py at de7d773
# (efficientvit_backbone_l0..l2 with EfficientViTLargeBackbone's default block/expand/norm lists;
# efficientvit_sam_xl0/xl1's explicit ones), with each SamNeck's head_depth and expand_ratio.
def _release(variant: str, depths: tuple[int, ...], neck_depth: int) -> EfficientVitGeometry:
    if len(depths) == 5:  # L: att stages use LiteMLA with 5x5 aggregation, neck expand 1
        return EfficientVitGeometry(
            widths=(32, 64, 128, 256, 512),
            depths=depths,
            blocks=("res", "fmb", "fmb", "mb", "att@5"),
            expands=(1.0, 4.0, 4.0, 4.0, 6.0),
            fewer_norm=(False, False, False, True, True),
            qkv_dim=32,
            neck_depth=neck_depth,
            neck_expand=1.0,
            variant=variant,
        )
    return EfficientVitGeometry(  # XL: a sixth stage, 3x3 aggregation, neck expand 4
        widths=(32, 64, 128, 256, 512, 1024),
        depths=depths,
        blocks=("res", "fmb", "fmb", "fmb", "att@3", "att@3"),
        expands=(1.0, 4.0, 4.0, 4.0, 4.0, 6.0),
        fewer_norm=(False, False, False, False, True, True),
        qkv_dim=32,
        neck_depth=neck_depth,
        neck_expand=4.0,
        variant=variant,
    )


OFFICIAL: dict[str, EfficientVitGeometry] = {
    g.variant: g
    for g in (
        _release("efficientvit_l0", (1, 1, 1, 4, 4), 4),
        _release("efficientvit_l1", (1, 1, 1, 6, 6), 8),
        _release("efficientvit_l2", (1, 2, 2, 8, 8), 12),
        _release("efficientvit_xl0", (0, 1, 1, 2, 3, 3), 6),
        _release("efficientvit_xl1", (1, 2, 2, 4, 6, 6), 12),
    )
}


def encoder_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index matched by ``pattern``'s group, 0 when nothing matches."""
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def _block_kind(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    """The block type at ``prefix`` (an ``op_list.N.`` key prefix) from the names it holds."""
    if f"{prefix}context_module.main.aggreg.0.0.weight" in sd:
        kernel = int(sd[f"{prefix}context_module.main.aggreg.0.0.weight"].shape[-1])
        return f"att@{kernel}"
    for conv, kind in (("spatial_conv", "fmb"), ("inverted_conv", "mb"), ("conv1", "res")):
        if f"{prefix}main.{conv}.conv.weight" in sd:
            return kind
    raise CheckpointError(f"unknown EfficientViT block at image_encoder.{prefix}", fix=_FIX)


def _expand(sd: Mapping[str, torch.Tensor], prefix: str, kind: str) -> float:
    """Hidden width / input width of the block at ``prefix`` (its first conv's shape)."""
    first = {
        "res": "main.conv1",
        "fmb": "main.spatial_conv",
        "mb": "main.inverted_conv",
    }.get(kind, "local_module.main.inverted_conv")
    w = sd[f"{prefix}{first}.conv.weight"]  # [hidden, in / groups, k, k]
    return float(w.shape[0]) / float(w.shape[1])


def infer_efficientvit_geometry(
    state_dict: Mapping[str, torch.Tensor], where: str
) -> EfficientVitGeometry:
    """Geometry from key names and SHAPES: stage count, widths, depths, block types and
    expansions per stage, the LiteMLA head width, the neck's depth; named when it is a release's."""
    sd = encoder_state(state_dict)
    stem = "backbone.stages.0.op_list.0.conv.weight"
    out_conv = "neck.output_ops.0.op_list.0.conv.weight"
    if stem not in sd or out_conv not in sd or "norm.weight" not in sd:
        raise CheckpointError(
            f"{where} does not hold an EfficientViT-SAM encoder (no image_encoder.backbone.stages "
            f"/ image_encoder.neck.output_ops / image_encoder.norm)",
            fix=_FIX,
        )
    n_stages = _count(sd, r"^backbone\.stages\.(\d+)\.")
    widths, depths, blocks, expands, fewer = [int(sd[stem].shape[0])], [], [], [], []
    qkv_dims = set()
    for i in range(n_stages):
        ops = _count(sd, rf"^backbone\.stages\.{i}\.op_list\.(\d+)\.")
        depths.append(ops - 1)  # op 0: the stem conv (stage 0) or the strided block (the others)
        if i:
            down = f"backbone.stages.{i}.op_list.0."
            widths.append(int(sd[f"{down}main.point_conv.conv.weight"].shape[0]))
            fewer.append(any(k.startswith(down) and k.endswith(".conv.bias") for k in sd))
        else:
            fewer.append(False)
        if ops > 1:
            block = f"backbone.stages.{i}.op_list.1."
            kind = _block_kind(sd, block)
            blocks.append(kind)
            expands.append(_expand(sd, block, kind))
            if kind.startswith("att"):
                qkv_dims.add(int(sd[f"{block}context_module.main.aggreg.0.1.weight"].shape[1]))
        elif i == 0:  # a stem without blocks (XL0's): the official "res", expand 1, unused
            blocks.append("res")
            expands.append(1.0)
        else:  # a stage without blocks: its strided block has 4x the stage's expansion
            down = f"backbone.stages.{i}.op_list.0."
            blocks.append(_block_kind(sd, down))
            expands.append(_expand(sd, down, blocks[-1]) / 4)
    neck_depth = _count(sd, r"^neck\.middle\.op_list\.(\d+)\.")
    if neck_depth and "neck.middle.op_list.0.main.spatial_conv.conv.weight" not in sd:
        raise CheckpointError(
            f"{where}: EfficientViT-SAM neck blocks other than fused MBConv are not supported",
            fix=_FIX,
        )
    # every release: fused MBConv
    neck_expand = _expand(sd, "neck.middle.op_list.0.", "fmb") if neck_depth else 1.0
    found = EfficientVitGeometry(
        widths=tuple(widths),
        depths=tuple(depths),
        blocks=tuple(blocks),
        expands=tuple(expands),
        fewer_norm=tuple(fewer),
        qkv_dim=qkv_dims.pop() if len(qkv_dims) == 1 else 32,
        neck_depth=neck_depth,
        neck_expand=neck_expand,
        head_width=int(sd[out_conv].shape[1]),
        out_chans=int(sd[out_conv].shape[0]),
    )
    for name, g in OFFICIAL.items():
        if (g.shape_key(), g.neck_depth, g.neck_expand, g.head_width) == (
            found.shape_key(),
            found.neck_depth,
            found.neck_expand,
            found.head_width,
        ):
            return EfficientVitGeometry(**{**asdict(found), "variant": name})
    return found


# ---------------------------------------------------------------------------------------
# the encoder (module and parameter names as efficientvit.models.nn.ops)


def _gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")  # efficientvit's "gelu" activation


class ConvLayer(nn.Module):
    """Conv (same padding) -> BatchNorm (optional) -> activation (optional)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        *,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout, eps=EPS) if norm else None
        self.act = _gelu() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Inference only: fold the (eval-mode) BatchNorm into the conv's weight and bias, which
        saves the norm's pass over the map (BatchNorm was ~9 % of L0's CPU time at 512 px)."""
        if self.norm is None:
            return
        bn, conv = self.norm, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [cout]
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
        )
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bias)
        self.conv, self.norm = fused.requires_grad_(False), None


class ResBlock(nn.Module):
    """3x3 conv + act, 3x3 conv (stride on the first)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.conv1 = ConvLayer(cin, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=True)
        self.conv2 = ConvLayer(mid, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    """3x3 expanding conv + act, 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.spatial_conv = ConvLayer(
            cin, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=True
        )
        self.point_conv = ConvLayer(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    """1x1 expand + act, 3x3 depthwise + act, 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(cin * expand)
        plain = {"bias": fewer_norm, "norm": not fewer_norm, "act": True}
        self.inverted_conv = ConvLayer(cin, mid, 1, **plain)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, **plain)
        self.point_conv = ConvLayer(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


_LOCAL_BLOCKS: dict[str, type[nn.Module]] = {"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}


class Residual(nn.Module):
    """``ResidualBlock``: ``main(x) + x`` (identity shortcut) or ``main(x)`` (none: a strided block)."""

    def __init__(self, main: nn.Module, shortcut: bool) -> None:
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.shortcut else self.main(x)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention: q, k, v from a 1x1 conv, plus a copy aggregated by a
    depthwise kxk + grouped 1x1 conv; per head ``(v k^T) q`` normalised by ``k^T q`` summed."""

    def __init__(self, channels: int, dim: int, kernel: int) -> None:
        super().__init__()
        heads = channels // dim
        total = heads * dim
        self.dim = dim
        self.qkv = ConvLayer(channels, 3 * total, 1, norm=False)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        3 * total,
                        3 * total,
                        kernel,
                        padding=kernel // 2,
                        groups=3 * total,
                        bias=False,
                    ),
                    nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
                )
            ]
        )
        self.proj = ConvLayer(2 * total, channels, 1)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """[B, heads' * 3 * dim, H, W] -> [B, heads' * dim, H, W], in fp32: the normaliser divides
        by a sum over all tokens, which bf16's 8-bit mantissa would round (the official code also
        lifts it to fp32)."""
        B, _, H, W = qkv.shape
        qkv = qkv.float().reshape(B, -1, 3 * self.dim, H * W)  # [B, h, 3*dim, N]
        q, k, v = qkv.split(self.dim, dim=2)
        q, k = F.relu(q), F.relu(k)
        if self.dim < H * W:  # linear: [dim+1, dim] per head instead of [N, N]
            v = F.pad(v, (0, 0, 0, 1), value=1.0)  # [B, h, dim+1, N]: the last row sums k^T q
            out = (v @ k.transpose(-1, -2)) @ q  # [B, h, dim+1, N]
            out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        else:  # tiny maps: the official quadratic form (same value, its rounding)
            att = k.transpose(-1, -2) @ q  # [B, h, N, N]
            out = v @ (att / (att.sum(dim=2, keepdim=True) + 1e-15))
        return out.reshape(B, -1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        multi = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        return self.proj(self.attend(multi).to(x.dtype))


class EfficientViTBlock(nn.Module):
    """LiteMLA (context) then an MBConv (local), each residual."""

    def __init__(self, channels: int, dim: int, expand: float, kernel: int) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, dim, kernel), shortcut=True)
        self.local_module = Residual(MBConv(channels, channels, 1, expand, fewer_norm=True), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


def _stage(g: EfficientVitGeometry, i: int) -> OpSequential:
    """Stage ``i`` as ``EfficientViTLargeBackbone`` builds it."""
    kind, expand, fewer = g.blocks[i], g.expands[i], g.fewer_norm[i]
    if i == 0:
        ops: list[nn.Module] = [ConvLayer(3, g.widths[0], 3, 2, act=True)]
        cin = g.widths[0]
    else:
        cin, cout = g.widths[i - 1], g.widths[i]
        down = kind if kind in _LOCAL_BLOCKS and kind != "res" else "mb"
        ops = [Residual(_LOCAL_BLOCKS[down](cin, cout, 2, expand * 4, fewer), shortcut=False)]
        cin = cout
    for _ in range(g.depths[i]):
        if kind.startswith("att"):
            ops.append(EfficientViTBlock(cin, g.qkv_dim, expand, int(kind.split("@")[1])))
        else:
            ops.append(Residual(_LOCAL_BLOCKS[kind](cin, cin, 1, expand, fewer), shortcut=True))
    return OpSequential(ops)


class Backbone(nn.Module):
    def __init__(self, g: EfficientVitGeometry) -> None:
        super().__init__()
        self.stages = nn.ModuleList(_stage(g, i) for i in range(len(g.widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] -> every stage's map, stage i at stride 2**(i+1)."""
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class UpSample(nn.Module):
    """Bicubic resize to GRID x GRID in fp32 (the official layer lifts half precision to fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (GRID, GRID):
            return x
        return F.interpolate(x.float(), size=(GRID, GRID), mode="bicubic", align_corners=False)


class SamNeck(nn.Module):
    """``SamNeck`` (a ``DAGBlock`` merging by addition): the last three stages, each 1x1 conv + BN
    and resized to 64x64, summed; fused-MBConv residual blocks; a 1x1 conv to 256 channels."""

    def __init__(self, g: EfficientVitGeometry) -> None:
        super().__init__()
        hw = g.head_width
        self.input_ops = nn.ModuleList(
            OpSequential([ConvLayer(cin, hw, 1), UpSample()]) for cin in g.widths[::-1][:3]
        )
        self.middle = OpSequential(
            [
                Residual(FusedMBConv(hw, hw, 1, g.neck_expand, fewer_norm=False), shortcut=True)
                for _ in range(g.neck_depth)
            ]
        )
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(hw, g.out_chans, 1, bias=True, norm=False)])]
        )

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps (deepest last) -> [B, 256, 64, 64]."""
        merged = sum(op(x) for op, x in zip(self.input_ops, stages[::-1]))
        return self.output_ops[0](self.middle(merged))


class EfficientVitSamEncoder(nn.Module):
    def __init__(self, g: EfficientVitGeometry) -> None:
        super().__init__()
        self.backbone = Backbone(g)
        self.neck = SamNeck(g)
        self.norm = LayerNorm2d(g.out_chans, eps=EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [B, 3, S, S] -> (last stage [B, C, S/stride, S/stride], embedding [B, 256, 64, 64]).

        Runs channels-last (the weights are converted at load): oneDNN's convolutions then skip
        their layout reorders; L0 at 512 px ran 1.4x faster than contiguous NCHW (a paired
        measurement, /proc/loadavg 15 on 2 cores)."""
        stages = self.backbone(x.contiguous(memory_format=torch.channels_last))
        return stages[-1], self.norm(self.neck(stages))


# ---------------------------------------------------------------------------------------
# backbone


class EfficientVitSamBackbone(PooledMapsBackbone):
    name = "efficientvit_sam"
    default_pooling = ("neck_avg",)
    preprocess_version = "1"
    decode_longest_side = True

    def __init__(
        self,
        encoder: EfficientVitSamEncoder,
        geometry: EfficientVitGeometry,
        img_size: int,
        weights_path: Path | None = None,
    ) -> None:
        super().__init__()
        if img_size % GRID or img_size % geometry.stride:
            step = max(GRID, geometry.stride)
            raise ConfigError(
                f"backbone.img_size {img_size} is not a multiple of {step} (EfficientViT-SAM's "
                f"64x64 embedding and stride-{geometry.stride} last stage)",
                fix=f"use e.g. {max(step, round(img_size / step) * step)} (this model's own size "
                f"is {geometry.native_size})",
            )
        self.encoder, self.geometry, self.input_size = encoder, geometry, img_size
        self.weights_path = Path(weights_path) if weights_path is not None else None

    @classmethod
    def from_checkpoint(
        cls, path: Path, img_size: int | None = None, variant: str = "auto"
    ) -> EfficientVitSamBackbone:
        path = Path(path)
        sd = read_checkpoint(path)
        geometry = infer_efficientvit_geometry(sd, str(path))
        check_variant(variant, geometry, str(path))
        with torch.device("meta"):
            encoder = EfficientVitSamEncoder(geometry)
        try:
            missing, unexpected = encoder.load_state_dict(
                encoder_state(sd), strict=False, assign=True
            )
        except RuntimeError as exc:  # a shape the geometry rules do not predict
            raise CheckpointError(
                f"EfficientViT-SAM encoder weights in {path} do not fit their own geometry "
                f"({str(exc).splitlines()[-1].strip()})",
                fix=_FIX,
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"EfficientViT-SAM encoder weights in {path} do not match their own geometry: "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}",
                fix=_FIX,
            )
        for layer in list(encoder.modules()):  # a list: fold_norm replaces submodules
            if isinstance(layer, ConvLayer):
                layer.fold_norm()
        encoder = encoder.to(memory_format=torch.channels_last).eval().requires_grad_(False)
        return cls(encoder, geometry, img_size or geometry.native_size, path)

    @property
    def patch(self) -> int:
        """Pixels per embedding token (the 64x64 grid over the input)."""
        return self.input_size // GRID

    def features(self) -> dict[str, PooledFeature]:
        g = self.geometry
        return {
            **neck_features(g.out_chans, "the 256-d distilled SAM embedding"),
            "trunk_avg": PooledFeature(
                "trunk", "avg", g.widths[-1], doc="the backbone's last stage, averaged"
            ),
        }

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        return letterbox(image, self.input_size)

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        return partial(letterbox, size=self.input_size)

    def _encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        requests = self.resolve(list(pooling))
        hw_cpu = valid_hw.cpu()
        trunk, neck = self.encoder(sam_normalize_pad(images, hw_cpu))
        hw = valid_hw.to(images.device, torch.long)
        trunk_side = self.input_size // self.geometry.stride
        # The masks by map side (the two maps differ in stride); equal sides mean equal masks.
        masks = {
            trunk_side: valid_token_mask(hw, (trunk_side, trunk_side), self.geometry.stride),
            GRID: valid_token_mask(hw, (GRID, GRID), self.patch),
        }
        feats = pool_maps(
            requests, {"neck": neck, "trunk": trunk}, lambda m: masks[int(m.shape[-1])]
        )
        if spatial is None:
            return feats, None
        tokens_hw = torch.div(hw_cpu.long() + self.patch - 1, self.patch, rounding_mode="floor")
        return feats, pool_grid(neck, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        return (self.geometry.out_chans, GRID, GRID)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "efficientvit_sam",
            "variant": self.geometry.variant,
            "geometry": self.geometry.as_dict(),
            "weights_sha256": weights_sha256(self.weights_path) if self.weights_path else None,
        }


def build_efficientvit_sam_family(
    cfg: BackboneConfig, path: Path, label: str
) -> EfficientVitSamBackbone:
    """Builder for a detected EfficientViT-SAM checkpoint (``sam_family.build_detected``)."""
    bb = EfficientVitSamBackbone.from_checkpoint(path, img_size=cfg.img_size, variant=cfg.variant)
    bb.found = f"{label} checkpoint, {bb.geometry.describe()}"
    return bb
