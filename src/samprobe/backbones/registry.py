"""Backbone registry: a name -> builder table, so adding a backbone is one decorated function.

A backbone is split in two halves on purpose:
- ``prepare`` runs in DataLoader worker processes: CPU only, decode-side geometry (resize),
  returns a uint8 CHW tensor padded to the fixed input size plus the valid (h, w) region.
  It never touches CUDA, which is what makes forked workers safe.
- ``forward`` runs on the device: normalisation, padding mask, encoder, pooling. It returns
  one pooled vector per requested feature name.

Optionally (``features.spatial``) a backbone also returns a coarse spatial grid per image: its
last feature map's *valid* token region adaptive-average-pooled to ``spatial x spatial`` tokens
(``encode_grid``), for attention heads. Padding never enters the grid.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samprobe.config import BackboneConfig
from samprobe.errors import ConfigError


class Backbone(nn.Module):
    """Frozen image encoder with pooled outputs. Subclasses set the attributes below."""

    name: str = "base"
    input_size: int = 224
    feature_names: tuple[str, ...] = ()
    """Pooled features this backbone offers, e.g. ("neck_avg", "neck_max", "block_avg")."""
    default_pooling: tuple[str, ...] = ()
    preprocess_version: str = "1"
    decode_longest_side: bool = False
    """True when ``prepare`` resizes the longest side to ``input_size``: lets JPEGs decode at reduced scale."""

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """HxWx3 uint8 RGB -> (uint8 [3, S, S] with content top-left, (h', w') valid size)."""
        raise NotImplementedError

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        """A small picklable callable doing ``prepare``, shipped to worker processes (not the weights)."""
        return self.prepare

    def encode(self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str]) -> torch.Tensor:
        """uint8 [B, 3, S, S] on device, valid_hw int [B, 2] on the host (sizes read there: no device
        sync) -> float [B, D] (pooled features concatenated in ``pooling`` order)."""
        raise NotImplementedError

    def encode_grid(self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str],
                    spatial: int) -> tuple[torch.Tensor, torch.Tensor]:
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
                f"features.spatial {spatial} is larger than the {gh}x{gw} feature map of backbone {self.name!r} "
                f"at {self.input_size}px",
                fix=f"set features.spatial to at most {min(gh, gw)}, or raise backbone.img_size",
            )

    def feature_dims(self) -> dict[str, int]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What determines the features besides pooling and dtype: model, weights hash, geometry."""
        raise NotImplementedError

    def check_pooling(self, pooling: list[str]) -> None:
        unknown = [p for p in pooling if p not in self.feature_names]
        if unknown or not pooling:
            raise ConfigError(
                f"features.pooling {pooling} is not offered by backbone {self.name!r}",
                fix=f"choose from {', '.join(self.feature_names)}",
            )


def pool_grid(x: torch.Tensor, tokens_hw: torch.Tensor, spatial: int) -> torch.Tensor:
    """x [B, C, gh, gw], tokens_hw int [B, 2] valid token rows/cols (top-left) -> fp32 [B, spatial*spatial, C].

    Each image's valid region ``x[b, :, :rows, :cols]`` is adaptive-average-pooled on its own, so
    padding tokens never contribute. A side shorter than ``spatial`` (a very wide or tall image)
    repeats its tokens, as adaptive pooling does."""
    out = []
    for b, (rows, cols) in enumerate(tokens_hw.tolist()):
        region = x[b, :, :max(rows, 1), :max(cols, 1)].float()  # [C, rows, cols]
        out.append(F.adaptive_avg_pool2d(region, spatial).flatten(1).T)  # [spatial*spatial, C]
    return torch.stack(out)


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
_REGISTRY: dict[str, BackboneBuilder] = {}


def register(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    _import_builtin()
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"backbone.name {cfg.name!r} is unknown", fix=f"choose from {', '.join(available())}")
    model = _REGISTRY[cfg.name](cfg)
    model.eval().requires_grad_(False)
    return model


def _import_builtin() -> None:
    """Import every module of this package: each registers its backbones on import.
    Lazy, so `samprobe --help` stays fast and timm loads only when a backbone is built."""
    import importlib
    import pkgutil

    import samprobe.backbones as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry", "precision"):
            importlib.import_module(f"samprobe.backbones.{mod.name}")
