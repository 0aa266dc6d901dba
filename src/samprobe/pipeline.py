"""The pipeline stages behind the CLI: validate -> extract -> train -> evaluate, and the stages
that read their outputs (inspect, features export).

Each stage reads what the previous one wrote in the run directory, so each can be rerun alone;
each is also a plain function for notebooks. Stages are the only callers of each other: the
modules they use (data/, features/, train/, predict, inspection, export) never import this one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from samprobe.backbones.registry import grid_array
from samprobe.config import Config, check_head_input
from samprobe.data.data_report import summary_lines, write_report
from samprobe.data.records import Dataset, Record, read_splits, write_splits
from samprobe.data.splits import assign_splits, carves_val
from samprobe.data.validate import paused_gc, validate
from samprobe.device import describe_device
from samprobe.errors import CheckpointError, DataError, TrainingError
from samprobe.features.cache import POOLED, FeatureCache, register_run
from samprobe.features.extract import Extractor, ExtractResult, load_head_inputs, rank_world
from samprobe.features.manifest import ManifestWriter
from samprobe.features.ranks import on_rank0, plan_ranks
from samprobe.io import atomic_open, atomic_write_text, ensure_writable_dir
from samprobe.logs import count_of
from samprobe.predict import predict_features
from samprobe.report import write_run_report
from samprobe.run_dir import (
    FAILURES_FILE,
    evaluation_dir,
    prepare_run_dir,
    read_failed_keys,
    write_failures,
)
from samprobe.tracking import Tracker, read_jsonl
from samprobe.train.checkpoint import (
    FeatureSource,
    HeadCheckpoint,
    ImageSet,
    check_fingerprint,
    check_no_training_images,
    check_resumable,
    load_checkpoint,
    rotate_epoch_checkpoints,
    save_checkpoint,
)
from samprobe.train.classes import ClassMapping, class_weights
from samprobe.train.loop import SweepTrainer
from samprobe.train.metrics import classification_metrics, confusion, per_class_table
from samprobe.train.stream import (
    CachedRows,
    buffer_rows,
    cached_rows,
    in_memory_bytes,
    memory_budget,
)

log = logging.getLogger("samprobe")


# ---------------------------------------------------------------------------------------
# validate


SPLIT_LEDGER = "split_ledger.json"
VALIDATION_RECORD = "validation"  # what validate remembers of each file (data/check_record.py)


def split_settings(cfg: Config) -> dict[str, Any]:
    """What decides where a new image goes, besides its content."""
    d = cfg.data
    return {
        "seed": cfg.seed,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "split_column": d.split_column,
    }


def _settings_key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)


def read_split_ledger(run_dir: Path) -> tuple[dict[str, dict[str, str]], str | None]:
    """(split settings -> {sha256 -> split} of every image validations of this run assigned under
    them, the settings of the last validation). A run dir with a splits.csv but no ledger (deleted,
    or splits.csv copied in by hand): that splits.csv, under unknown settings (None), so its images
    keep their splits."""
    ledger = run_dir / SPLIT_LEDGER
    if ledger.is_file():
        data = json.loads(ledger.read_text(encoding="utf-8"))
        return {k: dict(v) for k, v in data["by_settings"].items()}, data["last"]
    if (run_dir / "splits.csv").is_file():
        return {
            "": {r.sha256: r.split for r in read_splits(run_dir / "splits.csv") if r.split}
        }, None
    return {}, None


def _split_source(cfg: Config, records: list[Record]) -> str:
    if cfg.data.split_column is None:
        return (
            f"stratified per class (seed {cfg.seed}, data.val_fraction {cfg.data.val_fraction:g}, "
            f"data.test_fraction {cfg.data.test_fraction:g})"
        )
    if carves_val(records):
        return (
            f"split column {cfg.data.split_column!r}; it has no val rows, so val is carved from "
            f"its train rows (stratified, data.val_fraction {cfg.data.val_fraction:g})"
        )
    return f"split column {cfg.data.split_column!r}"


def run_validate(cfg: Config, progress: bool = True) -> tuple[list[Record], list[str]]:
    """Validate the metadata, assign splits, write the data report. Returns (records, taxonomy).

    Images keep the split an earlier validation of this run gave them (``split_ledger.json``):
    new images fill their class's quotas, so data added later never moves an image between splits.
    Each file's check is remembered in the run's ``validation/`` record: a rerun reads only the
    files that changed. Under torchrun every rank checks its share of the files; rank 0 assigns
    splits and writes the outputs, the other ranks read them."""
    rank, world = rank_world()
    if world == 1:
        return _validate(cfg, progress, rank, world)
    with _process_group(cfg):
        return _validate(cfg, progress and rank == 0, rank, world)


@paused_gc()  # splits and the report: more objects per row
def _validate(cfg: Config, progress: bool, rank: int, world: int) -> tuple[list[Record], list[str]]:
    record_dir = Path(cfg.run_dir) / VALIDATION_RECORD
    if rank == 0:
        prepare_run_dir(cfg)
    ds = validate(cfg.data, progress=progress, record_dir=record_dir, rank=rank, world=world)
    taxonomy = on_rank0(lambda: _write_validation(cfg, ds)[1], rank=rank, world=world)
    if rank == 0:
        return ds.records, taxonomy
    return read_splits(Path(cfg.run_dir) / "splits.csv"), taxonomy


def _write_validation(cfg: Config, ds: Dataset) -> tuple[list[Record], list[str]]:
    """Splits assigned to ``ds``'s records (kept from earlier validations), then the data report,
    bad_rows.csv, splits.csv and the split ledger written."""
    run_dir = Path(cfg.run_dir)
    settings = split_settings(cfg)
    key = _settings_key(settings)
    ledger, last = read_split_ledger(run_dir)
    # a splits.csv without a ledger: taken as under these settings
    if last is None and "" in ledger:
        ledger[key] = {**ledger.pop(""), **ledger.get(key, {})}
        last = key
    previous = ledger.get(last, {}) if last is not None else {}  # what the run used until now
    settings_changed = last is not None and last != key
    source = _split_source(cfg, ds.records)
    # Under settings used before (e.g. a seed tried and then set back), images keep what they had
    # then.
    ds.records = assign_splits(
        ds.records,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
        cfg.seed,
        previous=ledger.get(key, {}),
    )
    known = [r for r in ds.records if r.sha256 in previous]
    moved = sum(previous[r.sha256] != r.split for r in known)
    ds.extra["data_settings"] = data_settings_hash(cfg)
    ds.extra["split_settings"] = settings
    ds.extra["splits"] = {
        "source": source,
        "kept": len(known) - moved,
        "moved": moved,
        "new": len(ds.records) - len(known),
        "counts": {s: sum(r.split == s for r in ds.records) for s in ("train", "val", "test")},
    }
    # a run that stops below must not leave usable splits
    (run_dir / "splits.csv").unlink(missing_ok=True)
    (run_dir / FAILURES_FILE).unlink(missing_ok=True)  # about the previous validation's images
    report = write_report(ds, run_dir)
    for line in summary_lines(report, ds.problems):
        log.info(line)
    if moved:
        before = json.loads(last) if settings_changed else {}
        why = (
            "the split settings changed ("
            + ", ".join(
                f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v
            )
            + ")"
            if settings_changed
            else f"the split column {cfg.data.split_column!r} now says so"
        )
        log.warning(
            f"validate: {moved} of {len(known)} previously assigned images changed split: {why}. "
            f"Checkpoints "
            "trained before saw the old splits: evaluate and train --resume refuse them where a "
            "training image is now in the evaluated split"
        )
    if ds.problems and cfg.data.on_bad_rows == "error":
        p = ds.problems[0]
        raise DataError(
            f"{len(ds.problems)} bad rows in {ds.source}; first: row {p.row} {p.path!r}: {p.kind} "
            f"({p.detail})",
            fix=f"fix the rows listed in {run_dir / 'bad_rows.csv'}, or set data.on_bad_rows: skip",
        )
    if not ds.records:
        raise DataError(
            f"no usable rows in {ds.source}",
            fix=f"see {run_dir / 'bad_rows.csv'} for why each row was rejected",
        )
    write_splits(ds.records, run_dir / "splits.csv")
    # Every image ever assigned stays in the ledger: one removed and added back gets its old split.
    ledger[key] = {**ledger.get(key, {}), **{r.sha256: r.split for r in ds.records}}
    atomic_write_text(run_dir / SPLIT_LEDGER, json.dumps({"last": key, "by_settings": ledger}))
    log.info(f"wrote {run_dir / 'data_report.json'}, bad_rows.csv, splits.csv")
    return ds.records, ds.taxonomy


def data_settings_hash(cfg: Config) -> str:
    """What decides the records and splits besides file contents: data settings and the seed."""
    blob = json.dumps({"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _data_sources(cfg: Config) -> list[Path]:
    """Files and folders whose change means validating again (folder layout: the class folders)."""
    paths = [Path(p) for p in (cfg.data.metadata, cfg.data.classes_file) if p is not None]
    if (
        cfg.data.metadata is None
        and cfg.data.image_root is not None
        and Path(cfg.data.image_root).is_dir()
    ):
        root = Path(cfg.data.image_root)
        paths += [root, *(p for p in root.iterdir() if p.is_dir())]
    return [p for p in paths if p.exists()]


def _validated_dataset(cfg: Config) -> tuple[list[Record], list[str]] | None:
    """(records, taxonomy) from the run's splits.csv and data_report.json, or None when they are
    absent or older than the metadata / classes file (validate again)."""
    splits, report_file = cfg.run_dir / "splits.csv", cfg.run_dir / "data_report.json"
    if splits.is_file() and report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        newer = [p for p in _data_sources(cfg) if p.stat().st_mtime > splits.stat().st_mtime]
        if report.get("data_settings") == data_settings_hash(cfg) and not newer:
            return read_splits(splits), report["taxonomy"]
        log.info("data or data settings changed since the last validate: validating again")
    return None


def load_dataset(cfg: Config) -> tuple[list[Record], list[str]]:
    """(records, taxonomy) from the run's splits.csv and data_report.json; validates first when
    they are absent or older than the metadata / classes file."""
    return _validated_dataset(cfg) or run_validate(cfg)


# ---------------------------------------------------------------------------------------
# extract


# Rank 0 validates (hashes every image) and compacts the cache while the other ranks wait in a
# barrier: the process group's timeout must cover that, not torch's 30 min default. 20 ms per
# image is a slow network disk's hash + header read (local SSD: ~2 ms).
BARRIER_BASE_S = 1800
BARRIER_PER_IMAGE_S = 0.02


def process_group_timeout(n_images: int) -> timedelta:
    return timedelta(seconds=BARRIER_BASE_S + BARRIER_PER_IMAGE_S * n_images)


@contextlib.contextmanager
def _process_group(cfg: Config) -> Iterator[None]:
    """Under torchrun, a gloo process group for the stage (unless one is up already: the caller's).

    gloo: the ranks exchange a few Python objects and barriers, on the host; each rank's GPU work
    never crosses ranks, so NCCL would add a CUDA stream per rank for nothing."""
    import torch.distributed as dist

    from samprobe.data.tables import read_rows

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=process_group_timeout(len(read_rows(cfg.data)[0])))
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def run_extract(cfg: Config, progress: bool = True) -> ExtractResult:
    """Features of every validated image into the cache. Under torchrun each rank takes a disjoint share."""
    # Fail on an unusable cache location before validating or loading any model.
    ensure_writable_dir(cfg.features.cache_dir, "features.cache_dir")
    rank, world = rank_world()
    if world == 1:
        return _extract(cfg, progress, rank, world)
    with _process_group(cfg):
        return _extract(cfg, progress, rank, world)


def _extract(cfg: Config, progress: bool, rank: int, world: int) -> ExtractResult:
    if world > 1:
        import torch.distributed as dist

        if rank != 0:
            log.setLevel(logging.WARNING)
            progress = False
        # validate (every rank its share of the files) unless rank 0 finds it done already
        if on_rank0(lambda: _validated_dataset(cfg) is None, rank=rank, world=world):
            run_validate(cfg, progress)
    records, _ = load_dataset(cfg)
    run_dir = prepare_run_dir(cfg)
    extractor = Extractor.from_config(cfg)
    if rank == 0:
        # cache prune keeps what this run's splits.csv lists
        register_run(cfg.features.cache_dir, run_dir)
    # Only rank 0 opens the index; under torchrun every rank writes through its own manifest.
    cache, plan = plan_ranks(
        extractor,
        records,
        lambda: extractor.open_cache(cfg.features.cache_dir),
        rank=rank,
        world=world,
    )
    with cache if cache is not None else contextlib.nullcontext():
        devices = [describe_device(extractor.device)]
        if world > 1:
            devices = [None] * world
            # the summary names every rank's GPU
            dist.all_gather_object(devices, describe_device(extractor.device))
        grid = (
            f" + {extractor.spatial}x{extractor.spatial} grid of "
            f"{extractor.backbone.grid_shape()[0]}-d tokens"
            if extractor.spatial
            else ""
        )
        where = (
            devices[0]
            if world == 1
            else f"{world} ranks: " + ", ".join(f"{r} on {d}" for r, d in enumerate(devices))
        )
        root = Path(cfg.features.cache_dir) / extractor.fingerprint
        log.info(
            f"extract: {len(records)} images ({plan.missing} to extract, "
            f"~{plan.need / 1e6:.1f} MB on disk, {plan.free / 1e9:.1f} GB free), "
            f"backbone {cfg.backbone.name} ({extractor.backbone.input_size}px, "
            f"{extractor.precision}, {where}), features {'+'.join(extractor.pooling)} = "
            f"{extractor.dim}-d{grid}, cache {root}"
        )
        sink = cache if world == 1 else ManifestWriter(root, extractor.dtype, rank)
        try:
            result = extractor.run(
                records,
                sink,
                batch_size=cfg.features.batch_size,
                num_workers=cfg.resolved_num_workers(),
                max_pixels=cfg.data.max_pixels,
                progress=progress,
                rank=rank,
                world=world,
                plan=(plan.todo, plan.cached),
            )
        finally:
            if isinstance(sink, ManifestWriter):
                sink.close()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (result.extracted, result.seconds, result.failures))
            result.extracted = sum(g[0] for g in gathered)
            result.seconds = max(g[1] for g in gathered)
            result.failures = [f for g in gathered for f in g[2]]
            dist.barrier()  # every rank's manifest is closed before rank 0 merges
        if cache is not None:
            if world > 1:
                cache.merge_manifests()
            cache.compact()
            cache.remove_orphans()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return result
    write_failures(run_dir, result.failures)
    rate = f", {result.extracted / result.seconds:.1f} img/s" if result.seconds else ""
    log.info(
        f"extract: {result.extracted} extracted, {result.cached} already cached, "
        f"{len(result.failures)} failed{rate}"
    )
    for r, reason in result.failures[:10]:
        log.info(f"  row {r.row} {r.path}: {reason}")
    if result.failures:
        log.info(
            f"  all failures: {run_dir / FAILURES_FILE} (left out of training, the run goes on)"
        )
    return result


def features_by_split(
    cfg: Config,
    extractor: Extractor,
    records: list[Record],
    spatial: int | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
    memory_budget: int | None = None,
    streamed_before: bool | None = None,
    stage: str = "train",
) -> dict[str, tuple[list[Record], np.ndarray | CachedRows]]:
    """(records, head inputs) per split: pooled [N, D], or with ``spatial`` the grids [N, S*S, C].
    ``memory_budget`` (bytes; train and evaluate): splits whose float32 features would not fit
    are ``CachedRows`` read from the cache's shard files as ``stage`` goes, not arrays;
    ``streamed_before``: the path of the run being resumed, kept where the budget allows."""
    failed = read_failed_keys(cfg.run_dir)
    usable = [r for r in records if r.sha256 not in failed and r.split in splits]
    with extractor.open_cache(cfg.features.cache_dir, readonly=True) as cache:
        register_run(cfg.features.cache_dir, cfg.run_dir)
        keys = (r.sha256 for r in usable)
        missing = cache.missing(keys, grid_array(spatial)) if spatial else cache.missing(keys)
        if missing and spatial:
            raise DataError(
                f"{len(missing)} of {len(usable)} images have no cached {spatial}x{spatial} token "
                f"grid for this backbone/pooling (the attentive head reads it)",
                fix=f"set features.spatial: {spatial} and run `samprobe extract -c CONFIG` "
                "(it resumes: the pooled features stay, only the missing grids are added)",
            )
        if missing:
            raise DataError(
                f"{len(missing)} of {len(usable)} images have no cached features for this "
                f"backbone/pooling",
                fix="run `samprobe extract -c CONFIG` first (it resumes where it stopped)",
            )
        by_split = {split: [r for r in usable if r.split == split] for split in splits}
        streamed = memory_budget is not None and _streams(
            cache, by_split, spatial, memory_budget, streamed_before, stage
        )
        return {
            split: (
                recs,
                cached_rows(
                    cache,
                    [r.sha256 for r in recs],
                    array=grid_array(spatial) if spatial else POOLED,
                    spatial=spatial,
                    budget=memory_budget,
                )
                if streamed and memory_budget is not None
                else load_head_inputs(cache, recs, spatial),
            )
            for split, recs in by_split.items()
        }


def _streams(
    cache: FeatureCache,
    by_split: dict[str, list[Record]],
    spatial: int | None,
    budget: int,
    streamed_before: bool | None,
    stage: str,
) -> bool:
    """Whether ``stage`` streams these splits' features (float32 over ``budget`` bytes, or the
    resumed run streamed); logs which path runs and why."""
    row_values = (cache.array_dim(grid_array(spatial)) if spatial else None) or cache.dim
    rows = sum(len(recs) for recs in by_split.values())
    need = in_memory_bytes(rows, row_values)
    what = f"{stage}: {rows} {'+'.join(by_split)} features need {need / 1e9:.2f} GB as float32"
    limit = f"train.memory_budget_gb {budget / 1e9:.2f}"
    reads = "in shuffled chunks (shuffle buffers" if stage == "train" else "in order (buffers"
    how = (
        f"streamed from the cache's shard files {reads} of {buffer_rows(budget, row_values)} rows)"
    )
    if need <= budget and not streamed_before:
        log.info(f"{what}, within {limit}: held in memory")
        return False
    if need <= budget:
        log.info(f"{what}, within {limit}, but last.pt was trained on them {how}: so is the rest")
    elif streamed_before is False:
        log.warning(
            f"{what}, over {limit}: {how}; last.pt was trained on them in memory, so the batch "
            "order from here on is not the one of an uninterrupted run"
        )
    else:
        log.info(f"{what}, over {limit}: {how}")
    return True


# ---------------------------------------------------------------------------------------
# train


def _write_sweep_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)


def run_train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train the sweep of heads; ``resume`` continues from checkpoints/last.pt bit for bit."""
    from samprobe.device import resolve_device, resolve_precision

    check_head_input(cfg)
    records, taxonomy = load_dataset(cfg)
    run_dir = prepare_run_dir(cfg)
    # fingerprint only: no encoder weights on the GPU
    extractor = Extractor.from_config(cfg, on_device=False)
    spatial = cfg.features.spatial if cfg.train.head == "attentive" else None
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.pt"
    if resume and not last.is_file():
        raise CheckpointError(
            f"--resume: {last} does not exist", fix="train without --resume to start this run"
        )
    ckpt = load_checkpoint(last) if resume else None
    data = features_by_split(
        cfg,
        extractor,
        records,
        spatial,
        ("train", "val"),
        memory_budget=memory_budget(cfg.train.memory_budget_gb),
        # a resumed run reads its batches as it did before the kill (the order depends on it)
        streamed_before=ckpt.train_state.get("streamed") if ckpt and ckpt.train_state else None,
    )
    (train_recs, x_train), (val_recs, x_val) = data["train"], data["val"]
    mapping = ClassMapping.from_train_labels(taxonomy, [r.label for r in train_recs])
    if not val_recs:
        raise TrainingError(
            f"no validation images in {run_dir / 'splits.csv'} ({len(train_recs)} train): the "
            f"heads would be selected on their training loss",
            fix="set data.val_fraction (e.g. 0.15; with a split column, val is carved from its "
            "train rows) and run validate again; a class needs 3 or more images to give one to val",
        )
    y_train = mapping.to_head([r.label for r in train_recs])
    y_val = mapping.to_head([r.label for r in val_recs])
    counts = np.bincount(y_train, minlength=mapping.num_active)
    weights = class_weights(counts, cfg.train.class_weights)
    val_untrained = len({r.label for r in val_recs} & set(mapping.inactive_names))
    device = resolve_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    trainer = SweepTrainer(
        x_train,
        y_train,
        x_val,
        y_val,
        class_weights=weights,
        cfg=cfg.train,
        seed=cfg.seed,
        val_untrained_classes=val_untrained,
        device=device,
        precision=precision,
    )
    log.info(
        f"train: {len(train_recs)} train / {len(val_recs)} val samples, "
        f"{count_of(mapping.num_active, 'active class')} of {len(taxonomy)}"
        + (f" (not trained: {', '.join(mapping.inactive_names)})" if mapping.inactive_names else "")
    )
    log.info(
        f"train: {count_of(len(trainer.grid), f'{cfg.train.head} head')} (lr x weight_decay) in "
        f"one pass, {device} {precision}"
        + (f", on the {spatial}x{spatial} token grid" if spatial else "")
    )
    margin = trainer.prune_margin
    if margin is not None and len(trainer.grid) > 1:
        floor = (
            f", raised from sweep.prune_margin {cfg.train.sweep.prune_margin:g} to the noise "
            f"floor of {cfg.train.monitor} on {len(val_recs)} validation images"
            if margin > cfg.train.sweep.prune_margin
            else ""
        )
        log.info(
            f"train: heads more than {margin:.4g} below the leading head are pruned after the "
            f"warm-up (epoch {trainer.warmup_end_epoch}){floor}"
        )
    if trainer.batch_size < cfg.train.batch_size:
        log.info(
            f"train: batches of {cfg.train.batch_size} grids run as "
            f"{trainer.accumulate // cfg.train.accumulate} "
            f"accumulated parts of {trainer.batch_size} (memory)"
        )

    train_images, val_images = ImageSet.of(train_recs), ImageSet.of(val_recs)
    # What every checkpoint of this run shares; each adds its head, epoch and metrics.
    run_ckpt = HeadCheckpoint(
        classes=mapping.to_dict(),
        class_weights=weights.tolist(),
        backbone=FeatureSource(
            config=cfg.backbone.model_dump(mode="json"),
            fingerprint=extractor.fingerprint,
            weights_sha256=extractor.backbone.identity().get("weights_sha256"),
            precision=extractor.precision,
            pooling=extractor.pooling,
            dtype=extractor.dtype,
            input_size=extractor.backbone.input_size,
        ),
        cache_dir=str(cfg.features.cache_dir),
        config=cfg.model_dump(mode="json"),
        train_images=train_images,
        val_images=val_images,
        head_spec={},
        head_state={},
        epoch=0,
        metrics={},
    )
    if ckpt is not None:
        check_resumable(
            ckpt,
            last,
            fingerprint=extractor.fingerprint,
            mapping=mapping,
            train_images=train_images,
            val_images=val_images,
        )
        assert ckpt.train_state is not None  # check_resumable refuses a checkpoint without it
        # The history lives in metrics.jsonl, not in last.pt (rewritten every epoch, it would grow
        # with it). The file may hold an epoch newer than last.pt (killed in between): last.pt is
        # the truth.
        done = ckpt.train_state["epoch"]
        history = [
            r for r in read_jsonl(run_dir / Tracker.METRICS_FILE) if r.get("epoch", 0) <= done
        ]
        trainer.load_state_dict(ckpt.train_state, history)
        atomic_write_text(
            run_dir / Tracker.METRICS_FILE, "".join(json.dumps(r) + "\n" for r in trainer.history)
        )
        log.info(f"train: resuming {last} after epoch {trainer.epoch}")

    tracker = Tracker(cfg, run_dir, fresh=not resume).start(
        {"classes": mapping.to_dict(), "inactive_classes": mapping.inactive_names}
    )

    def on_epoch(row: dict[str, Any]) -> None:
        tracker.log_epoch(row)
        for why, heads in row["stopped"].items():
            if heads:
                log.info(
                    f"  epoch {row['epoch']:4d}  {why} {len(heads)} head(s): "
                    + "; ".join(
                        f"lr {trainer.grid[h][0]:g} weight_decay {trainer.grid[h][1]:g} "
                        f"({trainer.status[h]})"
                        for h in heads
                    )
                )
        if row["epoch"] % 10 == 0 or row["epoch"] == 1:
            vb = row.get("val_balanced_accuracy")
            log.info(
                f"  epoch {row['epoch']:4d}  train_loss {row['train_loss']:.4f}"
                + (f"  val_bal_acc {vb:.4f}" if vb is not None else "")
                + f"  ({count_of(row['heads_training'], 'head')} training)"
            )

    def on_state(tr: SweepTrainer) -> None:
        state = run_ckpt.with_head(
            tr.model.spec(),
            tr.model.head_state(tr.best_index),
            epoch=tr.epoch,
            metrics=tr.history[-1] if tr.history else {},
            train_state=tr.state_dict(),
        )
        # every epoch, atomic: a kill loses at most one epoch
        save_checkpoint(state, ckpt_dir / "last.pt")
        if cfg.train.save_every and tr.epoch % cfg.train.save_every == 0:
            save_checkpoint(state, ckpt_dir / f"epoch_{tr.epoch:04d}.pt")
            rotate_epoch_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)

    if resume and trainer.done:
        log.info("train: last.pt is already at the end of training; writing best.pt again")
    try:
        result = trainer.run(on_epoch, on_state)
    except BaseException:
        tracker.finish()  # metrics.jsonl already holds every finished epoch
        raise
    best_row = dict(result.table[result.best_index])
    best = run_ckpt.with_head(
        result.head.spec,
        result.head.state_dict(),
        epoch=result.best_epoch,
        metrics=best_row,
        sweep=result.table,
    )
    save_checkpoint(best, ckpt_dir / "best.pt")
    _write_sweep_csv(run_dir / "sweep.csv", result.table)
    lr, wd = result.grid[result.best_index]
    mon = "val_loss" if cfg.train.monitor == "val_loss" else f"val_{cfg.train.monitor}"
    log.info(
        f"train: best head lr {lr:g} weight_decay {wd:g}, epoch {result.best_epoch} ({mon} "
        f"{best_row.get(mon, float('nan')):.4f}); "
        f"wrote {ckpt_dir / 'best.pt'}, {run_dir / 'sweep.csv'}"
    )
    tracker.log_summary(
        {**{f"best/{k}": v for k, v in best_row.items()}, "best_epoch": result.best_epoch}
    )
    write_run_report(run_dir, tracker)
    tracker.finish()
    return {
        "best_epoch": result.best_epoch,
        "metrics": best_row,
        "classes": mapping,
        "sweep": result.table,
        "best_setting": {"lr": lr, "weight_decay": wd},
    }


# ---------------------------------------------------------------------------------------
# evaluate


def run_evaluate(cfg: Config, checkpoint: Path, split: str = "test") -> dict[str, Any]:
    from samprobe.report import plot_confusion, write_confusion_csv

    ckpt = load_checkpoint(checkpoint)
    records, _ = load_dataset(cfg)
    run_dir = prepare_run_dir(cfg)
    # Cached features only: the checkpoint's resolved precision names them, whatever auto means on
    # this device.
    at = ckpt.backbone.precision if cfg.precision == "auto" else None
    extractor = Extractor.from_config(cfg, on_device=False, precision=at)
    log.info(
        f"evaluate: features at precision {extractor.precision}"
        + (" (the checkpoint's)" if at else "")
    )
    check_fingerprint(ckpt, extractor, "this config")
    # a split over train.memory_budget_gb is read from the shard files a buffer at a time
    recs, x = features_by_split(
        cfg,
        extractor,
        records,
        ckpt.spatial,
        (split,),
        memory_budget=memory_budget(cfg.train.memory_budget_gb),
        stage="evaluate",
    )[split]
    if not recs:
        raise DataError(
            f"split {split!r} has no samples",
            fix="choose --split train|val|test with samples (see splits.csv)",
        )
    check_no_training_images(ckpt, checkpoint, split, recs)
    mapping = ckpt.mapping
    unknown = sorted({r.label for r in recs} - set(mapping.taxonomy))
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} are not in the checkpoint's taxonomy",
            fix="evaluate with the classes file the head was trained with",
        )
    topk, scores = predict_features(ckpt, x)
    y_true = mapping.taxonomy_index([r.label for r in recs])
    y_pred = topk[:, 0]
    taxonomy, active = list(mapping.taxonomy), list(mapping.active)
    metrics = {
        "split": split,
        "checkpoint": str(checkpoint),
        **classification_metrics(y_true, y_pred, taxonomy, active, topk),
        "not_trained_classes": mapping.inactive_names,
    }
    out, own_best = evaluation_dir(run_dir, checkpoint, split)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    rows = per_class_table(y_true, y_pred, taxonomy, active)
    with atomic_open(out / "per_class.csv", "w", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with atomic_open(
        out / "predictions.csv", "w", encoding="utf-8"
    ) as f:  # per image: the report's galleries
        w = csv.writer(f)
        w.writerow(["path", "label", "predicted", "score"])
        w.writerows(
            [r.path, r.label, taxonomy[p], round(float(sc), 6)]
            for r, p, sc in zip(recs, y_pred, scores[:, 0])
        )
    cm = confusion(y_true, y_pred, len(taxonomy))
    plot_confusion(cm, taxonomy, out / "confusion_matrix.png")
    write_confusion_csv(cm, taxonomy, out / "confusion_matrix.csv")
    log.info(
        f"evaluate ({split}, n={metrics['n']}): accuracy {metrics['accuracy']:.4f}, "
        f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 "
        f"{metrics['macro_f1']:.4f}; wrote {out}"
    )
    if own_best:  # report.html shows this run's own head only
        write_run_report(run_dir)
    return metrics


# ---------------------------------------------------------------------------------------
# stages that read the outputs above


def run_inspect(cfg: Config) -> dict[str, Any]:
    """Label issues, near-duplicates and outliers of the run's cached features (``inspection``)
    into ``inspect/``, then report.html; returns the summary."""
    from samprobe.inspection import inspect_features

    records, taxonomy = load_dataset(cfg)
    run_dir = prepare_run_dir(cfg)
    extractor = Extractor.from_config(cfg)

    def features(
        spatial: int | None, splits: Sequence[str]
    ) -> dict[str, tuple[list[Record], np.ndarray]]:
        return features_by_split(cfg, extractor, records, spatial, tuple(splits))

    summary = inspect_features(
        cfg,
        taxonomy=taxonomy,
        run_dir=run_dir,
        fingerprint=extractor.fingerprint,
        features=features,
    )
    write_run_report(run_dir)
    return summary


def run_export(cfg: Config, split: str, out: Path) -> Path:
    """``samprobe features export``: a split's cached features (``all``: every split) to ``out``."""
    from samprobe.export import check_export_path, export_features

    check_export_path(out, split)  # before validating or reading the cache
    records, _ = load_dataset(cfg)
    recs = records if split == "all" else [r for r in records if r.split == split]
    if not recs:
        raise DataError(
            f"split {split!r} has no samples",
            fix="choose --split train|val|test|all with samples (see splits.csv)",
        )
    failed = read_failed_keys(cfg.run_dir)
    kept = [r for r in recs if r.sha256 not in failed]
    if len(kept) < len(recs):
        log.info(
            f"export: {len(recs) - len(kept)} images that failed at extract are left out (see "
            f"{cfg.run_dir / FAILURES_FILE})"
        )
    return export_features(cfg, records=kept, split=split, out=out)
