"""``samprobe cache info | verify | prune``: look after the feature cache of a config.

``info`` lists every fingerprint under ``features.cache_dir`` (sizes, what produced it);
``verify`` recomputes every shard checksum; ``prune`` drops entries that no run using the cache
(``<cache_dir>/runs.json``) references in its splits.csv, and frees their bytes (a dry run unless
``--yes``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from samprobe.config import Config
from samprobe.data.records import Record, read_splits
from samprobe.errors import CacheError
from samprobe.features.cache import (
    FeatureCache,
    estimate_bytes,
    fingerprint_dirs,
    registered_runs,
    unregister_runs,
)

log = logging.getLogger("samprobe")


def _current_fingerprint(cfg: Config) -> str | None:
    from samprobe.features.extract import Extractor

    return Extractor.from_config(cfg, on_device=False).fingerprint  # no weights moved to the GPU


def _no_cache(cfg: Config) -> CacheError:
    return CacheError(
        f"features.cache_dir {cfg.features.cache_dir} holds no feature cache",
        fix="run `samprobe extract -c CONFIG` first, or point features.cache_dir at an existing "
        "cache",
    )


def cache_info(cfg: Config) -> list[dict[str, Any]]:
    dirs = fingerprint_dirs(cfg.features.cache_dir)
    if not dirs:
        raise _no_cache(cfg)
    current = _current_fingerprint(cfg)
    rows = []
    for d in dirs:
        with FeatureCache.open_existing(d, readonly=True) as cache:
            meta, st = cache.meta(), cache.stats()
        backbone = meta.get("backbone", {})
        # timm backbones name a "model"; SAM's identity has "name" and "variant" (e.g. sam vit_b)
        name = (
            backbone.get("model")
            or " ".join(str(backbone[k]) for k in ("name", "variant") if backbone.get(k))
            or "?"
        )
        st.update(
            backbone=name,
            pooling=meta.get("pooling"),
            input_size=meta.get("input_size"),
            current=d.name == current,
        )
        rows.append(st)
        # e.g. "9 entries (grid2 9, pooled 9)" once a second array (the spatial grid) is stored
        per_array = (
            f" ({', '.join(f'{a} {n}' for a, n in st['arrays'].items())})"
            if len(st["arrays"]) > 1
            else ""
        )
        log.info(
            f"{d.name}{'  (this config)' if st['current'] else ''}: {st['entries']} "
            f"entries{per_array}, {st['shards']} shards, "
            f"{st['bytes_on_disk'] / 1e6:.1f} MB on disk; {st['backbone']} {st['input_size']}px, "
            f"{'+'.join(st['pooling'] or [])} {st['dim']}-d {st['dtype']}"
        )
    total = sum(r["bytes_on_disk"] for r in rows)
    log.info(f"cache {cfg.features.cache_dir}: {len(rows)} fingerprint(s), {total / 1e6:.1f} MB")
    return rows


def cache_verify(cfg: Config, repair: bool = False) -> dict[str, Any]:
    """Recompute every checksum of every fingerprint; CacheError if anything is bad (after
    dropping it with ``repair``)."""
    dirs = fingerprint_dirs(cfg.features.cache_dir)
    if not dirs:
        raise _no_cache(cfg)
    total = {"shards": 0, "entries": 0, "bad_shards": 0, "bad_entries": 0}
    for d in dirs:
        with FeatureCache.open_existing(d, readonly=not repair) as cache:
            rep = cache.verify(drop=repair)
        total["shards"] += rep.shards
        total["entries"] += rep.entries
        total["bad_shards"] += len(rep.bad_shards)
        total["bad_entries"] += rep.bad_entries
        for file, reason in rep.bad_shards:
            log.info(f"  BAD  {d.name}/shards/{file}: {reason}")
        log.info(
            f"{d.name}: {rep.shards} shards, {rep.entries} entries, {len(rep.bad_shards)} bad "
            f"shards, "
            f"{rep.bad_entries} bad entries" + (" (dropped from the index)" if rep.dropped else "")
        )
    log.info(f"verify: {total['bad_entries']} bad entries of {total['entries']}")
    if total["bad_entries"] and not repair:
        raise CacheError(
            f"{total['bad_entries']} cache entries in {total['bad_shards']} shard(s) under "
            f"{cfg.features.cache_dir} are corrupt",
            fix="run `samprobe extract -c CONFIG` (it drops corrupt entries and re-extracts them), "
            "or `samprobe cache verify -c CONFIG --repair` to drop them now",
        )
    return total


def _referenced_keys(cfg: Config, records: list[Record]) -> tuple[set[str], list[str], list[str]]:
    """(image sha256s some run using the cache needs — this run's ``records`` and every registered
    run's splits.csv —, those runs, registered runs whose splits.csv is gone)."""
    referenced = {r.sha256 for r in records}
    this = str(cfg.run_dir.resolve())
    users, gone = [this], []
    for run in sorted(registered_runs(cfg.features.cache_dir)):
        if run == this:
            continue
        splits = Path(run) / "splits.csv"
        if splits.is_file():
            referenced |= {r.sha256 for r in read_splits(splits)}
            users.append(run)
        else:
            gone.append(run)
    return referenced, users, gone


def cache_prune(
    cfg: Config, *, records: list[Record], all_fingerprints: bool = False, dry_run: bool = True
) -> dict[str, int]:
    """Remove entries no run using the cache needs: runs register themselves in
    ``<cache_dir>/runs.json`` when they extract or read features, and an entry is kept while any of
    their splits.csv lists its image. ``dry_run`` (the default) only reports counts and bytes."""
    referenced, users, gone = _referenced_keys(cfg, records)
    dirs = fingerprint_dirs(cfg.features.cache_dir)
    if not dirs:
        raise _no_cache(cfg)
    if not all_fingerprints:
        current = _current_fingerprint(cfg)
        dirs = [d for d in dirs if d.name == current]
    log.info(
        f"cache {cfg.features.cache_dir}: {len(users)} run(s) use it ({', '.join(users)}); "
        f"keeping the {len(referenced)} images their splits.csv list"
        + (
            f"; {len(gone)} registered run(s) no longer exist ({', '.join(gone)}): their images "
            f"are not kept"
            if gone
            else ""
        )
    )
    out = {"removed": 0, "kept": 0, "freed_bytes": 0, "runs": len(users)}
    for d in dirs:
        with FeatureCache.open_existing(d) as cache:
            keys = cache.keys()
            stale = keys - referenced
            before = cache.stats()
            if dry_run:
                freed = sum(
                    estimate_bytes(
                        len(cache.keys(a) - referenced), cache.array_dim(a) or 0, cache.dtype
                    )
                    for a in before["arrays"]
                )
            else:
                if stale:
                    cache.remove(stale)
                    cache.compact()
                cache.remove_orphans()
                freed = before["bytes_on_disk"] - cache.stats()["bytes_on_disk"]
        out["removed"] += len(stale)
        out["kept"] += len(keys) - len(stale)
        out["freed_bytes"] += max(freed, 0)
        log.info(
            f"{d.name}: {'would remove' if dry_run else 'removed'} {len(stale)} of {len(keys)} "
            f"entries, {'would free about' if dry_run else 'freed'} {max(freed, 0) / 1e6:.2f} MB"
        )
    if dry_run:
        log.info("cache prune: dry run, nothing removed; rerun with --yes to remove these entries")
    elif gone:
        unregister_runs(cfg.features.cache_dir, gone)
    return out


__all__ = ["cache_info", "cache_prune", "cache_verify"]
