"""Console output plus ``run.log`` (timestamped) in the run directory."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("samprobe")


def setup_console(debug: bool = False) -> None:
    if any(getattr(h, "_samprobe_console", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._samprobe_console = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def to_run_logs(level: int, message: str) -> None:
    """Write to run.log files only (the console already showed it, on stderr)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def attach_run_log(run_dir: Path) -> None:
    """Append everything printed to ``run_dir/run.log`` with timestamps (once per file)."""
    target = (run_dir / "run.log").resolve()
    for h in log.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == target:
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
