"""Device and compute precision: which device a process runs on, which autocast dtype it can
run, and the context that applies it. One place decides; every stage asks here.

``auto`` picks the fastest dtype that keeps SAM features faithful:
- CUDA: bf16 on compute capability >= 8.0 (Ampere and later have bf16 tensor cores), else fp16
  (with ``torch.amp.GradScaler('cuda')`` when training). ``torch.cuda.is_bf16_supported()`` is
  not the test: it is True on a T4 (7.5), which only emulates bf16 (slower than fp16).
  ``fp32`` on CUDA runs its matmuls in TF32 (resolved precision ``tf32``: same exponent range,
  10-bit mantissa inputs, 8x the fp32 tensor-core rate on A100) unless ``NVIDIA_TF32_OVERRIDE=0``
  says otherwise; ``tf32`` features are not fp32's, so it is its own fingerprint.
- CPU: bf16 where the hardware has fast bf16 matmuls (AMX), else fp32 (``cpu_precision``).
  AVX-512 BF16 alone is not enough: oneDNN's bf16 GEMM there ran at 84 GFLOP/s against fp32's
  153 (one core, [512, 1280] x [1280, 800]). fp16 is offered on CUDA only: CPU fp16 matmuls
  are emulated and slower than fp32.

Under ``torchrun`` each process uses the GPU of its ``LOCAL_RANK`` (``cuda:{LOCAL_RANK}``).
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Iterator

import torch

from samprobe.errors import ConfigError, DeviceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESOLVED = ("fp32", "tf32", "bf16", "fp16")
"""What ``resolve_precision`` returns; stored in checkpoints and part of the feature fingerprint."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CAPABILITY = (8, 0)


def local_rank() -> int | None:
    """This process's index among the processes of its node under torchrun (None: not launched so)."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def resolve_device(device: str) -> torch.device:
    """``auto|cpu|cuda`` -> the device this process runs on; under torchrun ``cuda:{LOCAL_RANK}``,
    made the current CUDA device (so every default-device allocation, NCCL and cuBLAS handle
    land on this rank's GPU, not all on cuda:0)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.device(device)
    if not torch.cuda.is_available():
        raise DeviceError("device is cuda but no CUDA GPU is visible", fix="set device: cpu (or auto)")
    rank = local_rank()
    if rank is None:
        return torch.device("cuda")  # the current device; no CUDA call here (the fingerprint paths need none)
    count = torch.cuda.device_count()
    if rank >= count:
        raise DeviceError(f"LOCAL_RANK {rank} but this node shows only {count} CUDA GPU(s)",
                          fix=f"start at most {count} processes per node (torchrun --nproc_per_node={count}), "
                              "or check CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


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


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability >= 8.0 (a T4, 7.5, emulates bf16)."""
    return cuda_capability(device) >= BF16_CAPABILITY


def tf32_allowed() -> bool:
    """TF32 for fp32 matmuls on CUDA unless the user turned it off with NVIDIA's own switch."""
    return os.environ.get("NVIDIA_TF32_OVERRIDE", "") != "0"


def cuda_precision(device: torch.device, precision: str) -> str:
    """The CUDA decision: capability -> bf16 or fp16; fp32 -> tf32 unless NVIDIA_TF32_OVERRIDE=0."""
    if precision == "fp32":
        return "tf32" if tf32_allowed() else "fp32"
    if precision == "auto":
        return "bf16" if cuda_has_fast_bf16(device) else "fp16"
    if precision == "bf16" and not cuda_has_fast_bf16(device):
        major, minor = cuda_capability(device)
        raise ConfigError(f"precision is bf16 but this GPU (compute capability {major}.{minor}) has no bf16 "
                          "tensor cores: it emulates bf16, slower than fp16",
                          fix="set precision: fp16 (or auto)")
    return precision


def cpu_precision(precision: str) -> str:
    """The CPU decision (``auto`` -> bf16 only where bf16 matmuls beat fp32)."""
    if precision == "fp16":
        raise ConfigError("precision is fp16 but the device is the CPU, which has no fast fp16",
                          fix="set precision: bf16, fp32 or auto")
    if precision == "auto":
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    return precision  # bf16 asked explicitly: runs everywhere, slower than fp32 without AMX


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto|fp32|bf16|fp16`` on ``device`` -> the concrete precision to run (one of ``RESOLVED``)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown", fix=f"choose from {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return cuda_precision(device, precision)
    if device.type == "cpu":
        return cpu_precision(precision)
    # mps and others: autocast support varies; stay exact unless asked.
    return "fp32" if precision == "auto" else precision


def runnable_precision(device: torch.device, stored: str) -> str:
    """The precision to compute features for a head trained on ``stored`` (resolved) features,
    on ``device``: the same when it runs there, else the closest that does (tf32 -> fp32 off
    CUDA; fp16 -> fp32 on the CPU, more exact than fp16 and faster than its emulation there)."""
    device = torch.device(device)
    if device.type == "cuda":  # each runs here (bf16 emulated before 8.0: slower, the same features)
        return "fp32" if stored == "tf32" and not tf32_allowed() else stored
    return "fp32" if stored in ("tf32", "fp16") else stored


def needs_grad_scaler(precision: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
    return precision == "fp16"


@contextlib.contextmanager
def _cuda_matmul_precision(tf32: bool) -> Iterator[None]:
    """fp32 matmuls and convolutions in TF32 (or not) for the block, restored after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast_context(device: torch.device, precision: str) -> ContextManager[object]:
    """``torch.autocast`` for the (resolved) precision; fp32/tf32 run without autocast, on CUDA
    with TF32 matmuls on (tf32) or off (fp32). ``auto`` is resolved here first."""
    device = torch.device(device)
    resolved = resolve_precision(device, precision) if precision == "auto" else precision
    if resolved not in RESOLVED:
        raise ConfigError(f"precision {precision!r} is unknown", fix=f"choose from {', '.join(PRECISIONS)}")
    if resolved in ("fp32", "tf32"):
        return _cuda_matmul_precision(resolved == "tf32") if device.type == "cuda" else contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[resolved])


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls take their inputs in at a resolved precision (tf32 and fp32: float32)."""
    return _DTYPES.get(precision, torch.float32)


def describe_device(device: torch.device) -> str:
    """``cuda:1 (NVIDIA H200, sm_90, 139.8 GiB)`` / ``cpu``: for logs and doctor."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
