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
    for name in (
        "config",
        "image root",
        "metadata",
        "image sample",
        "run directory",
        "feature cache directory",
        "device and precision",
        "GPU",
        "backbone checkpoint",
        "shared memory",
        "free disk",
        "tracker",
    ):
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
    line = _blocked_by(
        capsys, project, "feature cache directory", f"features.cache_dir={blocker / 'cache'}"
    )
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
    assert (
        "[SP300]" in line and "weights.pth" in line and "not a readable PyTorch checkpoint" in line
    )

    import torch

    wrong = tmp_path / "resnet_like.pth"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    line = _blocked_by(capsys, project, "backbone checkpoint", f"backbone.checkpoint={wrong}")
    assert "does not hold EfficientNet-Lite0 weights" in line


def test_unsupported_precision_is_blocking(project, capsys):
    line = _blocked_by(capsys, project, "device and precision", "precision=fp16")
    assert "fp16" in line and "CPU" in line and "bf16, fp32 or auto" in line


@pytest.mark.parametrize("fp32, bf16, chosen", [(96.0, 403.0, "bf16"), (153.0, 84.0, "fp32")])
def test_auto_precision_line_shows_the_cpu_probe(project, capsys, monkeypatch, fp32, bf16, chosen):
    from samprobe import device as precision

    monkeypatch.setattr(precision, "_PROBES", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(project / f"xdg-{chosen}"))
    monkeypatch.setattr(precision, "measure_gemm_gflops", lambda: {"fp32": fp32, "bf16": bf16})
    rc, lines = doctor(capsys, project, "precision=auto")
    assert rc == 0, lines
    line = next(ln for ln in lines if " device and precision:" in ln)
    assert f"precision {chosen} (precision: auto)" in line, line
    assert f"bf16 {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} GFLOP/s" in line, line


def test_unreachable_wandb_warns_but_does_not_block(project, capsys, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    rc, lines = doctor(capsys, project, "tracking.wandb.mode=online")
    assert rc == 0 and status(lines, "tracker") == "WARN", lines
    assert any(f"127.0.0.1:{port}" in ln and "fall back to offline" in ln for ln in lines)


@pytest.mark.slow
def test_disk_line_gives_extracts_estimate_and_says_when_the_width_is_assumed(tmp_path, capsys):
    import logging

    cfg = write_digits_project(tmp_path / "p", per_class=4)

    def disk_line(*sets: str) -> str:
        _, lines = doctor(capsys, cfg, *sets)
        return next(ln for ln in lines if " free disk:" in ln)

    line = disk_line()
    doctor_mb = float(line.split("cache needs about ")[1].split(" MB")[0])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("samprobe").addHandler(handler)
    try:
        assert main(["extract", "-c", str(cfg)]) == 0
    finally:
        logging.getLogger("samprobe").removeHandler(handler)
    extract_line = next(r.getMessage() for r in records if "MB on disk" in r.getMessage())
    assert "(12 to extract" in extract_line and f"~{doctor_mb:.1f} MB on disk" in extract_line, (
        line,
        extract_line,
    )
    assert "12 images x 1280-d" in line

    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    broken = disk_line(f"backbone.checkpoint={garbage}")
    assert "assuming 1280-d" in broken and "backbone check failed" in broken, broken


def _fake_driver(root: Path, version_line: str, gpus: int) -> Path:
    proc = root / "proc_nvidia"
    (proc / "gpus").mkdir(parents=True)
    (proc / "version").write_text(version_line + "\nGCC version:  gcc version 12.2.0\n")
    for i in range(gpus):
        (proc / "gpus" / f"0000:{i:02x}:00.0").mkdir()
    return proc


def test_gpu_present_but_unusable_warns(project, capsys, monkeypatch, tmp_path):
    import torch

    from samprobe import doctor as doc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doc, "NVIDIA_PROC", tmp_path / "absent")
    rc, lines = doctor(capsys, project)
    assert status(lines, "GPU") == "ok" and any(
        "no NVIDIA GPU (runs on the CPU)" in ln for ln in lines
    )
    monkeypatch.setattr(
        doc,
        "NVIDIA_PROC",
        _fake_driver(
            tmp_path,
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build",
            2,
        ),
    )
    rc, lines = doctor(capsys, project, "device=auto")
    assert rc == 0 and status(lines, "GPU") == "WARN", lines
    line = next(ln for ln in lines if " GPU:" in ln)
    assert "2 GPU(s), driver 550.54.15" in line and "device: auto runs on the CPU" in line
    monkeypatch.setattr(torch.version, "cuda", None)
    line = next(ln for ln in doctor(capsys, project)[1] if " GPU:" in ln)
    assert "CPU-only" in line


def test_usable_gpus_are_listed_with_capability_memory_and_rank(
    project, capsys, monkeypatch, tmp_path
):
    import torch

    from samprobe import doctor as doc

    class Props:
        name, major, minor, total_memory = "NVIDIA H200", 9, 0, 150_000_000_000

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(
        doc,
        "NVIDIA_PROC",
        _fake_driver(
            tmp_path,
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC "
            "2023",
            2,
        ),
    )
    line = next(ln for ln in doctor(capsys, project)[1] if " GPU:" in ln)
    assert line.split()[0] == "ok"
    assert "cuda:0 (NVIDIA H200, sm_90, 139.7 GiB), cuda:1 (NVIDIA H200, sm_90, 139.7 GiB)" in line
    assert (
        "driver 535.104.05" in line
        and f"CUDA {torch.version.cuda}" in line
        and "LOCAL_RANK 1 uses cuda:1" in line
    )


def test_too_little_shared_memory_for_the_workers_is_blocking(project, capsys, monkeypatch):
    import shutil

    from samprobe import doctor as doc

    real = shutil.disk_usage
    rc, lines = doctor(capsys, project)
    assert status(lines, "shared memory") == "ok" and any(
        "not used (features.num_workers 0" in ln for ln in lines
    )
    monkeypatch.setattr(
        doc.shutil,
        "disk_usage",
        lambda p: real(p)._replace(free=100_000) if str(p) == "/dev/shm" else real(p),
    )
    line = _blocked_by(
        capsys, project, "shared memory", "features.num_workers=2", "features.batch_size=4"
    )
    # 12 images, batches of 4: 2 workers x 4 prefetched batches x 4 images x 3 x 64 x 64 bytes = 0.4
    # MB
    assert (
        "[SP600]" in line
        and "/dev/shm has 0.1 MB free" in line
        and "need 0.4 MB" in line
        and "--shm-size" in line
    )


def test_doctor_says_the_sam_family_and_lists_its_features(project, capsys, tmp_path):
    from helpers.sam_factory import write_official_hq_checkpoint

    ckpt = write_official_hq_checkpoint(tmp_path / "sam_hq_tiny.pth", "tiny", img_size=256)
    rc, lines = doctor(
        capsys, project, "backbone.name=sam", f"backbone.checkpoint={ckpt}", "backbone.img_size=256"
    )
    line = next(ln for ln in lines if " backbone checkpoint:" in ln)
    assert rc == 0 and status(lines, "backbone checkpoint") == "ok", lines
    assert (
        "SAM-HQ checkpoint, custom encoder" in line
        and "block_avg[@1..2]" in line
        and "interm_avg" in line
    )
    rc, lines = doctor(
        capsys,
        project,
        "backbone.name=sam",
        f"backbone.checkpoint={ckpt}",
        "backbone.img_size=256",
        "backbone.variant=hiera_t",
    )
    assert rc == 2 and "backbone.variant is hiera_t" in next(
        ln for ln in lines if " backbone checkpoint:" in ln
    )
