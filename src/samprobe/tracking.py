"""Experiment tracking through one ``Tracker``: ``metrics.jsonl`` always, Weights & Biases optionally.

``metrics.jsonl`` in the run directory is the source of truth: one JSON line per epoch,
flushed and fsynced as each epoch ends, so a killed run keeps every finished epoch.
W&B (``tracking.wandb.mode``) is a mirror and must never stop training:

- ``online``: a bounded TCP connect to the W&B host first (3 s), then ``wandb.init`` with
  ``init_timeout``; if either fails the run goes on in ``offline`` mode and the exact
  ``wandb sync <dir>`` command is printed (at start and at the end).
- ``offline``: everything is written under ``<run_dir>/wandb/``; sync it later.
- any wandb error after start disables the mirror with one warning; metrics.jsonl goes on.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from samprobe.config import Config

log = logging.getLogger("samprobe")

DEFAULT_WANDB_URL = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 3.0


def wandb_base_url() -> str:
    """The W&B server the client will talk to (``WANDB_BASE_URL`` or the public cloud)."""
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL


def tcp_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host:port opens within ``timeout``; else why not."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} is not a URL"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[str | None] = []

    def _connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:  # refused, unreachable, DNS failure, timeout
            result.append(f"cannot connect to {host}:{port} ({exc.strerror or type(exc).__name__})")

    # The socket timeout does not cover DNS resolution (getaddrinfo), which can hang without a
    # network: a daemon thread bounds the whole attempt.
    worker = threading.Thread(target=_connect, name="samprobe-tcp-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        return f"no answer from {host}:{port} within {timeout:.0f} s"
    return result[0]


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and push it to disk now: a kill after this keeps the row."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


class Tracker:
    """Per-run tracking. ``log_epoch`` writes metrics.jsonl first, then mirrors to wandb."""

    METRICS_FILE = "metrics.jsonl"

    def __init__(self, cfg: Config, run_dir: Path | None = None, fresh: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.run_dir)
        self.metrics_file = self.run_dir / self.METRICS_FILE
        if fresh:
            self.metrics_file.unlink(missing_ok=True)
        self.requested_mode = cfg.tracking.wandb.mode
        self.mode = "disabled"  # what wandb actually runs as
        self.fallback_reason: str | None = None
        self.fallback_seconds: float | None = None
        self.sync_command: str | None = None
        self._wandb: Any = None
        self._run: Any = None

    # ---- lifecycle ------------------------------------------------------------------

    def start(self, extra_config: dict[str, Any] | None = None) -> Tracker:
        if self.requested_mode == "disabled":
            return self
        try:
            import wandb
        except ImportError:
            log.warning(
                "tracking: wandb is not installed; metrics go to metrics.jsonl only (pip install "
                "'samprobe[wandb]')"
            )
            return self
        self._wandb = wandb
        config = {**self.cfg.model_dump(mode="json"), **(extra_config or {})}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.requested_mode == "online":
            started = time.perf_counter()
            self._run = self._init_online(config)
            if self._run is None:
                self.fallback_seconds = time.perf_counter() - started
                log.warning(
                    f"tracking: wandb online unavailable ({self.fallback_reason}); "
                    f"falling back to offline after {self.fallback_seconds:.1f} s, training goes on"
                )
        if self._run is None:
            self._run = self._init("offline", config)
        if self._run is not None and self.mode == "offline":
            self.sync_command = f"wandb sync {self._run.settings.sync_dir}"
            log.info(
                f"tracking: wandb offline run in {self._run.settings.sync_dir}; upload later "
                f"with: {self.sync_command}"
            )
        return self

    def _init_online(self, config: dict[str, Any]) -> Any:
        url = wandb_base_url()
        reason = tcp_reachable(url)
        if reason is not None:
            self.fallback_reason = f"{url}: {reason}"
            return None
        run = self._init("online", config)
        if run is None and self.fallback_reason is None:
            self.fallback_reason = "wandb.init failed"
        return run

    def _init(self, mode: str, config: dict[str, Any]) -> Any:
        wandb = self._wandb
        try:
            settings = wandb.Settings(
                init_timeout=self.cfg.tracking.wandb.init_timeout_s, silent=True, console="off"
            )
            run = wandb.init(
                project=self.cfg.tracking.wandb.project,
                name=self.run_dir.name,
                dir=str(self.run_dir),
                config=config,
                mode=mode,
                settings=settings,
                reinit="finish_previous",
            )
        except Exception as exc:  # CommError, UsageError, timeouts: never fatal for training
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if mode == "offline":
                log.warning(
                    f"tracking: wandb offline init failed ({self.fallback_reason}); metrics.jsonl "
                    f"only"
                )
            return None
        self.mode = mode
        return run

    def finish(self) -> None:
        if self._run is None:
            return
        self._safe(lambda run: run.finish())
        self._run = None
        if self.sync_command:
            log.info(f"tracking: to upload this run to W&B: {self.sync_command}")

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.finish()

    # ---- logging --------------------------------------------------------------------

    def _safe(self, fn: Callable[[Any], None]) -> None:
        """Run a wandb call; on any error warn once and stop mirroring (metrics.jsonl is unaffected)."""
        if self._run is None:
            return
        try:
            fn(self._run)
        except Exception as exc:
            log.warning(
                f"tracking: wandb call failed ({type(exc).__name__}: {exc}); W&B mirroring "
                f"stopped, {self.metrics_file} still has every epoch"
            )
            run, self._run = self._run, None
            with contextlib.suppress(Exception):  # already broken; nothing more to do
                run.finish(exit_code=1)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's metrics: metrics.jsonl (flushed now) and wandb history."""
        append_jsonl(self.metrics_file, row)
        self._safe(
            lambda run: run.log(
                {k: v for k, v in row.items() if k != "epoch"} | {"epoch": row["epoch"]}
            )
        )

    def log_config(self, values: dict[str, Any]) -> None:
        self._safe(lambda run: run.config.update(values, allow_val_change=True))

    def log_summary(self, metrics: dict[str, Any]) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        self._safe(lambda run: run.summary.update(flat))

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])

        def _log(run: Any) -> None:
            table = self._wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in rows]
            )
            run.log({name: table})

        self._safe(_log)

    def log_images(self, images: dict[str, Path]) -> None:
        present = {k: p for k, p in images.items() if Path(p).is_file()}
        if present:
            self._safe(
                lambda run: run.log({k: self._wandb.Image(str(p)) for k, p in present.items()})
            )
