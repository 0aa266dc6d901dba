"""Device and compute precision: which device a process runs on, which autocast dtype it can
run, and the context that applies it. One place decides; every stage asks here.

``auto`` picks the fastest dtype that keeps SAM features faithful:
- CUDA: bf16 on compute capability >= 8.0 (Ampere and later have bf16 tensor cores), else fp16
  (with ``torch.amp.GradScaler('cuda')`` when training). ``torch.cuda.is_bf16_supported()`` is
  not the test: it is True on a T4 (7.5), which only emulates bf16 (slower than fp16).
  ``fp32`` on CUDA runs its matmuls in TF32 (resolved precision ``tf32``: same exponent range,
  10-bit mantissa inputs, 8x the fp32 tensor-core rate on A100) unless ``NVIDIA_TF32_OVERRIDE=0``
  says otherwise; ``tf32`` features are not fp32's, so it is its own fingerprint.
- CPU: bf16 only where a measurement says its matrix products beat fp32's (``cpu_precision``).
  CPU flags do not tell: oneDNN's bf16 GEMM ran at half fp32's speed on one AVX-512 BF16 CPU
  (84 vs 153 GFLOP/s, one core) and at 4x on another (AMD EPYC, 403 vs 96 GFLOP/s).
  ``cpu_probe`` times both (~50 ms) once per machine and remembers the answer in the user cache.
  fp16 is offered on CUDA only: CPU fp16 matmuls are emulated and slower than fp32.

Under ``torchrun`` each process uses the GPU of its ``LOCAL_RANK`` (``cuda:{LOCAL_RANK}``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

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
        raise DeviceError(
            "device is cuda but no CUDA GPU is visible", fix="set device: cpu (or auto)"
        )
    rank = local_rank()
    if rank is None:
        # the current device; no CUDA call here (the fingerprint paths need none)
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if rank >= count:
        raise DeviceError(
            f"LOCAL_RANK {rank} but this node shows only {count} CUDA GPU(s)",
            fix=f"start at most {count} processes per node (torchrun --nproc_per_node={count}), "
            "or check CUDA_VISIBLE_DEVICES",
        )
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def is_oom(exc: BaseException) -> bool:
    """CUDA (or any allocator's) out-of-memory, whichever class torch raised it as."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


PROBE_FILE = "cpu-precision.json"
# The GEMMs that dominate samprobe's CPU time (x [M, K] @ w [N, K]^T, as F.linear runs them): a
# ViT-B block's qkv projection on 256 tokens, and the heads sweep's all-heads product (a batch of
# 512 x 1280-d features, 8 heads x 100 classes). About 2 GFLOP per dtype and round.
PROBE_SHAPES = ((256, 768, 2304), (512, 1280, 800))
# the first is a warm-up (oneDNN builds its kernels); the best of the others counts
PROBE_ROUNDS = 3
BF16_MARGIN = 1.25
"""bf16 is chosen only when it is at least this much faster: it costs fidelity, so a tie (or the
noise of a shared machine) keeps fp32."""


@dataclass(frozen=True)
class CpuProbe:
    """One measurement of fp32 against bf16 (autocast) matrix products on this CPU."""

    cpu: str
    torch: str
    fp32_gflops: float
    bf16_gflops: float
    cached: bool = False  # read from the user cache, not measured by this process

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16_gflops >= BF16_MARGIN * self.fp32_gflops else "fp32"

    def summary(self) -> str:
        return (
            f"CPU probe: bf16 {self.bf16_gflops:.0f} GFLOP/s vs fp32 {self.fp32_gflops:.0f} "
            f"GFLOP/s "
            f"(one thread) -> {self.precision}" + (" (cached)" if self.cached else "")
        )


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip() or "unknown CPU"


def _probe_key() -> tuple[str, str]:
    return cpu_model(), torch.__version__


def measure_gemm_gflops(
    shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES, rounds: int = PROBE_ROUNDS
) -> dict[str, float]:
    """GFLOP/s of ``shapes`` in fp32 and under bf16 autocast (the path extraction and training run,
    casts included) on one thread: bf16 units are per core, so the ratio is the core's, and one
    thread is not stalled by a descheduled partner (two threads on this shared 2-core machine
    measured bf16 below fp32 under load, one thread 3x above). Rounds alternate the dtypes, so a
    load spike from another process hits both alike; a dtype that cannot run scores 0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_gflops(shapes, rounds)
    finally:
        torch.set_num_threads(threads)


def _best_gflops(shapes: tuple[tuple[int, int, int], ...], rounds: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)) for m, k, n in shapes
    ]
    best = {name: [float("inf")] * len(shapes) for name in ("fp32", "bf16")}
    for _ in range(max(2, rounds)):
        for name in best:
            ctx = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if name == "bf16"
                else contextlib.nullcontext()
            )
            for i, (x, w) in enumerate(pairs):
                try:
                    with torch.inference_mode(), ctx:
                        start = time.perf_counter()
                        torch.nn.functional.linear(x, w)
                        best[name][i] = min(best[name][i], time.perf_counter() - start)
                except RuntimeError:  # no bf16 kernel on this build / CPU
                    best[name][i] = float("inf")
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return {
        name: flops / sum(times) / 1e9 if all(t < float("inf") for t in times) else 0.0
        for name, times in best.items()
    }


_PROBES: dict[tuple[str, str], CpuProbe] = {}


def cpu_probe() -> CpuProbe:
    """The fp32-vs-bf16 measurement for this machine: from this process, else from the user cache
    (``$XDG_CACHE_HOME/samprobe/cpu-precision.json``, keyed by CPU model and torch version), else
    measured now (~50 ms on a quiet machine) and stored there. Delete that file to measure again."""
    from samprobe.io import atomic_write_text, user_cache_file

    key = _probe_key()
    if key in _PROBES:
        return _PROBES[key]
    store, name = user_cache_file(PROBE_FILE), " | ".join(map(str, key))
    try:
        known = json.loads(store.read_text(encoding="utf-8")) if store else {}
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(name)
    try:
        probe = CpuProbe(
            *key, float(entry["fp32_gflops"]), float(entry["bf16_gflops"]), cached=True
        )
    except (TypeError, KeyError, ValueError):
        speeds = measure_gemm_gflops()
        probe = CpuProbe(*key, round(speeds["fp32"], 1), round(speeds["bf16"], 1))
        if store:
            record = {k: v for k, v in asdict(probe).items() if k != "cached"}
            known[name] = {**record, "precision": probe.precision}
            # a read-only home only costs the next process a probe
            with contextlib.suppress(OSError):
                atomic_write_text(store, json.dumps(known, indent=1))
    _PROBES[key] = probe
    return probe


def cpu_bf16_is_fast() -> bool:
    """The CPU side of ``precision: auto``: True when the probe measured bf16 matmuls clearly
    faster than fp32 on this machine (``cpu_probe``)."""
    return cpu_probe().precision == "bf16"


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
        raise ConfigError(
            f"precision is bf16 but this GPU (compute capability {major}.{minor}) has no bf16 "
            "tensor cores: it emulates bf16, slower than fp16",
            fix="set precision: fp16 (or auto)",
        )
    return precision


def cpu_precision(precision: str) -> str:
    """The CPU decision (``auto`` -> bf16 only where the probe measured bf16 matmuls beating fp32's)."""
    if precision == "fp16":
        raise ConfigError(
            "precision is fp16 but the device is the CPU, which has no fast fp16",
            fix="set precision: bf16, fp32 or auto",
        )
    if precision == "auto":
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    return precision  # bf16 asked explicitly: runs everywhere, even where the probe finds it slower than fp32


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto|fp32|bf16|fp16`` on ``device`` -> the concrete precision to run (one of ``RESOLVED``)."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is unknown", fix=f"choose from {', '.join(PRECISIONS)}"
        )
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
    # each runs here (bf16 emulated before 8.0: slower, the same features)
    if device.type == "cuda":
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


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """``torch.autocast`` for the (resolved) precision; fp32/tf32 run without autocast, on CUDA
    with TF32 matmuls on (tf32) or off (fp32). ``auto`` is resolved here first."""
    device = torch.device(device)
    resolved = resolve_precision(device, precision) if precision == "auto" else precision
    if resolved not in RESOLVED:
        raise ConfigError(
            f"precision {precision!r} is unknown", fix=f"choose from {', '.join(PRECISIONS)}"
        )
    if resolved in ("fp32", "tf32"):
        return (
            _cuda_matmul_precision(resolved == "tf32")
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
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
