"""bench/gpu.py --dry-run: every section of the GPU check runs on the CPU (tiny sizes) and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_dry_run_runs_every_section_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert (
        report["bench"] == "gpu"
        and report["dry_run"]
        and report["device"] == "cpu"
        and report["errors"] == {}
    )
    tiny = report["extract"]["tiny"]
    assert tiny["official_img_s"] > 0
    for batch in (1, 2):
        row = tiny[f"batch_{batch}"]
        assert row["timm_img_s"] > 0 and row["samprobe_img_s"] > 0 and row["vs_timm"] > 0
    # torch.compile (dynamo capture, eager backend) gives the eager features
    assert report["compile"]["min_cosine"] >= 0.999
    # the OOM split: batch 4 cut to 2, every image extracted, the same features as unsplit
    oom = report["oom"]
    assert (
        oom["ok"] and oom["split_to"] == 2 and oom["extracted"] == 4 and oom["min_cosine"] >= 0.9999
    )
    assert report["torchrun"]["rc"] == 0 and any(
        "6 extracted" in ln for ln in report["torchrun"]["summary"]
    )
    assert report["heads"]["heads"] == 8 and report["heads"]["best_val_balanced_accuracy"] > 0.5
