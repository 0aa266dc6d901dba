"""run.log follows the current run: one process running several runs (a notebook, the fuzz test)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from samprobe.logs import attach_run_log, log


def test_a_second_run_stops_writing_the_first_runs_log(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    attach_run_log(first)
    log.info("line of the first run")
    attach_run_log(second)
    attach_run_log(second)  # the same run again: still one handler
    log.info("line of the second run")
    shutil.rmtree(first)  # the first run's folder is gone (a temporary project)
    log.info("another line of the second run")  # must not try to reopen first/run.log
    run_logs = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    assert [Path(h.baseFilename) for h in run_logs] == [(second / "run.log").resolve()]
    text = (second / "run.log").read_text(encoding="utf-8")
    assert "line of the second run" in text and "another line" in text and "first run" not in text
    for h in run_logs:
        log.removeHandler(h)
        h.close()
