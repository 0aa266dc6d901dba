"""FeatureCache: round trips, atomicity, corruption detection, compaction, prune, CLI errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers.cache_corpus import make_corpus, write_config
from samprobe.cli import main
from samprobe.errors import CacheError
from samprobe.features.cache import FeatureCache, estimate_bytes


def _feats(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _keys(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def test_put_get_round_trip_in_any_order(tmp_path):
    x = _feats(10)
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        c.put(_keys(6), x[:6])
        c.put(_keys(10)[6:], x[6:])
        assert len(c) == 10
        assert c.missing(_keys(12)) == ["k00010", "k00011"]
        order = [9, 0, 5, 6, 1]
        got = c.get([_keys(10)[i] for i in order])
        np.testing.assert_array_equal(got, x[order].astype(np.float16).astype(np.float32))
        assert c.get(_keys(10), dtype=None).dtype == np.float16
        with pytest.raises(KeyError, match="nope"):
            c.get(["nope"])
    # a new process (new object) sees the committed entries
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        assert c.missing(_keys(10)) == []


def test_bulk_reads_resolve_any_order_repeats_and_shards_not_fully_live(tmp_path):
    # >= 2000 keys: resolved through the shards' key lists (a whole shard in storage order at
    # once, else the sorted hashes of the requested keys), the rest through the index
    n = 3 * 1500
    x = _feats(n)
    keys = _keys(n)
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        for a in range(0, n, 1500):
            c.put(keys[a : a + 1500], x[a : a + 1500])
        c.put(keys[10:20], x[10:20])  # the first shard is no longer fully live
        stored = x.astype(np.float16).astype(np.float32)
        rng = np.random.default_rng(0)
        for order in (
            np.arange(n),  # storage order
            rng.permutation(n),
            np.concatenate([np.arange(1500, 3000), rng.integers(0, n, 2500)]),  # repeats
            np.concatenate([rng.permutation(n), [5, 5, 2999, 1600]]),
        ):
            np.testing.assert_array_equal(c.get([keys[i] for i in order]), stored[order])
        with pytest.raises(KeyError, match="nope"):
            c.get([*keys, "nope"])


def test_orphan_shard_from_a_killed_write_is_invisible_and_collected(tmp_path):
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        c.put(_keys(3), _feats(3))
        # what a kill between the shard rename and the index commit leaves behind
        orphan = c.shard_dir / "deadbeef.bin"
        orphan.write_bytes(b"\0" * 100)
        (c.shard_dir / ".x.bin.123.tmp").write_bytes(b"\1" * 7)
        assert len(c) == 3 and c.verify().bad_entries == 0
        # young: may belong to a writer about to commit
        assert c.remove_orphans(min_age_s=3600) == 0
        assert c.remove_orphans(min_age_s=0) == 2
        assert sorted(p.name for p in c.shard_dir.iterdir()) == [
            next(iter(c._shards().values())).file
        ]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_detected_on_read_by_verify_and_dropped_by_missing(tmp_path, damage):
    x = _feats(8)
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        c.put(_keys(4), x[:4])
        c.put(_keys(8)[4:], x[4:])
        victim = c._shards()[c._locations(["k00005"], "pooled")["k00005"][0]]
    path = tmp_path / "fp" / "shards" / victim.file
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[37] ^= 0x10
        with open(path, "r+b") as f:  # in place: same inode, size unchanged
            f.write(raw)
    else:
        os.truncate(path, victim.nbytes - 5)
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        with pytest.raises(CacheError, match=f"{victim.file}.*corrupt"):
            c.get(_keys(8))
        # intact shard still reads
        np.testing.assert_array_equal(c.get(_keys(4)), x[:4].astype(np.float16).astype(np.float32))
        rep = c.verify()
        assert rep.bad_entries == 4 and rep.bad_shards[0][0] == victim.file
        assert c.missing(_keys(8)) == _keys(8)[4:]  # dropped: extraction will redo exactly these
        assert c.verify().bad_entries == 0 and not path.exists()


def test_unchanged_content_with_new_stamp_is_accepted(tmp_path):
    """A copied/touched shard (same bytes, new mtime) passes the crc check and is not dropped."""
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        c.put(_keys(4), _feats(4))
        shard = next(iter(c._shards().values()))
    path = tmp_path / "fp" / "shards" / shard.file
    os.utime(path, ns=(1, 1))
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        assert c.missing(_keys(4)) == []
        assert next(iter(c._shards().values())).stamp != shard.stamp


def test_compact_packs_small_shards_and_prune_frees_bytes(tmp_path):
    x = _feats(50)
    keys = _keys(50)
    with FeatureCache(tmp_path, "fp", 16, "float16") as c:
        for i in range(0, 50, 4):
            c.put(keys[i : i + 4], x[i : i + 4])
        assert c.stats()["shards"] == 13
        c.compact(target_rows=20)
        assert c.stats()["shards"] == 3 and len(list(c.shard_dir.iterdir())) == 3
        np.testing.assert_array_equal(c.get(keys), x.astype(np.float16).astype(np.float32))
        before = c.stats()["shard_bytes"]
        c.remove(keys[10:])
        c.compact(target_rows=20)
        assert c.stats()["shard_bytes"] == before * 10 // 50
        np.testing.assert_array_equal(
            c.get(keys[:10]), x[:10].astype(np.float16).astype(np.float32)
        )
        assert c.missing(keys) == keys[10:]
        assert c.verify().bad_entries == 0


def test_estimate_bytes_matches_real_usage(tmp_path):
    with FeatureCache(tmp_path, "fp", 1280, "float16") as c:
        c.put(_keys(2000), _feats(2000, 1280))
        c.compact()
        on_disk = c.stats()["bytes_on_disk"]
    assert 0.9 < on_disk / estimate_bytes(2000, 1280, "float16") < 1.2


# ----------------------------------------------------------------------------- CLI


def test_cli_extract_unwritable_cache_dir_exits_2_before_any_work(tmp_path, capsys):
    images = make_corpus(tmp_path, n_digits=2, crops=1)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file in the way")
    cfg = write_config(tmp_path, images, cache_dir=blocker / "cache")
    assert main(["extract", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (
        f"features.cache_dir {blocker / 'cache'} cannot be created or written" in err
        and "Fix:" in err
    )
    assert not (tmp_path / "run").exists()  # nothing validated, no model loaded
    cfg = write_config(tmp_path, images, cache_dir="/proc/samprobe-cache")
    capsys.readouterr()
    assert main(["doctor", "-c", str(cfg)]) == 2
    assert (
        "FAIL  feature cache directory: [SP400] features.cache_dir /proc/samprobe-cache cannot be "
        "created" in capsys.readouterr().out
    )


def test_cli_cache_commands_without_a_cache_exit_2(tmp_path, capsys):
    images = make_corpus(tmp_path, n_digits=2, crops=1)
    cfg = write_config(tmp_path, images)
    for action in ("info", "verify", "prune"):
        assert main(["cache", action, "-c", str(cfg)]) == 2
        assert "holds no feature cache" in capsys.readouterr().err


def test_cache_of_another_layout_is_refused_with_a_fix(tmp_path):
    import json

    import pytest

    from samprobe.errors import CacheError
    from samprobe.features.cache import FeatureCache

    with FeatureCache(tmp_path, "fp", 4, "float16") as cache:
        cache.put(["k"], np.ones((1, 4), np.float32))
    meta = tmp_path / "fp" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "layout": "sqlite-blobs-v0"}))
    with pytest.raises(CacheError, match="cache layout 'sqlite-blobs-v0'") as err:
        FeatureCache(tmp_path, "fp", 4, "float16")
    assert "delete" in err.value.fix
