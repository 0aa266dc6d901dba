"""MobileSAM (TinyViT-5M distilled from SAM ViT-H's image embedding) as a samprobe backbone.

The encoder is a port of MobileSAM's ``tiny_vit_sam.TinyViT`` (Apache-2.0; reference: PyPI
``mobilesam-mirror`` as ``mobile_sam``), inference only: same module and parameter names, so an
official ``mobile_sam.pt`` (flat ``image_encoder.*`` state dict) loads unchanged; BatchNorm
runs in eval mode, drop path and the layer-wise lr decay are gone. The last patch merging keeps
the stride (MobileSAM's rule: output width 320/448/576 -> stride 1), so the neck sees a 64x64
map at 1024 px, as SAM's. Preprocessing is SAM 1's (longest side, pixel mean/std, zero padding),
as ``mobile_sam.Sam.preprocess``; pooling covers the valid tokens only.
"""

from __future__ import annotations

import itertools
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

# The released MobileSAM encoder (mobile_sam/build_sam.py, build_sam_vit_t).
OFFICIAL = {
    "embed_dims": (64, 128, 160, 320),
    "depths": (2, 2, 6, 2),
    "num_heads": (2, 4, 5, 10),
    "window_sizes": (7, 7, 14, 7),
}
_PREFIX = "image_encoder."
_FIX = "use the official MobileSAM checkpoint (mobile_sam.pt, `samprobe weights list`)"
_KEEP_STRIDE = (320, 448, 576)  # MobileSAM's PatchMerging: these output widths keep the resolution


@dataclass(frozen=True)
class TinyVitGeometry:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_sizes: tuple[int, ...]
    out_chans: int
    variant: str  # tiny_vit_5m | custom

    def describe(self) -> str:
        return f"MobileSAM {self.variant} encoder (TinyViT widths {list(self.embed_dims)}, depths {list(self.depths)})"

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def encoder_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}


def infer_tinyvit_geometry(state_dict: Mapping[str, torch.Tensor], where: str) -> TinyVitGeometry:
    """Geometry from SHAPES: widths from the convs, depths from block counts, heads and windows
    from each stage's attention-bias table ([heads, window**2] distinct offsets)."""
    sd = encoder_state(state_dict)
    if "patch_embed.seq.2.c.weight" not in sd or "neck.0.weight" not in sd:
        raise CheckpointError(
            f"{where} does not hold a MobileSAM TinyViT encoder (no image_encoder.patch_embed.seq "
            f"/ image_encoder.neck)",
            fix=_FIX,
        )
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k)))
    depths = tuple(
        1
        + max(int(m.group(1)) for k in sd if (m := re.match(rf"^layers\.{i}\.blocks\.(\d+)\.", k)))
        for i in range(n_layers)
    )
    dims = [int(sd["patch_embed.seq.2.c.weight"].shape[0])]
    for i in range(n_layers - 1):
        dims.append(int(sd[f"layers.{i}.downsample.conv1.c.weight"].shape[0]))
    heads, windows = [0], [0]  # stage 0 is convolutional (MBConv): no attention
    for i in range(1, n_layers):
        bias = sd[f"layers.{i}.blocks.0.attn.attention_biases"]  # [heads, window**2]
        heads.append(int(bias.shape[0]))
        windows.append(int(round(bias.shape[1] ** 0.5)))
    found = (tuple(dims), depths, tuple(heads[1:]), tuple(windows[1:]))
    official = (
        OFFICIAL["embed_dims"],
        OFFICIAL["depths"],
        OFFICIAL["num_heads"][1:],
        OFFICIAL["window_sizes"][1:],
    )
    return TinyVitGeometry(
        embed_dims=tuple(dims),
        depths=depths,
        num_heads=tuple(heads),
        window_sizes=tuple(windows),
        out_chans=int(sd["neck.0.weight"].shape[0]),
        variant="tiny_vit_5m" if found == official else "custom",
    )


# ---------------------------------------------------------------------------------------
# the encoder (module and parameter names as mobile_sam.modeling.tiny_vit_sam)


class Conv2d_BN(nn.Sequential):  # noqa: N801 (official name: state-dict keys ".c" / ".bn")
    def __init__(
        self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        half = embed_dim // 2
        self.seq = nn.Sequential(
            Conv2d_BN(3, half, 3, 2, 1), nn.GELU(), Conv2d_BN(half, embed_dim, 3, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1, self.act1 = Conv2d_BN(dim, hidden), nn.GELU()
        self.conv2, self.act2 = Conv2d_BN(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU()
        self.conv3, self.act3 = Conv2d_BN(hidden, dim), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(y + x)


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2d_BN(dim, out_dim)
        self.conv2 = Conv2d_BN(
            out_dim, out_dim, 3, 1 if out_dim in _KEEP_STRIDE else 2, 1, groups=out_dim
        )
        self.conv3 = Conv2d_BN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C', H', W'] (the official one flattens to tokens; the caller keeps maps)."""
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.act = nn.LayerNorm(dim), nn.GELU()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def bias_index(window: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """long [w*w, w*w]: index of each (query, key) pair's (|dy|, |dx|) offset, numbered in first-seen order."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = [
        offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets))
        for p in points
        for q in points
    ]
    return torch.tensor(idxs, device=device).view(len(points), len(points))


class Attention(nn.Module):
    """Window attention with TinyViT's learned bias per (|dy|, |dx|) offset."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        idxs = bias_index(window, device="cpu")
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, int(idxs.max()) + 1))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
        B, N, _ = x.shape
        q, k, v = (
            self.qkv(self.norm(x)).view(B, N, self.num_heads, -1).split([self.key_dim] * 3, dim=3)
        )
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # [heads, N, N]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=bias,
            scale=self.scale,
        )
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]: windowed attention (zero-padded to whole windows), local conv, MLP."""
        B, C, H, W = x.shape
        w = self.window
        tokens = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        if w == H and w == W:
            attn = self.attn(tokens.reshape(B, H * W, C)).view(B, H, W, C)
        else:
            pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
            t = F.pad(tokens, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else tokens
            nH, nW = (H + pad_b) // w, (W + pad_r) // w
            t = t.reshape(B, nH, w, nW, w, C).transpose(2, 3).reshape(B * nH * nW, w * w, C)
            t = self.attn(t).view(B, nH, nW, w, w, C).transpose(2, 3).reshape(B, nH * w, nW * w, C)
            attn = t[:, :H, :W]
        x = (tokens + attn).permute(0, 3, 1, 2)  # [B, C, H, W]
        x = self.local_conv(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        return (x + self.mlp(x)).permute(0, 3, 1, 2)


class Layer(nn.Module):
    """``ConvLayer`` (stage 0, MBConv blocks) or ``BasicLayer`` (TinyViT blocks), then patch merging."""

    def __init__(
        self, dim: int, depth: int, out_dim: int | None, num_heads: int = 0, window: int = 0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim) if not num_heads else TinyViTBlock(dim, num_heads, window)
            for _ in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class TinyViTEncoder(nn.Module):
    def __init__(self, g: TinyVitGeometry) -> None:
        super().__init__()
        dims, n = g.embed_dims, len(g.embed_dims)
        self.patch_embed = PatchEmbed(dims[0])
        self.layers = nn.ModuleList(
            Layer(
                dims[i],
                g.depths[i],
                dims[i + 1] if i < n - 1 else None,
                g.num_heads[i],
                g.window_sizes[i],
            )
            for i in range(n)
        )
        c = g.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], c, 1, bias=False),
            LayerNorm2d(c),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            LayerNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [B, 3, S, S] -> (last stage [B, C, S/16, S/16], neck [B, 256, S/16, S/16]).

        Runs channels-last (the weights are converted at load): the convolutions skip oneDNN's
        layout reorders and the blocks' NCHW <-> token permutes become views. TinyViT-5M at
        1024 px ran 1.57x faster than in NCHW (paired runs, /proc/loadavg 15 on 2 cores)."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return x, self.neck(x)


# ---------------------------------------------------------------------------------------
# backbone


class MobileSamBackbone(PooledMapsBackbone):
    name = "mobile_sam"
    default_pooling = ("neck_avg",)
    preprocess_version = "1"
    decode_longest_side = True
    patch = 16  # the neck's stride

    def __init__(
        self,
        encoder: TinyViTEncoder,
        geometry: TinyVitGeometry,
        img_size: int,
        weights_path: Path | None = None,
    ) -> None:
        super().__init__()
        if img_size % self.patch:
            raise ConfigError(
                f"backbone.img_size {img_size} is not a multiple of 16 (MobileSAM's output stride)",
                fix=f"use e.g. {max(16, round(img_size / 16) * 16)} (MobileSAM's own size is 1024)",
            )
        self.encoder, self.geometry, self.input_size = encoder, geometry, img_size
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.grid = (img_size // self.patch, img_size // self.patch)

    @classmethod
    def from_checkpoint(
        cls, path: Path, img_size: int = 1024, variant: str = "auto"
    ) -> MobileSamBackbone:
        path = Path(path)
        sd = read_checkpoint(path)
        geometry = infer_tinyvit_geometry(sd, str(path))
        check_variant(variant, geometry, str(path))
        with torch.device("meta"):
            encoder = TinyViTEncoder(geometry)
        enc_sd = encoder_state(sd)
        missing, unexpected = encoder.load_state_dict(enc_sd, strict=False, assign=True)
        # unused classifier
        unexpected = [k for k in unexpected if not k.startswith(("norm_head.", "head."))]
        if missing or unexpected:
            raise CheckpointError(
                f"MobileSAM encoder weights do not match their own geometry: missing "
                f"{missing[:4]}, unexpected {unexpected[:4]}",
                fix=_FIX,
            )
        for (
            mod
        ) in encoder.modules():  # non-persistent buffers are not in the file: build them for real
            if isinstance(mod, Attention):
                mod.attention_bias_idxs = bias_index(mod.window)
        encoder = encoder.to(memory_format=torch.channels_last)
        return cls(encoder.eval().requires_grad_(False), geometry, img_size, path)

    def features(self) -> dict[str, PooledFeature]:
        g = self.geometry
        return {
            **neck_features(g.out_chans, "the 256-d distilled SAM embedding"),
            "trunk_avg": PooledFeature(
                "trunk", "avg", g.embed_dims[-1], doc="TinyViT's last stage, averaged"
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
        mask = valid_token_mask(valid_hw.to(images.device, torch.long), self.grid, self.patch)
        feats = pool_maps(requests, {"neck": neck, "trunk": trunk}, lambda _: mask)
        if spatial is None:
            return feats, None
        tokens_hw = torch.div(hw_cpu.long() + self.patch - 1, self.patch, rounding_mode="floor")
        return feats, pool_grid(neck, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        return (self.geometry.out_chans, *self.grid)

    def identity(self) -> dict[str, Any]:
        return {
            "name": "mobile_sam",
            "variant": self.geometry.variant,
            "geometry": self.geometry.as_dict(),
            "weights_sha256": weights_sha256(self.weights_path) if self.weights_path else None,
        }


def build_mobile_sam_family(cfg: BackboneConfig, path: Path, label: str) -> MobileSamBackbone:
    """Builder for a detected MobileSAM checkpoint (``sam_family.build_detected``)."""
    bb = MobileSamBackbone.from_checkpoint(path, img_size=cfg.img_size or 1024, variant=cfg.variant)
    bb.found = f"{label} checkpoint, {bb.geometry.describe()}"
    return bb
