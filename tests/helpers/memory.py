"""Peak memory of a piece of code, measured in a child process from /proc (Linux).

The child runs ``PEAK_PRELUDE`` + the test's script, which calls ``reset_peak()`` where the
measure starts and ``status("VmHWM")`` where it ends, and prints one JSON line last. Linux only,
as CI is: without /proc/self/clear_refs the child fails and the test with it (never a skip)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from helpers.cache_corpus import PY, REPO

PEAK_PRELUDE = '''
from pathlib import Path

def status(field):
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    """VmHWM starts again from the resident memory now; returns it (VmRSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")
'''


def run_measured(
    script: str, *args: str, timeout: float = 600, default_allocator: bool = False
) -> dict[str, Any]:
    """``script`` in a child Python (the repo's src on its path) on one thread, with glibc's mmap
    threshold fixed: with the dynamic one, freed buffers stay in the heap by chance (the same
    streamed evaluate grew by 22-39 MB at 80k rows; with a fixed threshold 21 MB every time).
    ``default_allocator``: glibc's as a user's process has it, dynamic threshold included (for a
    test of what it does to a pattern of allocations). Returns the JSON line it printed last."""
    fixed = {} if default_allocator else {"MALLOC_MMAP_THRESHOLD_": "131072"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [PY, "-c", PEAK_PRELUDE + script, *args],
        env={**env, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **fixed},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
