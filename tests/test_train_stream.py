"""Training that streams: features read from the cache's shard files in shuffled chunks
(``train.stream.CachedRows``) train the same sweep as features in memory, resume bit for bit, and
the pipeline says which path runs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.digits_run import write_digits_project
from helpers.resume_check import assert_resumes_bitwise
from helpers.tolerance import close_after_rounding, magnitude, rounding_atol
from samprobe.config import SweepConfig, TrainConfig, load_config
from samprobe.errors import CacheError, ConfigError, TrainingError
from samprobe.features.cache import POOLED, FeatureCache
from samprobe.train.heads import STATS_SAMPLES
from samprobe.train.loop import SweepTrainer, evaluate_heads
from samprobe.train.stream import CachedRows, buffer_rows, memory_budget

# one thread: bitwise-comparable CPU matmuls between the runs compared
pytestmark = pytest.mark.usefixtures("one_thread")

DIM, CLASSES = 12, 4


def _blob_cache(root: Path, n: int = 900, seed: int = 0) -> tuple[FeatureCache, np.ndarray, list]:
    """A cache of ``n`` fp16 features (class mean + noise, an offset and scale per dimension) in
    shards of 200 rows, train / val / test rows interleaved as extraction leaves them. Returns
    (cache, labels, split per row)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    means = rng.normal(size=(CLASSES, DIM)) * 1.5
    x = (means[labels] + rng.normal(size=(n, DIM))) * rng.uniform(0.5, 3, DIM) + 4
    split = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15])
    cache = FeatureCache(root, "fp", DIM, "float16")
    keys = [f"{i:064x}" for i in range(n)]
    for a in range(0, n, 200):
        cache.put(keys[a : a + 200], x[a : a + 200].astype(np.float16))
    return cache, labels, list(split)


def _rows(cache: FeatureCache, split: list, which: str, **kw) -> tuple[list[str], CachedRows]:
    keys = [f"{i:064x}" for i, s in enumerate(split) if s == which]
    opts = {"buffer_rows": 150, "chunk_rows": 64, **kw}
    return keys, CachedRows(cache, keys, array=POOLED, row_shape=(DIM,), **opts)


def _cfg(**kw) -> TrainConfig:
    base = {
        "epochs": 6,
        "batch_size": 32,
        "patience": 50,
        "sweep": SweepConfig(lrs=[0.01, 0.5], weight_decays=[1e-4, 1e-1]),
    }
    return TrainConfig(**{**base, **kw})


def test_an_epoch_visits_every_row_once_in_shuffled_chunks(tmp_path):
    cache, _, split = _blob_cache(tmp_path)
    keys, rows = _rows(cache, split, "train")
    expected = torch.from_numpy(cache.get(keys))
    gen = torch.Generator().manual_seed(3)
    orders = []
    for _ in range(2):
        batches = list(rows.epoch(gen, 32))
        assert len(batches) == math.ceil(len(keys) / 32)
        assert all(len(p) == 32 for _, p in batches[:-1])
        for x, positions in batches:  # every batch holds the cached rows of its positions
            assert torch.equal(x, expected[positions])
        order = torch.cat([p for _, p in batches])
        assert sorted(order.tolist()) == list(range(len(keys)))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order every epoch
    # shuffled across chunks: a batch mixes rows of several shards, not one run of storage
    shard_of = torch.from_numpy(
        np.searchsorted(np.arange(0, 900, 200), [int(k, 16) for k in keys], side="right")
    )
    assert max(len(set(shard_of[p].tolist())) for _, p in batches) >= 3
    # the same generator state gives the same epoch (what resume relies on)
    again = torch.cat([p for _, p in rows.epoch(torch.Generator().manual_seed(3), 32)])
    assert torch.equal(again, orders[0])

    _, none = _rows(cache, split, "no such split")
    assert len(none) == none.chunks == 0
    assert not list(none.epoch(gen, 32)) and not list(none.in_storage_order(32))


def test_buffers_are_sized_from_the_budget():
    # one buffer takes a quarter of the budget as float32; never less than one chunk
    assert buffer_rows(4_000_000_000, 1000) == 250_000
    assert buffer_rows(1000, 1000) == 1024
    assert memory_budget(2.5) == 2_500_000_000
    assert 0 < memory_budget(None) < 2**50


def test_streamed_sweep_selects_the_in_memory_setting(tmp_path):
    cache, labels, split = _blob_cache(tmp_path)
    pick = {s: np.array([x == s for x in split]) for s in ("train", "val", "test")}
    (kt, xt), (kv, xv), (ks, xs) = (_rows(cache, split, s) for s in ("train", "val", "test"))
    y = {s: labels[pick[s]] for s in pick}
    cfg = _cfg()
    kw = {"class_weights": np.ones(CLASSES), "cfg": cfg, "seed": 1}
    memory = SweepTrainer(cache.get(kt), y["train"], cache.get(kv), y["val"], **kw)
    streamed = SweepTrainer(xt, y["train"], xv, y["val"], **kw)
    # standardised alike: the statistics come from the same strided rows
    assert torch.equal(memory.model.mean, streamed.model.mean)
    assert torch.equal(memory.model.std, streamed.model.std)
    a, b = memory.run(), streamed.run()
    assert a.best_index == b.best_index
    assert [r["status"] for r in a.table] == [r["status"] for r in b.table]
    # only the batch order differs: scores within a few validation images of each other
    assert abs(a.best_score - b.best_score) <= 3 / len(kv)
    # evaluating streamed features (in storage order) equals evaluating them in memory
    args = (torch.from_numpy(y["test"]), torch.ones(CLASSES))
    opts = {"num_untrained": 0, "device": torch.device("cpu"), "precision": "fp32"}
    on_disk = evaluate_heads(b.model, xs, *args, **opts)
    in_memory = evaluate_heads(b.model, torch.from_numpy(cache.get(ks)), *args, **opts)
    for k in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1"):
        assert torch.equal(on_disk[k], in_memory[k]), k
    # the loss: the same per-row terms summed in another order (and per-row logits of another
    # batch's GEMM blocking): float32 rounding apart
    torch.testing.assert_close(
        on_disk["val_loss"],
        in_memory["val_loss"],
        **close_after_rounding(
            torch.float32, terms=len(ks) + DIM + CLASSES, scale=magnitude(in_memory["val_loss"])
        ),
    )


def test_streamed_sweep_resumes_bitwise(tmp_path):
    cache, labels, split = _blob_cache(tmp_path, seed=2)
    y = {s: labels[[x == s for x in split]] for s in ("train", "val")}

    def make() -> SweepTrainer:
        (_, xt), (_, xv) = _rows(cache, split, "train"), _rows(cache, split, "val")
        cfg = _cfg(head="mlp", hidden=8, dropout=0.2)
        return SweepTrainer(
            xt, y["train"], xv, y["val"], class_weights=np.ones(CLASSES), cfg=cfg, seed=4
        )

    res, _ = assert_resumes_bitwise(make, stop_after=3)
    assert res.history[-1]["epoch"] == 6


def test_non_finite_streamed_features_stop_training(tmp_path):
    # more rows than the statistics sample (every 2nd row): an odd row is only read in an epoch
    n = 2 * STATS_SAMPLES + 2
    x = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float16)
    keys = [f"{i:064x}" for i in range(n)]
    cache = FeatureCache(tmp_path, "fp", DIM, "float16")
    cache.put(keys, x)
    for row, caught_at in ((n - 1, "epoch"), (n - 2, "start")):
        x[row, 3] = np.inf
        cache.put(keys[row : row + 1], x[row : row + 1])
        rows = CachedRows(cache, keys, array=POOLED, row_shape=(DIM,), buffer_rows=4096)
        with pytest.raises(TrainingError, match="NaN/inf"):
            trainer = SweepTrainer(
                rows, np.arange(n) % 2, x[:0], np.zeros(0, int), class_weights=np.ones(2),
                cfg=_cfg(epochs=1, batch_size=4096), seed=0,
            )  # fmt: skip
            assert caught_at == "epoch"  # the statistics' rows were finite
            trainer.run()


def test_a_corrupt_shard_is_refused_before_streaming(tmp_path):
    cache, _, split = _blob_cache(tmp_path)
    shard = next((cache.shard_dir).iterdir())
    with open(shard, "r+b") as f:
        f.write(b"\x00\x7c" * 8)  # fp16 inf bytes over the first values
    reopened = FeatureCache(tmp_path, "fp", DIM, "float16", readonly=True)
    with pytest.raises(CacheError, match="is corrupt"):
        _rows(reopened, split, "train")


def test_memory_budget_is_validated():
    assert TrainConfig(memory_budget_gb=0.5).memory_budget_gb == 0.5
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="memory_budget_gb"):
            TrainConfig(memory_budget_gb=bad)


def test_train_says_which_path_runs_and_streams_the_same_sweep(tmp_path, caplog):
    from samprobe.features.extract import Extractor
    from samprobe.pipeline import (
        features_by_split,
        load_dataset,
        run_evaluate,
        run_extract,
        run_train,
        run_validate,
    )

    path = write_digits_project(tmp_path, per_class=12, epochs=5)
    cfg = load_config(path)
    run_validate(cfg, progress=False)
    run_extract(cfg, progress=False)
    results = {}
    for name, budget in (("memory", None), ("stream", 1e-6)):
        sets = [f"run_dir={tmp_path / name}"]
        if budget:
            sets.append(f"train.memory_budget_gb={budget}")
        run_cfg = load_config(path, sets)
        run_validate(run_cfg, progress=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="samprobe"):
            results[name] = run_train(run_cfg)
        lines = [r.getMessage() for r in caplog.records if "as float32" in r.getMessage()]
        assert len(lines) == 1, lines
        assert ("streamed from the cache's shard files" in lines[0]) == (name == "stream")
        assert ("held in memory" in lines[0]) == (name == "memory")
        assert (tmp_path / name / "sweep.csv").is_file()
        metrics = run_evaluate(run_cfg, tmp_path / name / "checkpoints" / "best.pt")
        results[name]["test"] = metrics["balanced_accuracy"]
    assert results["stream"]["best_setting"] == results["memory"]["best_setting"]
    assert abs(results["stream"]["test"] - results["memory"]["test"]) <= 1e-6
    assert torch.load(tmp_path / "stream" / "checkpoints" / "last.pt", weights_only=True)[
        "train_state"
    ]["streamed"]

    # a resumed run keeps the path its last.pt was trained on, even where the set now fits
    records, _ = load_dataset(cfg)
    extractor = Extractor.from_config(cfg, on_device=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="samprobe"):
        data = features_by_split(
            cfg, extractor, records, None, ("train", "val"), memory_budget=10**12,
            streamed_before=True,
        )  # fmt: skip
    assert isinstance(data["train"][1], CachedRows) and isinstance(data["val"][1], CachedRows)
    assert "but last.pt was trained on them streamed" in caplog.text


def test_config_error_names_the_budget(tmp_path):
    path = tmp_path / "samprobe.yaml"
    path.write_text("train:\n  memory_budget_gb: 4\n", encoding="utf-8")
    assert load_config(path).train.memory_budget_gb == 4
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        load_config(path, ["train.memory_budget_gb=-2"])


_VALIDATION_GROWTH = """
import json, sys
import numpy as np, torch
from samprobe.features.cache import POOLED, FeatureCache
from samprobe.train.heads import StackedHeads
from samprobe.train.loop import evaluate_heads
from samprobe.train.stream import CachedRows

root, n, heads, classes, rows = Path(sys.argv[1]), *map(int, sys.argv[2:])
keys = json.loads((root / "keys.json").read_text())
cache = FeatureCache(root / "cache", "fp", %(dim)d, "float16", readonly=True)
# what any run has done before it validates: freed a mapped block, which raises glibc's dynamic
# mmap threshold to its size (up to 32 MiB): blocks up to that size then come from the heap
freed = np.ones(33_000_000 // 8)
del freed
x = CachedRows(cache, keys, array=POOLED, row_shape=(%(dim)d,), buffer_rows=4096)
torch.manual_seed(0)
model = StackedHeads(heads, %(dim)d, classes)
torch.nn.init.normal_(model.w, std=0.01)
y = torch.from_numpy(np.arange(n) %% classes)
base = reset_peak()
streamed = evaluate_heads(model, x, y, torch.ones(classes), num_untrained=0,
                          device=torch.device("cpu"), precision="fp32", batch_size=rows,
                          heads=torch.arange(heads))
growth = status("VmHWM") - base
features = torch.from_numpy(cache.get(keys).astype(np.float32))
held = evaluate_heads(model, features, y, torch.ones(classes), num_untrained=0,
                      device=torch.device("cpu"), precision="fp32", batch_size=rows,
                      heads=torch.arange(heads))
# the largest term of a logit's sum (the model's standardisation is the identity here)
term_scale = float(model.standardize(features).abs().max() * model.w.abs().max())
print(json.dumps({"growth": growth, "term_scale": term_scale,
                  **{k: [streamed[k].tolist(), held[k].tolist()] for k in streamed}}))
"""


@pytest.mark.slow
def test_validating_a_streamed_split_holds_a_few_batches_not_the_split(tmp_path):
    """The validation of a streamed sweep (8 heads x 1000 classes, batches of 524 rows: logits of
    16.8 MB) grows resident memory by a few batches' temporaries, not with the split. Each batch's
    predictions used to be kept as a small tensor allocated after its logits: under glibc's
    dynamic mmap threshold the freed logits then stayed resident as heap holes beneath it (1259
    MB here without the fix, 88 MB with it; bench/scale.py's streamed sweep at 1.2 M rows peaked
    at 2.2, 3.2 and 3.8 GB in three runs of the same code, the growth in its validation)."""
    from helpers.digit_cache import DIM, build_cache
    from helpers.memory import run_measured

    n, heads, classes, rows = 60_000, 8, 1000, 524
    recs = build_cache(tmp_path / "cache", n, grid=False)
    (tmp_path / "keys.json").write_text(json.dumps([r.sha256 for r in recs]))
    m = run_measured(
        _VALIDATION_GROWTH % {"dim": DIM},
        *map(str, (tmp_path, n, heads, classes, rows)),
        default_allocator=True,
    )
    logits, buffers = heads * rows * classes * 4, 2 * 4096 * DIM * 4
    assert m["growth"] < 8 * logits + buffers, m["growth"] / 1e6
    for name in ("val_accuracy", "val_balanced_accuracy"):  # counts: the same either way
        assert m[name][0] == m[name][1], name
    # the same rows through the same heads: a row's loss moves by at most twice the largest
    # change of a logit, and the mean's accumulation over batches rounds at the largest row loss
    # (below log C + 2 max|logit|)
    logit_atol = rounding_atol(torch.float32, terms=DIM + 1, scale=m["term_scale"])
    row_loss = math.log(classes) + 2 * DIM * m["term_scale"]
    np.testing.assert_allclose(
        m["val_loss"][0],
        m["val_loss"][1],
        rtol=0,
        atol=2 * logit_atol + rounding_atol(torch.float32, terms=rows + n // rows, scale=row_loss),
    )


def test_reading_ahead_takes_turns_between_two_buffers(tmp_path):
    # six buffers of 150 rows read into the same two arrays: at most two are ever held, and each
    # yielded view holds the rows of its chunks until the next is asked for
    cache, _, split = _blob_cache(tmp_path)
    keys, rows = _rows(cache, split, "train")
    expected = torch.from_numpy(cache.get(keys))
    buffers = rows._buffers(list(range(rows.chunks)))
    assert len(buffers) >= 4
    storages, seen = set(), []
    for x, positions in rows._read_ahead(buffers):
        assert torch.equal(x, expected[positions])
        storages.add(x.untyped_storage().data_ptr())
        seen.append(positions)
    assert len(storages) == 2
    assert torch.equal(torch.cat(seen), torch.from_numpy(rows.storage_order))
