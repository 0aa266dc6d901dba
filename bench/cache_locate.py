"""Bulk key lookup of the feature cache (``FeatureCache._locate``): peak Python memory and time
for N keys in shards of 32768, asked in storage order and shuffled; with ``--against REV`` the
``_locate`` of ``src/samprobe/features/cache.py`` at that git revision on the same cache, in the
same run (times: best of 2 without tracemalloc; peaks: one call under tracemalloc).

Run from the repo root: PYTHONPATH=src python bench/cache_locate.py [--n 300000] [--against REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from samprobe.features.cache import POOLED, FeatureCache

SHARD = 32768


def _locate_at(rev: str) -> Any:
    """``FeatureCache._locate`` as ``rev`` wrote it (its module loaded beside this one)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/samprobe/features/cache.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="samprobe-locate-")) / "cache_at_rev.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("samprobe.features.cache_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    shutil.rmtree(path.parent, ignore_errors=True)
    return module.FeatureCache._locate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--against", help="a git revision whose _locate to compare with")
    args = ap.parse_args()
    n = args.n
    keys = [f"{i:064x}" for i in range(n)]
    cases = {
        "storage_order": keys,
        "shuffled": [keys[i] for i in np.random.default_rng(0).permutation(n)],
    }
    impls = {"this": FeatureCache._locate}
    if args.against:
        impls[args.against] = _locate_at(args.against)
    root = Path(tempfile.mkdtemp(prefix="samprobe-bench-locate-"))
    out: dict[str, Any] = {"bench": "cache_locate", "keys": n, "shard_rows": SHARD}
    try:
        with FeatureCache(root, "fp", 8, "float16") as cache:
            for a in range(0, n, SHARD):
                b = min(n, a + SHARD)
                cache.put(keys[a:b], np.zeros((b - a, 8), np.float16))
            results: dict[str, Any] = {}
            for name, locate in impls.items():
                for case, asked in cases.items():
                    tracemalloc.start()
                    shard, row = locate(cache, list(asked), POOLED)
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    times = []
                    for _ in range(2):
                        t = time.perf_counter()
                        locate(cache, list(asked), POOLED)
                        times.append(time.perf_counter() - t)
                    results[f"{case}/{name}"] = {
                        "peak_mb": round(peak / 1e6, 1),
                        "seconds": round(min(times), 3),
                        # the same answer from every implementation
                        "checksum": int(((shard << 32) + row).sum() % 1_000_003),
                    }
        out["results"] = results
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
