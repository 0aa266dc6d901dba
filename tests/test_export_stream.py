"""``features export`` streams from the cache a chunk at a time (.parquet: a row group, .npz: rows
of each .npy entry): the parquet reads back equal to the .npz of the same records, and neither
export's peak memory grows with the split.

Real data: sklearn's digit scans in a feature cache (``helpers.digit_cache``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers.cache_corpus import PY, REPO
from helpers.digit_cache import DIM, SPATIAL, build_cache, digit_rows
from samprobe.export import write_npz, write_parquet
from samprobe.features.cache import FeatureCache


def test_parquet_reads_back_equal_to_the_npz(tmp_path):
    import pyarrow.parquet as pq

    recs = build_cache(tmp_path / "cache", 3000, grid=True)
    # an order across shards and backwards: rows come out in record order, not cache order
    order = np.random.default_rng(0).permutation(len(recs))
    recs = [recs[i] for i in order]
    with FeatureCache(tmp_path / "cache", "fp", DIM, "float16", readonly=True) as cache:
        write_npz(cache, recs, tmp_path / "f.npz", spatial=SPATIAL)
        # 64 KB row groups: 16 rows of 512 + 512 float32 each, 188 row groups
        dim, grid = write_parquet(
            cache, recs, tmp_path / "f.parquet", spatial=SPATIAL, row_group_bytes=64 << 10
        )
    assert (dim, grid) == (DIM, (SPATIAL * SPATIAL, DIM // 4))
    z = np.load(tmp_path / "f.npz")
    file = pq.ParquetFile(tmp_path / "f.parquet")
    assert file.metadata.num_row_groups == -(-len(recs) // 16)
    t = file.read()
    for column in ("path", "label", "split", "sha256"):
        assert t.column(column).to_pylist() == z[column].tolist()
    features = t.column("features").combine_chunks().flatten().to_numpy().reshape(len(recs), DIM)
    np.testing.assert_array_equal(features, z["features"])
    np.testing.assert_array_equal(
        features, digit_rows(3000)[order].astype(np.float16).astype(np.float32)
    )
    grids = t.column("spatial").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(grids, z["spatial"].reshape(-1))  # token-major, as the npz


_EXPORT_PEAK = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from samprobe.data.records import Record
from samprobe.export import write_npz, write_parquet
from samprobe.features.cache import FeatureCache

root, n = Path(sys.argv[1]), int(sys.argv[2])
with FeatureCache(root / "cache", "fp", 512, "float16", readonly=True) as cache:
    recs = [Record(i, f"d/{i}.png", f"/d/{i}.png", str(i % 10), "train", k)
            for i, k in enumerate(json.loads((root / "keys.json").read_text()))]
    # a first export of 8 rows: what pyarrow imports on first use (pandas, 20 MB of code objects)
    # is not memory that grows with the split
    write_parquet(cache, recs[:8], root / "warm.parquet", spatial=None)
    write_npz(cache, recs[:8], root / "warm.npz", spatial=None)
    tracemalloc.start()
    if sys.argv[3] == "npz":
        write_npz(cache, recs, root / "f.npz", spatial=None, chunk_bytes=1 << 20)
    else:
        write_parquet(cache, recs, root / "f.parquet", spatial=None, row_group_bytes=1 << 20)
    python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"python_peak": python_peak, "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def _export_peak(root: Path, n: int, fmt: str) -> dict[str, int]:
    recs = build_cache(root / "cache", n, grid=False)
    (root / "keys.json").write_text(json.dumps([r.sha256 for r in recs]))
    out = subprocess.run(
        [PY, "-c", _EXPORT_PEAK, str(root), str(n), fmt],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npz"])
def test_export_memory_does_not_grow_with_the_split(tmp_path, fmt):
    (tmp_path / "small").mkdir(), (tmp_path / "large").mkdir()
    small = _export_peak(tmp_path / "small", 4_000, fmt)  # 8 MB of float32 features, 8 chunks
    large = _export_peak(tmp_path / "large", 40_000, fmt)  # 80 MB, 80 chunks of 1 MB
    whole = 40_000 * DIM * 4
    for key in ("python_peak", "arrow_peak") if fmt == "parquet" else ("python_peak",):
        # a few row groups' worth at most, as for a split 10x smaller; the split held whole
        # would be 80 MB (and was, before export streamed)
        assert large[key] < whole / 10, (key, large[key])
        assert large[key] < 2 * small[key] + (2 << 20), (key, large, small)
