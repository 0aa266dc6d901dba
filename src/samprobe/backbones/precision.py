"""Compute precision: which autocast dtype a device can run, and the context that applies it.

``auto`` picks the fastest dtype that keeps SAM features faithful: bf16 on recent CUDA GPUs; on
the CPU, bf16 only where a measurement says its matrix products beat fp32's. CPU flags do not
tell: oneDNN's bf16 GEMM ran at half fp32's speed on one AVX-512 BF16 CPU (84 vs 153 GFLOP/s,
one core) and at 4x on another (AMD EPYC, 403 vs 96 GFLOP/s). ``cpu_probe`` times both (~50 ms)
once per machine and remembers the answer in the user cache. fp16 is offered on CUDA only: CPU
fp16 matmuls are emulated and slower than fp32.
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import asdict, dataclass
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


PROBE_FILE = "cpu-precision.json"
# The GEMMs that dominate samprobe's CPU time (x [M, K] @ w [N, K]^T, as F.linear runs them): a
# ViT-B block's qkv projection on 256 tokens, and the heads sweep's all-heads product (a batch of
# 512 x 1280-d features, 8 heads x 100 classes). About 2 GFLOP per dtype and round.
PROBE_SHAPES = ((256, 768, 2304), (512, 1280, 800))
PROBE_ROUNDS = 3  # the first is a warm-up (oneDNN builds its kernels); the best of the others counts
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
        return (f"CPU probe: bf16 {self.bf16_gflops:.0f} GFLOP/s vs fp32 {self.fp32_gflops:.0f} GFLOP/s "
                f"(one thread) -> {self.precision}" + (" (cached)" if self.cached else ""))


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


def measure_gemm_gflops(shapes: tuple[tuple[int, int, int], ...] = PROBE_SHAPES,
                        rounds: int = PROBE_ROUNDS) -> dict[str, float]:
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
    pairs = [(torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)) for m, k, n in shapes]
    best = {name: [float("inf")] * len(shapes) for name in ("fp32", "bf16")}
    for _ in range(max(2, rounds)):
        for name in best:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()
            for i, (x, w) in enumerate(pairs):
                try:
                    with torch.inference_mode(), ctx:
                        start = time.perf_counter()
                        torch.nn.functional.linear(x, w)
                        best[name][i] = min(best[name][i], time.perf_counter() - start)
                except RuntimeError:  # no bf16 kernel on this build / CPU
                    best[name][i] = float("inf")
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return {name: flops / sum(times) / 1e9 if all(t < float("inf") for t in times) else 0.0
            for name, times in best.items()}


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
        probe = CpuProbe(*key, float(entry["fp32_gflops"]), float(entry["bf16_gflops"]), cached=True)
    except (TypeError, KeyError, ValueError):
        speeds = measure_gemm_gflops()
        probe = CpuProbe(*key, round(speeds["fp32"], 1), round(speeds["bf16"], 1))
        if store:
            record = {k: v for k, v in asdict(probe).items() if k != "cached"}
            known[name] = {**record, "precision": probe.precision}
            with contextlib.suppress(OSError):  # a read-only home only costs the next process a probe
                atomic_write_text(store, json.dumps(known, indent=1))
    _PROBES[key] = probe
    return probe


def cpu_bf16_is_fast() -> bool:
    """The CPU side of ``precision: auto``: True when the probe measured bf16 matmuls clearly
    faster than fp32 on this machine (``cpu_probe``)."""
    return cpu_probe().precision == "bf16"


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
        return "bf16"  # asked explicitly: runs everywhere, even where the probe finds it slower than fp32
    # mps and others: autocast support varies; stay exact unless asked.
    return "fp32" if precision == "auto" else precision


def autocast_context(device: torch.device, precision: str) -> ContextManager[object]:
    """``torch.autocast`` for the resolved precision, or a no-op context for fp32."""
    device = torch.device(device)
    resolved = resolve_precision(device, precision)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[resolved])
