"""The run directory's shared files: preparing it for a stage, the extract failures every later
stage leaves out, and where an evaluation writes.

Layout: ``config.yaml`` (the config of the last stage run), ``run.log``, ``data_report.json``,
``bad_rows.csv``, ``splits.csv``, ``split_ledger.json`` (validate), ``extract_failures.csv``
(extract), ``checkpoints/``, ``metrics.jsonl``, ``sweep.csv`` (train), ``eval/<split>/`` (evaluate),
``inspect/`` (inspect), ``report.html``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from samprobe.config import Config, dump_config
from samprobe.data.loader import failure_kind
from samprobe.data.records import Record
from samprobe.io import atomic_open, atomic_write_text, ensure_writable_dir, remove_stale_temps
from samprobe.logs import attach_run_log

FAILURES_FILE = "extract_failures.csv"


def prepare_run_dir(cfg: Config) -> Path:
    """The run directory, writable, without a killed run's half-written files; this stage's log
    goes to its run.log and its config to config.yaml."""
    run_dir = ensure_writable_dir(cfg.run_dir, "run_dir")
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "eval"):
        remove_stale_temps(folder)  # half-written files of a killed run
    attach_run_log(run_dir)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    return run_dir


def write_failures(run_dir: Path, failures: list[tuple[Record, str]]) -> None:
    with atomic_open(run_dir / FAILURES_FILE, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "label", "kind", "detail", "sha256"])
        for r, reason in failures:
            kind, detail = failure_kind(reason)
            w.writerow([r.row, r.path, r.label, kind, f"at extract: {detail}", r.sha256])


def read_failed_keys(run_dir: Path) -> set[str]:
    """sha256 of the images the last extract could not use (content, not row numbers: rows move)."""
    path = run_dir / FAILURES_FILE
    if not path.is_file():
        return set()
    with open(path, encoding="utf-8", newline="") as f:
        return {r["sha256"] for r in csv.DictReader(f)}


def evaluation_dir(run_dir: Path, checkpoint: Path, split: str) -> tuple[Path, bool]:
    """(folder for an evaluation's outputs, whether it is the run's own best.pt, the one report.html
    shows): ``eval/<split>`` for the run's best.pt; ``eval/<split>-<checkpoint>`` for its other
    checkpoints and ``eval/<split>-<other run>-<checkpoint>`` for another run's, so no evaluation
    overwrites another."""
    ckpt = Path(checkpoint).resolve()
    own = ckpt.is_relative_to(Path(run_dir).resolve())
    if own and ckpt == (Path(run_dir) / "checkpoints" / "best.pt").resolve():
        return Path(run_dir) / "eval" / split, True
    origin = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return Path(run_dir) / "eval" / f"{split}-{'' if own else origin.name + '-'}{ckpt.stem}", False
