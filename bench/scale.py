"""Training that streams: a sweep on features larger than its memory budget, against the in-memory
path on a subset that fits.

Writes a synthetic cache through samprobe's own ``FeatureCache.put`` (shards of 32768 rows, as
extraction leaves them after compaction): ``--rows`` fp16 features of ``--dim`` values, classes
of imbalanced sizes (class k holds a share proportional to 1/sqrt(k+1): 32x between the largest
and the smallest of 1000), each row its class mean plus unit noise, then a per-dimension scale
and offset (so standardising matters); every row is train / val / test at random (80/10/10),
interleaved in the shards as an extraction in metadata order leaves them. Then, each in its own
process (peak RSS = VmHWM from /proc/self/status):

- ``memory``: the default sweep (8 heads) on the first ``--subset`` rows, features in memory;
- ``stream_subset``: the same rows, streamed (budget a quarter of what they need): the same best
  setting and test balanced accuracy within 0.5 points of ``memory``;
- ``stream``: every row, streamed under ``--budget-gb``: peak RSS <= 3 GB;
- ``memory_timing``: in memory on the subset again, every head trained (no pruning) for as many
  samples as one epoch of ``stream``, right after it: ``stream``'s first epoch (every head still
  trains) reaches >= 70 % of its samples/s. Both runs see the load of a shared machine over about
  the same stretch of time; a short run against a long one measured the load (0.25 and 1.0 for
  the same code, depending on which in-memory run it was put against).

Samples/s = training rows x epochs / wall time (validation included, as it is part of every
epoch); per CPU-second too (``samples_per_cpu_s``), what the load changes least. The cache goes
under ``--dir`` (default /tmp) and is deleted at the end, on failure (and SIGTERM) too; the free
space is checked first (exit 2 when short).

Run from the repo root: PYTHONPATH=src python bench/scale.py [--quick]
(full: 3 M x 1280 x 1000 classes, ~7.7 GB on disk; --quick: 500 k rows and 100 classes).
"""

from __future__ import annotations

import os

# Before torch loads libgomp, as samprobe's CLI sets it (cli.py): waiting OpenMP threads sleep
# instead of spinning, so both training paths run as `samprobe train` runs them (the workers
# inherit it). Without it libgomp spins between the in-memory sweep's many short parallel regions.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 32768
FINGERPRINT = "synthetic"
SPLITS = ("train", "val", "test")
RSS_LIMIT_GB = 3.0
SPEED_RATIO = 0.7
BAL_ACC_POINTS = 0.5


def key(i: int) -> str:
    return f"{i:064x}"


def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM), in GB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- the synthetic cache ---------------------------------------------------------------------


def write_cache(root: Path, rows: int, dim: int, classes: int, seed: int) -> dict[str, Any]:
    from samprobe.features.cache import FeatureCache

    rng = np.random.default_rng(seed)
    share = 1 / np.sqrt(np.arange(1, classes + 1))
    labels = rng.choice(classes, size=rows, p=share / share.sum()).astype(np.int16)
    split = rng.choice(3, size=rows, p=[0.8, 0.1, 0.1]).astype(np.int8)
    # class means 0.15 x N(0, I) apart: ~7.6 noise sigmas between two means at 1280-d
    means = (0.15 * rng.standard_normal((classes, dim))).astype(np.float32)
    scale = np.exp(rng.normal(0, 0.5, dim)).astype(np.float32)
    offset = rng.normal(0, 2, dim).astype(np.float32)
    t = time.perf_counter()
    with FeatureCache(root, FINGERPRINT, dim, "float16") as cache:
        for a in range(0, rows, SHARD):
            b = min(rows, a + SHARD)
            x = rng.standard_normal((b - a, dim), dtype=np.float32)
            x += means[labels[a:b]]
            x *= scale
            x += offset
            cache.put([key(i) for i in range(a, b)], x.astype(np.float16))
        nbytes = cache.stats()["bytes_on_disk"]
    np.save(root / "labels.npy", labels)
    np.save(root / "split.npy", split)
    return {"write_s": round(time.perf_counter() - t, 1), "cache_gb": round(nbytes / 1e9, 2)}


# --- one training run (a subprocess) ---------------------------------------------------------


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from samprobe.config import TrainConfig
    from samprobe.features.cache import POOLED, FeatureCache
    from samprobe.train.classes import class_weights
    from samprobe.train.loop import SweepTrainer, evaluate_heads
    from samprobe.train.stream import cached_rows, in_memory_bytes

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    root, rows = Path(spec["dir"]), spec["rows"]
    labels = np.load(root / "labels.npy")[:rows].astype(np.int64)
    split = np.load(root / "split.npy")[:rows]
    idx = {s: np.flatnonzero(split == i) for i, s in enumerate(SPLITS)}
    timing = spec.get("timing", False)
    cfg = TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        # the timing run trains every head every epoch, as the streamed run's first epoch does
        **({"patience": spec["epochs"], "sweep": {"prune_margin": None}} if timing else {}),
    )
    t = time.perf_counter()
    cache = FeatureCache(root, FINGERPRINT, spec["dim"], "float16", readonly=True)
    need = in_memory_bytes(len(idx["train"]) + len(idx["val"]), spec["dim"])
    budget = int(spec["budget_gb"] * 1e9) if spec["budget_gb"] else None
    streamed = budget is not None and need > budget

    def features(s: str) -> Any:
        keys = [key(i) for i in idx[s]]
        if streamed:
            assert budget is not None
            return cached_rows(cache, keys, array=POOLED, spatial=None, budget=budget)
        return cache.get(keys)

    x = {s: features(s) for s in SPLITS}
    y = {s: labels[idx[s]] for s in SPLITS}
    weights = class_weights(np.bincount(y["train"], minlength=spec["classes"]), "balanced")
    trainer = SweepTrainer(
        x["train"], y["train"], x["val"], y["val"], class_weights=weights, cfg=cfg, seed=0
    )
    setup_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    ends: list[tuple[float, float]] = []
    result = trainer.run(on_epoch=lambda _: ends.append((time.perf_counter(), time.process_time())))
    train_s, train_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    first_s, first_cpu_s = ends[0][0] - t, ends[0][1] - cpu
    test = evaluate_heads(
        result.model,
        x["test"] if streamed else torch.from_numpy(x["test"]),
        torch.from_numpy(y["test"]),
        torch.as_tensor(weights, dtype=torch.float32),
        num_untrained=0,
        device=torch.device("cpu"),
        precision="fp32",
        heads=torch.tensor([result.best_index]),
    )
    lr, wd = result.grid[result.best_index]
    return {
        "path": "stream" if streamed else "memory",
        "rows": rows,
        "train_rows": len(idx["train"]),
        "in_memory_gb": round(need / 1e9, 2),
        "budget_gb": spec["budget_gb"],
        "epochs": trainer.epoch,
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "samples_per_s": round(len(idx["train"]) * trainer.epoch / train_s, 1),
        # per second of this process's CPU time: what the load of the machine changes least
        "samples_per_cpu_s": round(len(idx["train"]) * trainer.epoch / train_cpu_s, 1),
        # epoch 1: every head trains (pruning starts after it)
        "epoch1_samples_per_s": round(len(idx["train"]) / first_s, 1),
        "epoch1_samples_per_cpu_s": round(len(idx["train"]) / first_cpu_s, 1),
        "loadavg_1min_at_end": float(Path("/proc/loadavg").read_text().split()[0]),
        "best_setting": {"lr": lr, "weight_decay": wd},
        "val_balanced_accuracy": round(result.best_score, 4),
        "test_balanced_accuracy": round(float(test["val_balanced_accuracy"][0]), 4),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- driver ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 k rows, 100 classes, 2 epochs")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--subset", type=int, help="rows of the in-memory comparison")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--budget-gb", type=float, help="train.memory_budget_gb of the streamed run")
    ap.add_argument("--dir", default="/tmp", help="where the synthetic cache is written")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads per run. On this 2-core machine the in-memory path took 3.5x the CPU "
        "per sample of the streamed one on 2 threads, and 0.8x on 1 (36k x 1280, 100 classes, "
        "same process); cause not established (a candidate: subnormal floats in the OpenMP "
        "workers, which flush_denormals does not reach)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(train_worker(json.loads(args.worker))))
        return 0
    quick = args.quick
    rows = args.rows or (500_000 if quick else 3_000_000)
    subset = args.subset or rows // 10
    classes = args.classes or (100 if quick else 1000)
    epochs = args.epochs or (2 if quick else 1)
    budget_gb = args.budget_gb or (1.0 if quick else 2.0)

    from samprobe.features.cache import estimate_bytes
    from samprobe.train.stream import in_memory_bytes

    need_disk = estimate_bytes(rows, args.dim, np.float16)
    free = shutil.disk_usage(args.dir).free
    if free < need_disk * 1.1 + 1e9:
        print(
            f"bench/scale.py: only {free / 1e9:.1f} GB free at {args.dir}, the synthetic cache "
            f"needs {need_disk / 1e9:.1f} GB (+10% and 1 GB headroom): free space there or pass "
            "--dir on a larger disk (or --quick)",
            file=sys.stderr,
        )
        return 2
    if in_memory_bytes(int(rows * 0.9), args.dim) <= budget_gb * 1e9:
        print(
            f"bench/scale.py: {rows} rows fit --budget-gb {budget_gb}: nothing would stream",
            file=sys.stderr,
        )
        return 2
    # a kill (SIGTERM) unwinds like an error, so the cache is deleted then too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="samprobe-scale-", dir=args.dir))
    report: dict[str, Any] = {
        "bench": "scale",
        "quick": quick,
        "rows": rows,
        "subset": subset,
        "dim": args.dim,
        "classes": classes,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    try:
        report["cache"] = write_cache(root, rows, args.dim, classes, seed=0)
        print(json.dumps({"cache": report["cache"]}), file=sys.stderr, flush=True)
        base = {
            "dir": str(root),
            "dim": args.dim,
            "classes": classes,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "threads": args.threads,
        }
        subset_need = in_memory_bytes(int(subset * 0.9), args.dim)
        # Speed: the streamed run's first epoch (every head trains) against an in-memory run on
        # the subset that trains every head for as many samples, right after it: both see the
        # load of this machine over about the same stretch of time (a short in-memory run
        # catches a quiet moment or a busy one, and the ratio measured the load).
        runs = {
            "memory": {**base, "rows": subset, "budget_gb": None},
            "stream_subset": {**base, "rows": subset, "budget_gb": subset_need / 4 / 1e9},
            "stream": {**base, "rows": rows, "budget_gb": budget_gb},
            "memory_timing": {
                **base,
                "rows": subset,
                "budget_gb": None,
                "epochs": max(1, round(rows / subset)),
                "timing": True,
            },
        }
        report["runs"] = {}
        for name, spec in runs.items():
            report["runs"][name] = run_worker({**spec, "name": name})
            print(json.dumps({name: report["runs"][name]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r = report["runs"]
    ratio = r["stream"]["epoch1_samples_per_s"] / r["memory_timing"]["samples_per_s"]
    cpu_ratio = r["stream"]["epoch1_samples_per_cpu_s"] / r["memory_timing"]["samples_per_cpu_s"]
    gap = 100 * abs(
        r["stream_subset"]["test_balanced_accuracy"] - r["memory"]["test_balanced_accuracy"]
    )
    report["peak_rss_gb"] = r["stream"]["peak_rss_gb"]
    report["ratios"] = {
        "stream_vs_memory": round(ratio, 3),
        "stream_vs_memory_cpu_time": round(cpu_ratio, 3),
        # the whole streamed run (pruned heads train no more) against the short in-memory run
        "stream_run_vs_memory_run": round(
            r["stream"]["samples_per_s"] / r["memory"]["samples_per_s"], 3
        ),
    }
    report["test_balanced_accuracy_gap_points"] = round(gap, 2)
    report["checks"] = {
        "streamed": r["stream"]["path"] == "stream" and r["stream_subset"]["path"] == "stream",
        "peak_rss": report["peak_rss_gb"] <= RSS_LIMIT_GB,
        "speed": ratio >= SPEED_RATIO,
        "same_best_setting": r["stream_subset"]["best_setting"] == r["memory"]["best_setting"],
        "test_balanced_accuracy": gap <= BAL_ACC_POINTS,
    }
    report["pass"] = all(report["checks"].values())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
