"""``samprobe doctor``: everything that would stop a long run, checked in seconds."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from samprobe.errors import SamprobeError

log = logging.getLogger("samprobe")


def run_doctor(config: str, overrides: list[str]) -> int:
    from samprobe.config import load_config
    from samprobe.data.metadata import read_rows
    from samprobe.features.cache import ensure_writable_dir, estimate_bytes

    failures = 0
    cfg = None

    def check(name: str, fn: Callable[[], str]) -> None:
        nonlocal failures
        try:
            detail = fn()
            log.info(f"  ok    {name}: {detail}")
        except SamprobeError as exc:
            failures += 1
            log.info(f"  FAIL  {name}: {exc.message}" + (f" -> fix: {exc.fix}" if exc.fix else ""))

    log.info(f"samprobe doctor {config}")

    def _config() -> str:
        nonlocal cfg
        cfg = load_config(config, overrides)
        return "valid"

    check("config", _config)
    if cfg is None:
        return 2
    rows: list = []

    def _metadata() -> str:
        rows.extend(read_rows(cfg.data)[0])
        return f"{len(rows)} rows in {cfg.data.metadata or cfg.data.image_root}"

    def _image_root() -> str:
        root = cfg.data.image_root or (Path(cfg.data.metadata).parent if cfg.data.metadata else None)
        if root is None or not Path(root).is_dir():
            raise SamprobeError(f"data.image_root {root} is not a folder", fix="set data.image_root to the folder the metadata paths are relative to")
        return str(root)

    def _run_dir() -> str:
        return f"{ensure_writable_dir(cfg.run_dir, 'run_dir')} writable"

    def _cache() -> str:
        path = ensure_writable_dir(cfg.features.cache_dir, "features.cache_dir")
        free = shutil.disk_usage(path).free
        need = 2 * estimate_bytes(max(len(rows), 1), 1280, cfg.features.dtype)  # generous dim, x2 headroom
        if free < need:
            raise SamprobeError(f"only {free / 1e9:.2f} GB free at {path}, about {need / 1e9:.2f} GB needed",
                                fix="free disk space or move features.cache_dir")
        return f"{path} writable, {free / 1e9:.1f} GB free (needs ~{need / 1e6:.0f} MB)"

    def _backbone() -> str:
        from samprobe.features.extract import Extractor

        ex = Extractor.from_config(cfg)
        return (f"{cfg.backbone.name} loads, input {ex.backbone.input_size}px, features {'+'.join(ex.pooling)} = {ex.dim}-d, "
                f"device {ex.device}, precision {ex.precision}")

    check("metadata", _metadata)
    check("image root", _image_root)
    check("run directory", _run_dir)
    check("feature cache", _cache)
    check("backbone", _backbone)
    log.info("doctor: " + ("all checks passed" if not failures else f"{failures} problem(s) block a run"))
    return 2 if failures else 0
