"""`samprobe doctor`: every blocking problem -> exit 2 and a FAIL line naming it; healthy -> exit 0."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from helpers.digits_run import write_digits_project
from samprobe.cli import main


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_digits_project(tmp_path_factory.mktemp("doctor"), per_class=4)


def doctor(capsys, cfg: Path, *sets: str) -> tuple[int, list[str]]:
    argv = ["doctor", "-c", str(cfg)]
    for s in sets:
        argv += ["--set", s]
    rc = main(argv)
    out = capsys.readouterr().out
    return rc, out.splitlines()


def status(lines: list[str], name: str) -> str:
    hits = [ln for ln in lines if ln.strip().split(" ", 1)[-1].strip().startswith(f"{name}:")]
    assert len(hits) == 1, (name, lines)
    return hits[0].split()[0]


def test_healthy_config_passes(project, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    rc, lines = doctor(capsys, project)
    assert rc == 0, lines
    for name in ("config", "image root", "metadata", "image sample", "run directory", "feature cache directory",
                 "device and precision", "backbone checkpoint", "free disk", "tracker"):
        assert status(lines, name) == "ok", lines
    assert any("12 of 12 sampled images decode" in ln for ln in lines)
    assert any("efficientnet_lite0" in ln and "1280-d" in ln for ln in lines)
    assert lines[-1] == "doctor: all checks passed"


def _blocked_by(capsys, cfg: Path, name: str, *sets: str) -> str:
    rc, lines = doctor(capsys, cfg, *sets)
    assert rc == 2, lines
    # one line per check, even when a library error message spans a page
    assert all(ln.split()[0] in ("ok", "WARN", "FAIL", "skip") for ln in lines[1:-1]), lines
    assert status(lines, name) == "FAIL", lines
    assert "block a run" in lines[-1] and name in lines[-1]
    return next(ln for ln in lines if ln.split()[0] == "FAIL" and f" {name}:" in ln)


def test_invalid_config_is_blocking(project, capsys):
    line = _blocked_by(capsys, project, "config", "train.epochz=3")
    assert "train.epochz" in line and "did you mean train.epochs" in line


def test_missing_metadata_and_image_root_are_blocking(project, capsys, tmp_path):
    line = _blocked_by(capsys, project, "metadata", f"data.metadata={tmp_path / 'nope.csv'}")
    assert "nope.csv" in line and "[SP200]" in line
    line = _blocked_by(capsys, project, "image root", f"data.image_root={tmp_path / 'no_images'}")
    assert "no_images" in line
    rc, lines = doctor(capsys, project, f"data.image_root={tmp_path / 'no_images'}")
    assert status(lines, "image sample") == "skip"  # needs the image root


def test_unreadable_images_are_blocking(capsys, tmp_path):
    cfg = write_digits_project(tmp_path, per_class=2)
    for png in (tmp_path / "data" / "images").glob("*.png"):
        png.write_bytes(png.read_bytes()[:20])  # truncated: header only
    line = _blocked_by(capsys, cfg, "image sample")
    assert "none of 6 sampled images could be read" in line


def test_some_unreadable_images_only_warn(capsys, tmp_path):
    cfg = write_digits_project(tmp_path, per_class=2)
    next((tmp_path / "data" / "images").glob("*.png")).write_bytes(b"not a png")
    rc, lines = doctor(capsys, cfg)
    assert rc == 0 and status(lines, "image sample") == "WARN", lines


def test_unwritable_run_and_cache_dirs_are_blocking(project, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a directory cannot be created under a file (works as root too)
    line = _blocked_by(capsys, project, "run directory", f"run_dir={blocker / 'run'}")
    assert "[SP400]" in line and "a_file" in line
    line = _blocked_by(capsys, project, "feature cache directory", f"features.cache_dir={blocker / 'cache'}")
    assert "features.cache_dir" in line


def test_too_little_disk_is_blocking(project, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    line = _blocked_by(capsys, project, "free disk")
    assert "only 0.00 GB free" in line and "features.cache_dir" in line


def test_bad_backbone_checkpoint_is_blocking(project, capsys, tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(bytes(range(256)) * 4)  # torch.load's error for this is many lines long
    line = _blocked_by(capsys, project, "backbone checkpoint", f"backbone.checkpoint={garbage}")
    assert "[SP300]" in line and "weights.pth" in line and "not a readable PyTorch checkpoint" in line

    import torch

    wrong = tmp_path / "resnet_like.pth"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    line = _blocked_by(capsys, project, "backbone checkpoint", f"backbone.checkpoint={wrong}")
    assert "does not hold EfficientNet-Lite0 weights" in line


def test_unsupported_precision_is_blocking(project, capsys):
    line = _blocked_by(capsys, project, "device and precision", "precision=fp16")
    assert "fp16" in line and "CPU" in line and "bf16, fp32 or auto" in line


def test_unreachable_wandb_warns_but_does_not_block(project, capsys, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    rc, lines = doctor(capsys, project, "tracking.wandb.mode=online")
    assert rc == 0 and status(lines, "tracker") == "WARN", lines
    assert any(f"127.0.0.1:{port}" in ln and "fall back to offline" in ln for ln in lines)
