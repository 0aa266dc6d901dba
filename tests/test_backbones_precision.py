"""Precision resolution and the autocast context."""
from __future__ import annotations

import pytest
import torch

from samprobe.backbones import precision
from samprobe.backbones.precision import autocast_context, resolve_precision
from samprobe.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_resolution(monkeypatch, fast_bf16):
    # auto takes bf16 only where it is faster than fp32 (AMX); explicit choices are kept.
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast_bf16)
    assert resolve_precision(CPU, "fp32") == "fp32"
    assert resolve_precision(CPU, "bf16") == "bf16"
    assert resolve_precision(CPU, "auto") == ("bf16" if fast_bf16 else "fp32")


def test_cpu_bf16_is_fast_means_amx():
    assert precision.cpu_bf16_is_fast() == torch.cpu._is_amx_tile_supported()


@pytest.mark.parametrize("bad", ["fp16", "int8"])
def test_cpu_rejects(bad):
    with pytest.raises(ConfigError, match=bad):
        resolve_precision(CPU, bad)


def test_autocast_context():
    with autocast_context(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
