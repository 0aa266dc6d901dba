"""``samprobe doctor``: everything that would stop a long run, checked in seconds.

Each check prints one line: ``ok``, ``WARN`` (the run works but not as configured, e.g. W&B
falls back to offline) or ``FAIL`` (the run would stop: exit 2). A check that needs an earlier
one (the image sample needs the metadata) is skipped with a line saying so.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samprobe.errors import DataError, DeviceError, SamprobeError, plain_text

SAMPLE_IMAGES = 16
HEADROOM = 1.5  # shard rounding, and a second fingerprint while experimenting
NVIDIA_PROC = Path("/proc/driver/nvidia")  # present when the NVIDIA kernel driver is loaded
SHM = Path("/dev/shm")  # where DataLoader workers hand batches to the main process


@dataclass
class Check:
    name: str
    status: str  # ok | WARN | FAIL | skip
    detail: str

    def line(self) -> str:
        return f"  {self.status:<5} {self.name}: {self.detail}"


class Warn(Exception):
    """A problem that does not block a run (the run adapts), raised by a check."""


def _one_line(text: str, limit: int = 300) -> str:
    """One line per check: a wrapped library message (torch.load's is a page long) is cut, marked with '...'."""
    lines = plain_text(text).strip().splitlines() or [""]
    first = lines[0]
    cut = len(lines) > 1 or len(first) > limit
    return first[:limit] + " ...)" if cut else first


def nvidia_driver() -> tuple[str, int] | None:
    """(driver version, GPUs the kernel driver sees) when an NVIDIA driver is loaded, else None.
    Read from /proc, not through torch: it must say so when torch cannot see the GPU."""
    version = NVIDIA_PROC / "version"
    if not version.is_file():
        return None
    match = re.search(
        r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", version.read_text(errors="replace")
    )
    gpus = NVIDIA_PROC / "gpus"
    return (
        match.group(1) if match else "of unknown version",
        sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0,
    )


def gpu_report(device: str) -> str:
    """One line on the GPUs torch can use (name, capability, memory, driver and CUDA versions, the
    GPU of this torchrun rank); Warn when an NVIDIA GPU is present but torch cannot use it."""
    import torch

    from samprobe.device import describe_device, local_rank

    driver = nvidia_driver()
    if torch.cuda.is_available():
        gpus = [describe_device(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
        rank = local_rank()
        mine = "" if rank is None else f"; LOCAL_RANK {rank} uses cuda:{rank}"
        return (
            f"{len(gpus)} GPU(s): {', '.join(gpus)}; driver {driver[0] if driver else 'unknown'}, "
            f"torch built for CUDA {torch.version.cuda}{mine}"
        )
    if driver is None:
        return "no NVIDIA GPU (runs on the CPU)"
    version, count = driver
    if torch.version.cuda is None:
        why = "this torch build is CPU-only (install a CUDA build of torch)"
    else:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (
            f"CUDA_VISIBLE_DEVICES={hidden!r} hides them"
            if hidden is not None and not hidden.strip(", ")
            else f"torch is built for CUDA {torch.version.cuda}: driver {version} may be too old "
            f"for it, or the device files are not accessible (containers: --gpus all)"
        )
    fallback = "device: auto runs on the CPU" if device == "auto" else f"device: {device}"
    raise Warn(
        f"an NVIDIA GPU is present ({count} GPU(s), driver {version}) but torch cannot use it: "
        f"{why}; {fallback}"
    )


def _image_root(cfg: Any) -> Path | None:
    if cfg.data.image_root is not None:
        return Path(cfg.data.image_root)
    return Path(cfg.data.metadata).parent if cfg.data.metadata else None


def doctor_checks(config: str | Path, overrides: list[str]) -> list[Check]:
    from samprobe.config import load_config

    checks: list[Check] = []
    state: dict[str, Any] = {}

    def check(name: str, fn: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        missing = [n for n in needs if n not in state]
        if missing:
            checks.append(Check(name, "skip", f"needs {', '.join(missing)} to pass first"))
            return False
        try:
            checks.append(Check(name, "ok", fn()))
            state[name] = True
            return True
        except Warn as exc:
            checks.append(Check(name, "WARN", str(exc)))
            state[name] = True
            return True
        except SamprobeError as exc:
            checks.append(
                Check(
                    name,
                    "FAIL",
                    f"[{exc.code}] {_one_line(exc.message)}"
                    + (f" -> fix: {exc.fix}" if exc.fix else ""),
                )
            )
            return False
        except Exception as exc:  # a doctor must report, not crash
            checks.append(Check(name, "FAIL", f"{type(exc).__name__}: {_one_line(str(exc))}"))
            return False

    def _config() -> str:
        state["cfg"] = load_config(config, overrides)
        return f"{config} is valid"

    if not check("config", _config):
        return checks
    cfg = state["cfg"]

    def _image_root_check() -> str:
        from samprobe.data.tables import check_data_source

        check_data_source(cfg.data)
        root = _image_root(cfg)
        if root is None or not root.is_dir():
            raise DataError(
                f"data.image_root {root} is not a folder",
                fix="set data.image_root to the folder the metadata paths are relative to",
            )
        return str(root)

    def _metadata() -> str:
        from samprobe.data.tables import read_rows

        rows = [r for r in read_rows(cfg.data)[0] if r is not None]
        if not rows:
            raise DataError(
                f"{cfg.data.metadata or cfg.data.image_root} has no rows",
                fix="add one row per image",
            )
        state["rows"] = rows
        return f"{len(rows)} rows in {cfg.data.metadata or cfg.data.image_root}"

    def _images() -> str:
        from samprobe.data.images import decode_rgb
        from samprobe.data.validate import image_path

        rows, root = state["rows"], _image_root(cfg)
        sample = random.Random(cfg.seed).sample(rows, min(SAMPLE_IMAGES, len(rows)))
        bad: list[str] = []
        for row in sample:
            rel = str(row.get(cfg.data.path_column) or "")
            path = image_path(root, rel)
            try:
                decode_rgb(path, target_longest=64, max_pixels=cfg.data.max_pixels)
            except Exception as exc:  # missing, truncated, not an image
                bad.append(f"{rel} ({type(exc).__name__})")
        if len(bad) == len(sample):
            raise DataError(
                f"none of {len(sample)} sampled images could be read, e.g. {bad[0]}",
                fix=f"check data.image_root ({root}) and data.path_column "
                f"({cfg.data.path_column!r})",
            )
        if bad:
            raise Warn(
                f"{len(sample) - len(bad)} of {len(sample)} sampled images readable; unreadable: "
                f"{', '.join(bad[:3])} (validate will report and skip such rows)"
            )
        return f"{len(sample)} of {len(sample)} sampled images decode"

    def _run_dir() -> str:
        from samprobe.io import ensure_writable_dir

        return f"{ensure_writable_dir(cfg.run_dir, 'run_dir')} writable"

    def _cache_dir() -> str:
        from samprobe.io import ensure_writable_dir

        return f"{ensure_writable_dir(cfg.features.cache_dir, 'features.cache_dir')} writable"

    def _device() -> str:
        from samprobe.device import (
            cpu_probe,
            describe_device,
            resolve_device,
            resolve_precision,
        )

        device = resolve_device(cfg.device)
        precision = resolve_precision(device, cfg.precision)
        state["device"] = device
        # why auto chose, and what bf16 would give
        probe = f"; {cpu_probe().summary()}" if device.type == "cpu" else ""
        return f"device {describe_device(device)}, precision {precision} (precision: {cfg.precision}){probe}"

    def _gpu() -> str:
        return gpu_report(cfg.device)

    def _shared_memory() -> str:
        from samprobe.data.loader import PREFETCH_BATCHES

        workers = cfg.resolved_num_workers()
        batch = cfg.features.batch_size
        workers = min(workers, -(-len(state["rows"]) // batch))  # as make_loader caps them
        if workers == 0:
            return "not used (features.num_workers 0: decoding in the main process)"
        if not SHM.is_dir():
            return f"{SHM} does not exist on this system; workers pass batches another way"
        size = state.get("input_size", 1024)
        need = workers * PREFETCH_BATCHES * batch * 3 * size * size  # uint8 letterboxed batches
        free = shutil.disk_usage(SHM).free
        if free < need:
            raise DeviceError(
                f"{SHM} has {free / 1e6:.1f} MB free but {workers} workers x {PREFETCH_BATCHES} "
                f"prefetched batches of {batch} images at {size}px need {need / 1e6:.1f} MB",
                fix="lower features.num_workers or features.batch_size, or give the container more "
                "shared memory (docker run --shm-size=8g)",
            )
        return f"{free / 1e9:.1f} GB free in {SHM}, prefetch needs {need / 1e6:.0f} MB ({workers} workers)"

    def _backbone() -> str:
        from samprobe.backbones.registry import build_backbone

        # reads the checkpoint, checks its geometry against the variant
        backbone = build_backbone(cfg.backbone)
        pooling = backbone.resolve_pooling(cfg.features.pooling)
        state["input_size"] = backbone.input_size
        state["dim"] = backbone.pooled_dim(pooling)
        grid = ""
        if cfg.features.spatial:
            backbone.check_spatial(cfg.features.spatial)
            channels = backbone.grid_shape()[0]
            state["grid_dim"] = cfg.features.spatial**2 * channels
            grid = f" + {cfg.features.spatial}x{cfg.features.spatial} grid of {channels}-d tokens"
        source = cfg.backbone.checkpoint or "bundled weights"
        if backbone.found:  # what the file was found to hold: family and geometry
            source = f"{source} ({backbone.found})"
        offered = ", ".join(
            n + (f"[@1..{f.layers}]" if f.layers else "") for n, f in backbone.features().items()
        )
        return (
            f"{cfg.backbone.name} from {source}: input {backbone.input_size}px, "
            f"features {'+'.join(pooling)} = {state['dim']}-d{grid} (offered: {offered})"
        )

    def _disk() -> str:
        from samprobe.features.cache import check_free_space, estimate_bytes

        known = "dim" in state  # the backbone check passed and read the real widths
        dim = state.get("dim", 1280)  # unknown backbone: the largest SAM block width
        n = max(len(state["rows"]), 1)
        spatial = cfg.features.spatial
        # unknown backbone: SAM's 256-channel neck
        grid_dim = state.get("grid_dim", (spatial or 0) ** 2 * 256)
        # the figure extract prints (same formula), for every row; free space is checked with
        # headroom
        need = estimate_bytes(n, dim, cfg.features.dtype) + (
            estimate_bytes(n, grid_dim, cfg.features.dtype) if spatial else 0
        )
        free = check_free_space(cfg.features.cache_dir, int(HEADROOM * need))
        grid = f" + {spatial}x{spatial} grid = {grid_dim} values" if spatial else ""
        sizes = (
            f"{len(state['rows'])} images x {dim}-d{grid} {cfg.features.dtype}"
            if known
            else f"{len(state['rows'])} images, assuming {dim}-d{grid} {cfg.features.dtype}: "
            "the backbone check failed, so the real width is unknown"
        )
        return (
            f"{free / 1e9:.1f} GB free, cache needs about {need / 1e6:.1f} MB ({sizes}; "
            f"{HEADROOM:g}x that is kept free for a second fingerprint)"
        )

    def _tracker() -> str:
        from samprobe.tracking import tcp_reachable, wandb_base_url

        mode = cfg.tracking.wandb.mode
        if mode == "disabled":
            return "W&B disabled; metrics.jsonl only"
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise Warn(
                f"tracking.wandb.mode is {mode} but wandb is not installed: metrics.jsonl only "
                "(pip install 'samprobe[wandb]')"
            ) from None
        if mode == "offline":
            return f"W&B offline: runs go to {cfg.run_dir / 'wandb'}; upload with `wandb sync`"
        url = wandb_base_url()
        reason = tcp_reachable(url)
        if reason is not None:
            raise Warn(
                f"W&B server {url} unreachable ({reason}): training will fall back to offline and "
                f"print the `wandb sync` command"
            )
        return f"W&B server {url} reachable"

    check("image root", _image_root_check)
    check("metadata", _metadata)
    check("image sample", _images, needs=("metadata", "image root"))
    check("run directory", _run_dir)
    check("feature cache directory", _cache_dir)
    check("device and precision", _device)
    check("GPU", _gpu)
    check("backbone checkpoint", _backbone)
    check("shared memory", _shared_memory, needs=("metadata",))
    check("free disk", _disk, needs=("metadata", "feature cache directory"))
    check("tracker", _tracker)
    return checks


def run_doctor(config: str | Path, overrides: list[str]) -> int:
    """Print the checklist on stdout; 0 when nothing blocks a run, 2 otherwise."""
    print(f"samprobe doctor {config}", flush=True)
    checks = doctor_checks(config, overrides)
    for c in checks:
        print(c.line(), flush=True)
    failed = [c.name for c in checks if c.status == "FAIL"]
    warned = [c.name for c in checks if c.status == "WARN"]
    if failed:
        print(f"doctor: {len(failed)} problem(s) block a run: {', '.join(failed)}", flush=True)
        return 2
    print(
        "doctor: all checks passed"
        + (f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""),
        flush=True,
    )
    return 0
