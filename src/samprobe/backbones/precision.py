"""Compute precision: which autocast dtype a device can run, and the context that applies it.

``auto`` picks the fastest dtype that keeps SAM features faithful: bf16 where the hardware has
fast bf16 matmuls (recent CUDA GPUs, CPUs with AMX), else fp32. AVX-512 BF16 alone is not
enough: oneDNN's bf16 GEMM there ran at 84 GFLOP/s against fp32's 153 (one core, [512, 1280]
x [1280, 800]). fp16 is
offered on CUDA only: CPU fp16 matmuls are emulated and slower than fp32.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from samprobe.errors import ConfigError, DeviceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device is cuda but no CUDA GPU is visible", fix="set device: cpu (or auto)")
    return torch.device(device)


def is_oom(exc: BaseException) -> bool:
    """CUDA (or any allocator's) out-of-memory, whichever class torch raised it as."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def cpu_bf16_is_fast() -> bool:
    """True when bf16 matmuls beat fp32 on this CPU: oneDNN with AMX tiles."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_supports_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto|fp32|bf16|fp16`` on ``device`` -> the concrete ``fp32|bf16|fp16`` to run."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown", fix=f"choose from {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if cuda_supports_bf16(device) else "fp16"
        if precision == "bf16" and not cuda_supports_bf16(device):
            raise ConfigError("precision is bf16 but this GPU has no bf16 support",
                              fix="set precision: fp16 (or auto)")
        return precision
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("precision is fp16 but the device is the CPU, which has no fast fp16",
                              fix="set precision: bf16, fp32 or auto")
        if precision == "auto":
            return "bf16" if cpu_bf16_is_fast() else "fp32"
        return "bf16"  # asked explicitly: runs everywhere, slower than fp32 without AMX
    # mps and others: autocast support varies; stay exact unless asked.
    return "fp32" if precision == "auto" else precision


def autocast_context(device: torch.device, precision: str) -> ContextManager[object]:
    """``torch.autocast`` for the resolved precision, or a no-op context for fp32."""
    device = torch.device(device)
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[resolved])
