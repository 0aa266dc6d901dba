"""``evaluate`` on a split over ``train.memory_budget_gb`` streams it from the cache's shard files
(``train.stream.CachedRows``) a buffer at a time: the same metrics and predictions as with the
split in memory, and a resident memory that does not grow with the split.

Real data: a digits project through the whole pipeline (efficientnet_lite0 features), and for
the memory measure sklearn's digit scans in a feature cache (``helpers.digit_cache``)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.digit_cache import DIM, build_cache, digit_labels, digit_rows
from helpers.digits_run import write_digits_project
from helpers.memory import run_measured
from helpers.tolerance import close_after_rounding, rounding_atol
from samprobe.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _predictions(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_streams_a_split_over_the_budget_with_the_in_memory_results(tmp_path, caplog):
    from samprobe.pipeline import run_evaluate, run_extract, run_train, run_validate

    path = write_digits_project(tmp_path, per_class=12, epochs=3)
    cfg = load_config(path)
    run_validate(cfg, progress=False)
    run_extract(cfg, progress=False)
    run_train(cfg)
    best = cfg.run_dir / "checkpoints" / "best.pt"
    results = {}
    for name, sets in (("memory", []), ("stream", ["train.memory_budget_gb=1e-6"])):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="samprobe"):
            metrics = run_evaluate(load_config(path, sets), best)
        (line,) = [r.getMessage() for r in caplog.records if "as float32" in r.getMessage()]
        assert line.startswith("evaluate: ")
        assert ("streamed from the cache's shard files in order" in line) == (name == "stream")
        assert ("held in memory" in line) == (name == "memory")
        results[name] = (metrics, _predictions(cfg.run_dir / "eval" / "test"))
    (m_mem, p_mem), (m_stream, p_stream) = results["memory"], results["stream"]
    assert m_stream == m_mem and m_mem["n"] == len(p_mem) > 0
    assert [(p["path"], p["label"], p["predicted"]) for p in p_stream] == [
        (p["path"], p["label"], p["predicted"]) for p in p_mem
    ]
    # probabilities of the same cached features through the same linear head in other batches:
    # float32 rounding of the logits' sums over 1280 values apart, plus the CSV's 6 decimals
    np.testing.assert_allclose(
        [float(p["score"]) for p in p_stream],
        [float(p["score"]) for p in p_mem],
        rtol=0,
        atol=rounding_atol(torch.float32, terms=1280, scale=_logit_term_scale(cfg, best)) + 1e-6,
    )


def _logit_term_scale(cfg, best: Path) -> float:
    """The largest term of the best head's logit sums on the test features (|standardised value|
    x |weight|): the scale of their rounding."""
    from samprobe.features.extract import Extractor
    from samprobe.pipeline import features_by_split, load_dataset
    from samprobe.train.checkpoint import load_checkpoint
    from samprobe.train.heads import head_from_spec

    ckpt = load_checkpoint(best)
    head = head_from_spec(ckpt.head_spec, ckpt.head_state)
    records, _ = load_dataset(cfg)
    extractor = Extractor.from_config(cfg, on_device=False)
    x = features_by_split(cfg, extractor, records, None, ("test",))["test"][1]
    z = (torch.from_numpy(x) - head.mean) / head.std
    return float(z.abs().max() * head.net.weight.detach().abs().max())


# --- resident memory: the split held vs streamed, each in its own process --------------------

_EVALUATE_RSS = """
import json, sys
from pathlib import Path
import numpy as np, torch
from samprobe.features.cache import POOLED, FeatureCache
from samprobe.predict import predict_features
from samprobe.train.checkpoint import HeadCheckpoint
from samprobe.train.stream import cached_rows

root, how, budget, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keys = json.loads((root / "keys.json").read_text())[:n]
saved = torch.load(root / "head.pt", weights_only=True)
ckpt = HeadCheckpoint(saved["classes"], [], None, "", {}, None, None, saved["spec"],
                      saved["state"], 0, {})

with FeatureCache(root / "cache", "fp", %(dim)d, "float16", readonly=True) as cache:
    predict_features(ckpt, cache.get(keys[:64]))  # first-use allocations (kernels, arenas)
    before = reset_peak()
    # as run_evaluate reads a split: over the budget a CachedRows, else the float32 array
    if how == "stream":
        x = cached_rows(cache, keys, array=POOLED, spatial=None, budget=budget)
    else:
        x = cache.get(keys)
    idx, scores = predict_features(ckpt, x)
    growth = status("VmHWM") - before
np.save(root / f"{how}_{n}_idx.npy", idx)
np.save(root / f"{how}_{n}_scores.npy", scores)
print(json.dumps({"growth": growth}))
"""


def _nearest_mean_head(root: Path, n: int) -> float:
    """A linear head over the cache's digit rows: standardised class means as weights (a real
    classifier of the first digit of each row), saved as a checkpoint's head entry. Returns the
    largest term of its logits' sums (|standardised value| x |weight|), their rounding scale."""
    from samprobe.train.classes import ClassMapping
    from samprobe.train.heads import Head

    x, y = torch.from_numpy(digit_rows(n)), torch.from_numpy(digit_labels(n))
    head = Head(DIM, 10, "linear")
    head.set_normalisation(x)
    z = (x - head.mean) / head.std
    means = torch.stack([z[y == c].mean(0) for c in range(10)])
    state = {**head.state_dict(), "net.weight": means, "net.bias": -0.5 * (means**2).sum(1)}
    mapping = ClassMapping(tuple(str(c) for c in range(10)), tuple(range(10)))
    torch.save({"classes": mapping.to_dict(), "spec": head.spec, "state": state}, root / "head.pt")
    return float(z.abs().max() * means.abs().max())


def _growth(root: Path, how: str, budget: int, n: int) -> int:
    script = _EVALUATE_RSS % {"dim": DIM}
    return int(run_measured(script, str(root), how, str(budget), str(n))["growth"])


@pytest.mark.slow
def test_evaluate_memory_does_not_grow_with_a_streamed_split(tmp_path):
    small, large = 20_000, 80_000
    recs = build_cache(tmp_path / "cache", large, grid=False)
    (tmp_path / "keys.json").write_text(json.dumps([r.sha256 for r in recs]))
    term_scale = _nearest_mean_head(tmp_path, large)
    row = DIM * 4  # a row of the float32 array evaluate held
    budget = 8_000_000  # buffers of 1024 rows (2 MB as float32), two at a time
    held = _growth(tmp_path, "memory", budget, large)
    streamed = {n: _growth(tmp_path, "stream", budget, n) for n in (small, large)}
    assert held > large * row, held  # the measure sees the array (164 MB; 519 MB measured)
    # buffers, the top 5 per row and the rows' index: a quarter of the split (measured 21 MB)
    assert streamed[large] < large * row / 4, (streamed, held)
    # what stays per row (top 5: 60 B, the index: a few int64) is not its features: below a
    # tenth of them (measured 5.2 MB more for 60k more rows, 87 B a row)
    assert streamed[large] - streamed[small] < (large - small) * row / 10, streamed
    a = {p: np.load(tmp_path / f"memory_{large}_{p}.npy") for p in ("idx", "scores")}
    b = {p: np.load(tmp_path / f"stream_{large}_{p}.npy") for p in ("idx", "scores")}
    np.testing.assert_array_equal(a["idx"], b["idx"])
    # the same rows through the same head in other batches: float32 rounding of the logits apart
    # (a probability moves by at most the largest change of a logit)
    np.testing.assert_allclose(
        a["scores"],
        b["scores"],
        **close_after_rounding(torch.float32, terms=DIM + 10, scale=term_scale),
    )
    # a real classifier, not a constant: most rows get their first digit
    assert (b["idx"][:, 0] == digit_labels(large)).mean() > 0.5
