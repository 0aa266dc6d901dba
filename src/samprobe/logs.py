"""Console output plus ``run.log`` (timestamped) in the run directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("samprobe")


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a record is emitted, not when the handler was
    made: ``main`` called twice in one process (tests, notebooks) under redirected output."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stdout

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_console(debug: bool = False) -> None:
    if any(getattr(h, "_samprobe_console", False) for h in log.handlers):
        return
    handler = _StdoutHandler()
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
    """Append everything printed to ``run_dir/run.log`` with timestamps. One run log at a time: a
    process (a notebook, a test session) that goes on to another run stops writing the previous
    run's log, which may be gone by then."""
    target = (run_dir / "run.log").resolve()
    for h in list(log.handlers):
        if getattr(h, "_samprobe_run_log", False):
            if Path(h.baseFilename) == target:
                return
            log.removeHandler(h)
            h.close()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler._samprobe_run_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def count_of(n: int, noun: str) -> str:
    """``3 heads``, ``1 head``, ``2 active classes``: a count with its noun in the right number."""
    plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n} {noun if n == 1 else plural}"
