"""timm backbones on the CPU at fp32: batch norms folded into their convolutions, channels-last,
features equal to the model as loaded within float32 rounding, on real photos and real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers.images import photos
from helpers.tolerance import close_after_rounding, efficientnet_lite0_terms, magnitude
from samprobe.backbones.registry import build_backbone
from samprobe.backbones.timm_models import fold_batch_norms
from samprobe.config import BackboneConfig


def _batch(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos, prepared as the extractor prepares them: uint8 [B, 3, S, S], valid sizes."""
    prepared = [backbone.prepare(np.ascontiguousarray(p)) for p in photos().values()]
    return torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])


@pytest.fixture(scope="module")
def lite0_pair():
    """(as loaded, made ready for fp32 CPU inference) efficientnet_lite0 at 96 px, real weights."""
    cfg = BackboneConfig(name="efficientnet_lite0", img_size=96)
    loaded, ready = build_backbone(cfg), build_backbone(cfg)
    ready.use_precision(torch.device("cpu"), "fp32")
    return loaded, ready


def test_cpu_fp32_folds_every_batch_norm_and_runs_channels_last(lite0_pair) -> None:
    loaded, ready = lite0_pair
    norms = [m for m in loaded.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49  # every conv of lite0 is followed by one
    assert ready.channels_last
    assert not [m for m in ready.model.modules() if isinstance(m, nn.BatchNorm2d)]
    conv = next(m for m in ready.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_folded_features_equal_the_loaded_model_within_float32_rounding(lite0_pair) -> None:
    loaded, ready = lite0_pair
    images, valid_hw = _batch(loaded)
    with torch.inference_mode():
        want = loaded.encode(images, valid_hw, ["avg"])
        got = ready.encode(images, valid_hw, ["avg"])
        want_grid = loaded.encode_grid(images, valid_hw, ["avg"], 2)
        got_grid = ready.encode_grid(images, valid_hw, ["avg"], 2)
    tol = close_after_rounding(
        torch.float32, terms=efficientnet_lite0_terms(), scale=magnitude(want)
    )
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grid[0], want, **tol)
    torch.testing.assert_close(got_grid[1], want_grid[1], **tol)
    # the fold really changed the arithmetic (a no-op would pass the comparison above trivially)
    assert not torch.equal(got, want)


def test_other_precisions_and_devices_keep_the_model_as_loaded() -> None:
    cfg = BackboneConfig(name="efficientnet_lite0", img_size=64)
    for device, precision in (("cpu", "bf16"), ("meta", "fp32")):
        backbone = build_backbone(cfg)
        backbone.use_precision(torch.device(device), precision)
        assert not backbone.channels_last
        assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.model.modules())


class _NormBeforeConv(nn.Module):
    """A batch norm registered after the conv but run before it: folding by order would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_model_whose_children_run_in_another_order_is_not_folded() -> None:
    assert fold_batch_norms(_NormBeforeConv(), 16, "norm_before_conv") is None


def test_a_model_without_batch_norm_is_not_folded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    model.forward_features = model.forward
    assert fold_batch_norms(model, 16, "plain") is None
