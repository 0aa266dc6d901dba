"""Tracking: metrics.jsonl always; real wandb client falling back from online to offline."""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from helpers.digits_run import write_digits_project
from samprobe.config import load_config
from samprobe.tracking import Tracker, read_jsonl, tcp_reachable

wandb = pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb file: wandb's LevelDB-log framing (32 KiB blocks, 7-byte chunk headers)
    around its own protobuf ``Record`` messages, parsed with wandb's protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb datastore file"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        # FULL/FIRST start a record; MIDDLE/LAST extend it
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _records(run_dir: Path, kind: str) -> list[dict]:
    # a failed online attempt may leave its own run-* folder
    files = list(run_dir.glob("offline-run-*/*.wandb"))
    assert len(files) == 1, files
    # wandb-core writes the file from its own process and may still be flushing when finish()
    # returns: wait (bounded) for the final "exit" record before reading.
    deadline = time.monotonic() + 10
    records = read_wandb_records(files[0])
    while (
        not any(r.WhichOneof("record_type") == "exit" for r in records)
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
        records = read_wandb_records(files[0])
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == kind:
            items = rec.history.item if kind == "history" else rec.summary.update
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}
            )
    return rows


def wandb_history(run_dir: Path) -> list[dict]:
    return _records(run_dir, "history")


def wandb_summary(run_dir: Path) -> dict:
    out: dict = {}
    for update in _records(run_dir, "summary"):
        out.update(update)
    return out


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured():
    handler = Lines()
    logger = logging.getLogger("samprobe")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    # dummy, 40 chars
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.slow
def test_training_with_wandb_online_unreachable_falls_back_to_offline(
    tmp_path, wandb_env, captured
):
    from samprobe.pipeline import run_extract, run_train, run_validate

    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    cfg = load_config(write_digits_project(tmp_path, epochs=4), ["tracking.wandb.mode=online"])
    run_validate(cfg, progress=False)
    run_extract(cfg, progress=False)

    started = time.perf_counter()
    trained = run_train(cfg)
    train_seconds = time.perf_counter() - started

    run_dir = cfg.run_dir
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert trained["best_epoch"] in {1, 2, 3, 4}
    # fell back, and fast: the whole training (wandb start included) stays far below 30 s
    fallback = [ln for ln in captured if "falling back to offline after" in ln]
    assert len(fallback) == 1, captured
    seconds = float(fallback[0].split("falling back to offline after ")[1].split(" s")[0])
    print(
        f"\nwandb online->offline fallback {seconds:.2f} s; run_train (wandb start and finish "
        f"included) {train_seconds:.2f} s"
    )
    assert seconds <= 30.0
    assert train_seconds <= 30.0
    # the offline run lives inside the run directory and holds every epoch's metrics
    history = [h for h in wandb_history(run_dir / "wandb") if "epoch" in h]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for mine, theirs in zip(epochs, history):
        assert theirs["train_loss"] == pytest.approx(mine["train_loss"])
        assert theirs["val_balanced_accuracy"] == pytest.approx(mine["val_balanced_accuracy"])
    # the exact sync command, pointing at that folder, was printed
    sync = [ln for ln in captured if "wandb sync " in ln]
    assert sync, captured
    sync_dir = Path(sync[-1].split("wandb sync ")[1].strip())
    assert sync_dir.is_dir() and sync_dir.parent == run_dir / "wandb"
    assert list(sync_dir.glob("*.wandb"))
    summary = wandb_summary(run_dir / "wandb")
    assert summary["best_epoch"] == trained["best_epoch"]
    assert summary["best/val_balanced_accuracy"] == pytest.approx(
        trained["metrics"]["val_balanced_accuracy"]
    )


@pytest.mark.slow
def test_wandb_server_that_never_answers_falls_back_within_init_timeout(
    tmp_path, wandb_env, captured
):
    """The port accepts TCP connections but never replies: the preflight passes, wandb.init itself times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        cfg = load_config(
            write_digits_project(tmp_path, per_class=2),
            ["tracking.wandb.mode=online", "tracking.wandb.init_timeout_s=1"],
        )
        cfg.run_dir.mkdir(parents=True)
        started = time.perf_counter()
        tracker = Tracker(cfg).start()
        elapsed = time.perf_counter() - started
        print(f"\nsilent server: Tracker.start (failed online init + offline init) {elapsed:.2f} s")
        assert tracker.mode == "offline" and tracker.requested_mode == "online"
        # the preflight passed: wandb.init itself failed
        assert "cannot connect" not in tracker.fallback_reason
        assert "Error" in tracker.fallback_reason, tracker.fallback_reason
        assert elapsed <= 30.0
        tracker.log_epoch({"epoch": 1, "train_loss": 0.5})
        tracker.log_epoch({"epoch": 2, "train_loss": 0.25})
        tracker.finish()
    finally:
        listener.close()
    assert [r["train_loss"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")] == [0.5, 0.25]
    assert [h["train_loss"] for h in wandb_history(cfg.run_dir / "wandb") if "train_loss" in h] == [
        0.5,
        0.25,
    ], captured
    assert any("wandb sync " in ln for ln in captured)


def test_disabled_mode_writes_only_metrics_jsonl_and_survives_a_torn_line(tmp_path):
    cfg = load_config(write_digits_project(tmp_path, per_class=1))
    cfg.run_dir.mkdir(parents=True)
    tracker = Tracker(cfg).start()
    tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_')  # a kill mid-write
    assert [r["epoch"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")] == [1]
    tracker.finish()
    assert tracker.mode == "disabled" and tracker.sync_command is None
    assert not (cfg.run_dir / "wandb").exists()


@pytest.mark.slow
def test_a_failing_wandb_call_stops_mirroring_but_not_metrics(tmp_path, wandb_env):
    cfg = load_config(write_digits_project(tmp_path, per_class=1), ["tracking.wandb.mode=offline"])
    cfg.run_dir.mkdir(parents=True)
    tracker = Tracker(cfg).start()
    assert tracker.mode == "offline"
    tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
    # the wandb process dies
    tracker._run.log = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    tracker.log_epoch({"epoch": 2, "train_loss": 0.5})  # must not raise
    tracker.log_epoch({"epoch": 3, "train_loss": 0.25})
    tracker.finish()
    assert [r["epoch"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_tcp_reachable_is_bounded_and_names_the_host():
    started = time.perf_counter()
    reason = tcp_reachable(f"http://127.0.0.1:{closed_port()}", timeout=3)
    assert reason is not None and "127.0.0.1" in reason
    assert time.perf_counter() - started < 3.5
