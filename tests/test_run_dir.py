"""The run directory after a killed process, and what train prints about it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from samprobe.cli import main
from samprobe.config import load_config
from samprobe.logs import count_of
from samprobe.run_dir import prepare_run_dir

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow

KILLED_MID_WRITE = """
import os, signal, sys
from samprobe.io import atomic_open
with atomic_open(sys.argv[1]) as f:  # the temp file exists, nothing written yet: SIGKILL runs no cleanup
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_temp_file_is_removed_a_live_writers_kept(digits_project: Path) -> None:
    cfg = load_config(digits_project / "samprobe.yaml")
    ckpt = cfg.run_dir / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(ckpt / "last.pt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = ckpt.glob(".last.pt.*.tmp")
    assert left.stat().st_size == 0
    live = ckpt / f".best.pt.pid{os.getpid()}.x1y2z3.tmp"  # a writer in this (live) process
    live.write_bytes(b"")
    prepare_run_dir(cfg)
    assert not left.exists() and live.exists() and not (ckpt / "last.pt").exists()


@pytest.mark.parametrize(
    "n, noun, text",
    [
        (1, "head", "1 head"),
        (8, "linear head", "8 linear heads"),
        (1, "active class", "1 active class"),
        (3, "active class", "3 active classes"),
    ],
)
def test_count_of(n: int, noun: str, text: str) -> None:
    assert count_of(n, noun) == text


def test_train_log_speaks_of_one_head_in_the_singular(
    digits_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(digits_project / "samprobe.yaml")
    one = [
        "--set",
        "train.sweep.lrs=[0.05]",
        "--set",
        "train.sweep.weight_decays=[0.0001]",
        "--set",
        "train.epochs=1",
    ]
    assert main(["extract", "-c", cfg]) == 0 and main(["train", "-c", cfg, *one]) == 0
    out = capsys.readouterr().out
    assert "train: 1 linear head (lr x weight_decay)" in out and "(1 head training)" in out, out
    assert "4 active classes of 4" in out
