"""``samprobe inspect``: know the data before trusting a score.

From the cached features only (no image is decoded, no user file is changed):

- **label issues**: out-of-sample class probabilities of every train+val image by k-fold
  cross-fitting of the configured head, trained as the sweep trains (``SweepTrainer``; every
  fold, for every candidate setting, is one head of one batched pass, each head's loss masked to
  its own training rows and its early stopping on its held-out fold), then cleanlab's
  ``find_label_issues`` (``filter_by="prune_by_class"``) ranked by self-confidence;
- **near-duplicates** by cosine similarity of the pooled features, exhaustive (every pair is
  compared: blocked matrix products, no approximate index), kept where the pair stands out from
  both images' neighbourhoods (``duplicate_pairs``), within and across splits; a pair with one
  image in test and one in train/val is split **leakage**;
- **outliers**: mean cosine distance to the k nearest other images, above Q3 + c x IQR;
- **most confused class pairs** among the out-of-sample predictions.

Why no faiss: its exact index (IndexFlatIP) is the fp32 matrix product plus a heap; here the
product is screened in bf16 where ``precision: auto`` finds it fast, with a bound that keeps the
result exact (``nearest_neighbours``). Measured (faiss-cpu 1.15.1, the first 10k rows of
100k x 256, 1 thread, same run): IndexFlatIP 5.9 / 6.8 CPU s, ``nearest_neighbours`` 4.6 / 4.8 s,
so faiss would be one more compiled dependency for no gain in speed or exactness.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samprobe.config import Config, InspectConfig, TrainConfig
from samprobe.data.records import SPLITS, Record
from samprobe.io import atomic_open, atomic_write_text
from samprobe.train.classes import IGNORE, ClassMapping, class_weights
from samprobe.train.heads import rows_per_step

log = logging.getLogger("samprobe")

INSPECT_DIR = "inspect"
# (grid side or None, splits) -> {split: (records, head inputs)}
FeaturesBySplit = Callable[[int | None, Sequence[str]], dict[str, tuple[list[Record], np.ndarray]]]
SHOWN = 5  # first entries of each list printed on the console


# ---------------------------------------------------------------------------------------
# cross-fitting


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index [N] in 0..folds-1, stratified: each class's members are shuffled and dealt
    round-robin, starting where the previous class stopped, so fold sizes differ by at most one.
    A class with fewer members than folds is simply absent from some folds (no error)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return out


@dataclass
class CrossFit:
    probs: np.ndarray  # [N, C] out-of-sample class probabilities (head classes)
    fold: np.ndarray  # [N]
    setting: tuple[float, float]  # (lr, weight_decay) used
    seconds: float


def cross_fit(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    cfg: TrainConfig,
    *,
    folds: int,
    seed: int,
    settings: Sequence[tuple[float, float]],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> CrossFit:
    """Out-of-sample probabilities [N, C] of head targets ``y`` [N] (0..C-1) by ``folds``-fold
    cross-fitting: one ``SweepTrainer`` pass trains len(settings) x folds heads, head (s, f) on
    every row outside fold f. Heads train for ``cfg.epochs`` (or until their training loss stops
    improving for 2 epochs) with no early stopping on held-out rows, so no held-out label
    decides anything about the head that scores it; with several ``settings`` the one with the
    lowest held-out log loss is used (cross-validated selection: on the digits with 5 % flipped
    labels, held-out log loss ranks the 8 default settings as cleanlab's precision does)."""
    from samprobe.train.loop import SweepTrainer

    t0 = time.perf_counter()
    folds = max(2, min(folds, len(y)))
    fold = fold_assignment(y, folds, seed)
    settings = [(float(lr), float(wd)) for lr, wd in settings]
    grid = [s for s in settings for _ in range(folds)]  # head h: setting h // folds, fold h % folds
    head_fold = np.tile(np.arange(folds), len(settings))
    y_train = np.where(head_fold[:, None] == fold[None, :], IGNORE, y[None, :])  # [H, N]
    # Patience on a training-loss plateau, not a validation score; each head keeps its lowest-loss
    # state, so patience only adds epochs after it: on the digits (bench/inspect.py, 3 seeds) 5
    # epochs found the same issues as 15 in 1.5-3x less time, and 3 gave bitwise the same
    # probabilities as 5 in 16 epochs instead of 18; 2 found the same issues as 3 on 10 flip seeds
    # (precision 0.712, recall 0.922) in 14-15 epochs instead of 15-16 (1.36-1.42 against 1.73 CPU
    # s for the 10, same run).
    cfg = cfg.model_copy(update={"patience": min(cfg.patience, 2)})
    no_val = np.zeros((0,) + x.shape[1:], dtype=np.float32)
    trainer = SweepTrainer(
        x,
        y_train,
        no_val,
        np.zeros((len(grid), 0), np.int64),
        class_weights=weights,
        cfg=cfg,
        seed=seed,
        val_untrained_classes=0,
        device=device,
        precision=precision,
        grid=grid,
        independent=True,
    )
    model = trainer.run().model.eval()
    per_setting = np.zeros((len(settings), len(y), len(weights)), dtype=np.float32)
    step = rows_per_step(int(np.prod(x.shape[1:])), 4096)  # grids: bounded activations
    with torch.no_grad():
        for f in range(folds):
            # fold f of every setting
            heads = torch.arange(f, len(grid), folds, device=trainer.device)
            rows = np.flatnonzero(fold == f)
            for i in range(0, len(rows), step):
                part = rows[i : i + step]
                xb = torch.from_numpy(np.ascontiguousarray(x[part], dtype=np.float32)).to(
                    trainer.device
                )
                per_setting[:, part] = torch.softmax(model(xb, heads).float(), dim=2).cpu().numpy()
    given = np.take_along_axis(
        per_setting, np.broadcast_to(y[None, :, None], (len(settings), len(y), 1)), 2
    )[..., 0]
    held_out_loss = -np.log(np.clip(given, 1e-12, None)).mean(1)  # [S]
    pick = int(np.argmin(held_out_loss))
    return CrossFit(per_setting[pick], fold, settings[pick], time.perf_counter() - t0)


LABEL_FILTER = "prune_by_class"
"""cleanlab's ``filter_by``: per given class, the confident joint's count of that class's
mislabelled images, taken by lowest self-confidence: the score the list is ranked by (the default,
"prune_by_noise_rate", takes them by another score, the margin). Kept for every data set; on the
digits of bench/inspect.py (3 flip seeds) it gives precision 0.74 / recall 0.92 with samprobe's
cross-fit, where the default gave 0.71 / 0.82 (and scikit-learn's LogisticRegression 0.72 / 0.93
with this filter, 0.69 / 0.86 with the default)."""


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of suspected label errors, most suspicious first (cleanlab ``LABEL_FILTER``, ranked by
    self-confidence)."""
    from cleanlab.filter import find_label_issues as cleanlab_find

    if probs.shape[1] < 2 or len(labels) < 2:
        return np.zeros(0, dtype=np.int64)
    # n_jobs=1: cleanlab's default forks a process pool per call, slower than the work here.
    return np.asarray(
        cleanlab_find(
            labels,
            probs,
            filter_by=LABEL_FILTER,
            return_indices_ranked_by="self_confidence",
            n_jobs=1,
        ),
        dtype=np.int64,
    )


# ---------------------------------------------------------------------------------------
# neighbours


CANDIDATES = 32
"""Columns per row re-scored in fp32 after the screening (see ``nearest_neighbours``). On the
100k x 256 features of bench/inspect.py (bf16, k 10, 1 thread, one run): 24 left 5,928 rows
uncertified (computed again in fp32; 35.0 CPU s in all), 32 left 125 (32.4 s)."""


def nearest_neighbours(
    x: np.ndarray,
    k: int,
    *,
    dtype: torch.dtype = torch.float32,
    block: int = 1024,
    tile: int = 4096,
    candidates: int = CANDIDATES,
    rows: range | None = None,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive cosine kNN of the rows of ``x`` [N, D] among each other (self excluded):
    (similarities [N, k] float32, descending; indices [N, k]); k is capped at N - 1. ``rows``
    (a range of row indices): the neighbours of those rows only, [len(rows), k]. Exact: the
    neighbours and similarities are those of the fp32 products of the normalised rows, whatever
    ``dtype`` screens them (ties in any order).

    Screening: blocks of ``block`` rows against tiles of ``tile`` columns in ``dtype`` (bf16 where
    the CPU/GPU runs it fast; a tile's product stays in cache: 1024 x 4096 tiles ran the bf16
    products 1.85x faster than 1024 x 20k rows, 1 thread) give each row its ``candidates`` best
    columns (``_row_candidates``), which are re-scored in fp32. Certificate: a screened score
    v is within ``eps_i + u |v|`` of the exact one (``_screen_error``), and every column left
    out screened at most ``e_i``; if ``e_i < s_k - 2 (eps_i + u max(|e_i|, |s_k|))`` (s_k: the
    k-th best screened candidate), no column left out can beat the k candidates screened >= s_k
    (their exact scores exceed every left-out column's), so the exact top k are among the
    candidates. A row without it (more than ``candidates`` columns that close to its k-th) is
    computed again in fp32 against every row (``_exact_rows``)."""
    n = len(x)
    k = min(k, n - 1)
    queries = range(n) if rows is None else rows
    if queries.step != 1 or not 0 <= queries.start <= queries.stop <= n:
        raise ValueError(f"rows must be a contiguous range within 0..{n}, got {rows}")
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    keep = min(max(candidates, k), n - 2)  # candidates per row; one more column must exist
    tiles = -(-n // tile)
    width = GROUPS * -(-n // (GROUPS * tiles))  # columns per tile, a multiple of GROUPS
    if keep < k or width // GROUPS < keep + 1:  # too few columns to screen: all in fp32
        return _exact_rows(t, torch.arange(queries.start, queries.stop, device=t.device), k)
    low = torch.zeros((tiles * width, t.shape[1]), dtype=dtype, device=t.device)
    low[:n] = t.to(dtype)  # zero rows pad the columns to whole tiles
    eps, u = _screen_error(t, low[:n])
    sims = np.empty((len(queries), k), np.float32)
    idx = np.empty((len(queries), k), np.int64)
    redo: list[torch.Tensor] = []
    b = min(block, len(queries))
    screened = torch.empty((b, len(low)), dtype=dtype, device=t.device)  # [B, N'] a block's row
    maxima = torch.empty((b, len(low) // GROUPS), dtype=dtype, device=t.device)
    product = torch.empty((b, width), dtype=dtype, device=t.device)  # one tile, in cache
    for i in range(queries.start, queries.stop, block):
        mine = torch.arange(i, min(i + block, queries.stop), device=t.device)
        s, g, p = screened[: len(mine)], maxima[: len(mine)], product[: len(mine)]
        for j in range(0, len(low), width):
            torch.mm(low[i : i + len(mine)], low[j : j + width].T, out=p)
            if j + width > n:
                p[:, max(0, n - j) :] = -3.0  # the padding: never a candidate
            own = mine[(mine >= j) & (mine < j + width)]
            p[own - i, own - j] = -2.0  # never its own neighbour
            _group_maxima(p, g[:, j // GROUPS : (j + width) // GROUPS])
            s[:, j : j + width] = p
        vals, cand, left_out = _row_candidates(s, g, keep + 1, width)
        s_k, top_left = vals[:, k - 1], torch.maximum(left_out, vals[:, keep])
        margin = 2 * (eps[mine] + u * torch.maximum(s_k.abs(), top_left.abs()))
        certain = top_left < s_k - margin
        cand = cand[:, :keep]
        their = t.index_select(0, cand.flatten()).view(*cand.shape, -1)  # [B, keep, D]
        exact = torch.einsum("bd,bkd->bk", t[i : i + len(mine)], their)  # fp32 re-score
        order = exact.topk(k, dim=1)
        out = slice(i - queries.start, i - queries.start + len(mine))
        sims[out] = order.values.cpu().numpy()
        idx[out] = torch.gather(cand, 1, order.indices).cpu().numpy()
        redo.append(mine[~certain])
    again = torch.cat(redo)
    if len(again):
        at = again.cpu().numpy() - queries.start
        sims[at], idx[at] = _exact_rows(t, again, k)
    return sims, idx


def _screen_error(t: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(eps [N], u): a screened product v of row i with any row is within eps_i + u |v| of the
    exact one, for unit rows ``t`` [N, D] (fp32) rounded to ``low``. With a = t_i, b = t_j and
    their roundings a + da, b + db: (a + da).(b + db) - a.b = da.b + a.db + da.db, so by
    Cauchy-Schwarz |...| <= r_i + r_j + r_i r_j <= r_i + R + r_i R (r = |da|, exact: each
    entry's rounding error is exact in fp32 (Sterbenz), its norm taken in fp64; R = max_j r_j).
    The product adds its fp32 accumulation, at most gamma_(D+1) sum |a_d b_d| <=
    gamma_(D+1) (1 + r_i)(1 + R) (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1;
    bf16 x bf16 products are exact in fp32), and the rounding of the result to ``low.dtype``:
    at most u |v| / (1 - u) (u: unit roundoff, 2^-8 for bf16, 2^-24 for fp32). 1e-6 covers the
    normalisation (|t_i| = 1 +- 1e-7) and flushed subnormal products."""
    r = (low.float() - t).double().norm(dim=1)
    big = float(r.max())
    u32 = 2.0**-24
    gamma = (t.shape[1] + 1) * u32 / (1 - (t.shape[1] + 1) * u32)
    eps = r + big + r * big + gamma * (1 + r) * (1 + big) + 1e-6
    u = float(torch.finfo(low.dtype).eps) / 2
    return eps.float(), u / (1 - u)


def _row_candidates(
    s: torch.Tensor, g: torch.Tensor, q: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [B, q] fp32 descending, columns [B, q], bound [B]): the q largest of each row of
    ``s`` [B, N'] and a bound on every column not listed beyond what the q-th value bounds.
    ``g`` [B, N' / GROUPS] holds the maxima of the strided column groups of each tile of
    ``width`` columns (column c of a tile in group c % (width / GROUPS)): the q groups with
    the largest maxima hold the q largest values, and every column outside them is <= the
    q-th largest group maximum (the bound). Reducing first: topk over 1/GROUPS of the columns."""
    w = width // GROUPS
    best = g.topk(q, dim=1)  # [B, q] groups
    first = (best.indices // w) * width + best.indices % w  # the group's first column
    cols = (first[:, None, :] + w * torch.arange(GROUPS, device=s.device)[None, :, None]).flatten(1)
    top = torch.gather(s, 1, cols).float().topk(q, dim=1)
    return top.values, torch.gather(cols, 1, top.indices), best.values[:, q - 1].float()


GROUPS = 8
"""Strided column groups of ``_row_candidates`` (2, 4, 8, 16, 32 measured: 8 fastest)."""


def _group_maxima(p: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` [B, W / GROUPS] = the elementwise maximum of the GROUPS column slices of ``p`` [B, W]
    (the strided groups of ``_row_candidates``), as GROUPS - 1 in-place maxima: the same values
    as amax over a [B, GROUPS, W / GROUPS] view, 8 % less time in the whole search (first 8k of
    100k x 256 rows, bf16, 1 thread: 3.0 vs 3.25 CPU s)."""
    w = p.shape[1] // GROUPS
    torch.maximum(p[:, :w], p[:, w : 2 * w], out=out)
    for r in range(2, GROUPS):
        torch.maximum(out, p[:, r * w : (r + 1) * w], out=out)


def _exact_rows(t: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 top k of ``rows`` (indices [R]) of the unit rows ``t`` [N, D] against every row, self
    excluded."""
    out_s, out_i = [np.zeros((0, k), np.float32)], [np.zeros((0, k), np.int64)]
    step = max(1, (1 << 24) // len(t))  # [step, N] fp32: at most 64 MB
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        s = t[part] @ t.T  # [P, N]
        s[torch.arange(len(part), device=s.device), part] = -math.inf
        top = s.topk(k, dim=1)
        out_s.append(top.values.cpu().numpy())
        out_i.append(top.indices.cpu().numpy())
    return np.concatenate(out_s), np.concatenate(out_i)


IDENTICAL_COSINE = 0.99
"""A candidate pair at or above this cosine is a near-duplicate whatever its neighbourhood: many
copies of one image (all at ~1.0) stand out from nothing but each other."""


def duplicate_pairs(
    sims: np.ndarray, idx: np.ndarray, *, cosine: float, margin: float, neighbours: int
) -> list[tuple[int, int, float, float]]:
    """(i, j, cosine, margin) with i < j, most similar first, for every neighbour pair at or above
    ``cosine`` that stands out from both images' neighbourhoods: its cosine minus the mean of the
    two images' mean cosine to their ``neighbours`` nearest (CSLS, Conneau et al. 2018, "Word
    translation without parallel data") is at least ``margin`` (0: no such test), or the cosine
    is at least ``IDENTICAL_COSINE``.

    Why a margin: a dense class of look-alikes (8x8 digit scans of one digit by different writers)
    reaches cosine 0.977 between distinct images, above a cropped JPEG copy of a photo (0.95), but
    there every image has many such neighbours (margin < 0.05 for all but 5 of the 1797 demo
    digits' pairs at cosine >= 0.94), while a copy stands out from the rest (margin >= 0.06 for the
    20 copies of bench/inspect.py); measured there, not tuned per data set."""
    if sims.shape[1] == 0:
        return []
    density = sims[:, : max(1, neighbours)].mean(1)  # [N] mean cosine to the nearest
    found: dict[tuple[int, int], tuple[float, float]] = {}
    for i, j in zip(*np.nonzero(sims >= cosine)):
        a, b = sorted((int(i), int(idx[i, j])))
        c = float(sims[i, j])
        m = c - float(density[a] + density[b]) / 2
        stands_out = margin <= 0 or m >= margin or c >= IDENTICAL_COSINE
        if stands_out and c > found.get((a, b), (-2.0, 0.0))[0]:
            found[(a, b)] = (c, m)
    return sorted(
        ((a, b, c, m) for (a, b), (c, m) in found.items()), key=lambda p: (-p[2], p[0], p[1])
    )


def configured_duplicate_pairs(
    sims: np.ndarray, idx: np.ndarray, icfg: InspectConfig
) -> list[tuple[int, int, float, float]]:
    """``duplicate_pairs`` with the thresholds of the ``inspect`` config."""
    return duplicate_pairs(
        sims,
        idx,
        cosine=icfg.duplicate_cosine,
        margin=icfg.duplicate_margin,
        neighbours=icfg.neighbours,
    )


def duplicate_groups(n: int, pairs: Sequence[tuple[int, int, float, float]]) -> np.ndarray:
    """Group id [N] (union of the pairs; -1 for an image in no pair), numbered by first member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, *_ in pairs:
        parent[root(a)] = root(b)
    group = np.full(n, -1, dtype=np.int64)
    ids: dict[int, int] = {}
    members = {i for a, b, *_ in pairs for i in (a, b)}
    for i in sorted(members):
        group[i] = ids.setdefault(root(i), len(ids))
    return group


def outlier_scores(sims: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the k nearest other images [N] (0 for a lone image: nothing to compare)."""
    return (1.0 - sims).mean(1) if sims.shape[1] else np.zeros(len(sims), np.float32)


def outlier_threshold(scores: np.ndarray, iqr_factor: float) -> float:
    q1, q3 = np.percentile(scores, [25, 75]) if len(scores) else (0.0, 0.0)
    return float(q3 + iqr_factor * (q3 - q1))


def feature_map(x: np.ndarray, seed: int) -> np.ndarray:
    """2-D coordinates [N, 2] of the pooled features for the report's map: PCA of the L2-normalised
    features (scikit-learn; t-SNE/UMAP separate clusters better but take ~10 s per 2k images here
    and UMAP would be one more dependency for a picture)."""
    from sklearn.decomposition import PCA

    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32)
    z = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    coords = PCA(n_components=2, random_state=seed).fit_transform(z)
    return np.nan_to_num(coords).astype(np.float32)


def confused_pairs(
    given: Sequence[str], predicted: Sequence[str], k: int = 10
) -> list[dict[str, Any]]:
    """Most frequent (given -> predicted) disagreements, with the share of the given class."""
    counts: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    for g, p in zip(given, predicted):
        totals[g] = totals.get(g, 0) + 1
        if g != p:
            counts[(g, p)] = counts.get((g, p), 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [
        {"given": g, "predicted": p, "count": c, "share": round(c / totals[g], 4)}
        for (g, p), c in top
    ]


# ---------------------------------------------------------------------------------------
# the command


def is_leak(split_a: str | None, split_b: str | None) -> bool:
    """A test image near-duplicating a train/val image: the test score is inflated."""
    return {split_a, split_b} in ({"test", "train"}, {"test", "val"})


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def setting_from_sweep(table: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """The sweep's (lr, weight_decay) with the lowest validation log loss (sweep.csv / best.pt rows),
    None without a finite one. Log loss, not the sweep's accuracy pick: cleanlab reads probabilities,
    and the accuracy pick is overconfident (demo digits: lr 0.5, weight decay 1e-4)."""
    rows = [r for r in table if r.get("val_loss") is not None and np.isfinite(float(r["val_loss"]))]
    if not rows:
        return None
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return float(best["lr"]), float(best["weight_decay"])


def _setting_candidates(cfg: Config, fingerprint: str) -> tuple[list[tuple[float, float]], str]:
    """The trained sweep's setting (``setting_from_sweep``) when this run trained this head kind on
    these features; else the whole sweep grid (the cross-fit picks by held-out log loss)."""
    from samprobe.train.checkpoint import load_checkpoint
    from samprobe.train.loop import sweep_grid

    best = cfg.run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        ckpt = load_checkpoint(best)
        setting = setting_from_sweep(ckpt.sweep or [])
        if (
            setting
            and ckpt.backbone.fingerprint == fingerprint
            and ckpt.head_spec["kind"] == cfg.train.head
        ):
            return [setting], f"the sweep's lowest validation log loss ({best})"
    grid = sweep_grid(cfg.train)
    return grid, f"cross-validated over the {len(grid)}-setting sweep grid (no matching {best})"


def inspect_features(
    cfg: Config, *, taxonomy: list[str], run_dir: Path, fingerprint: str, features: FeaturesBySplit
) -> dict[str, Any]:
    """Write inspect/label_issues.csv, near_duplicates.csv, outliers.csv, summary.json; returns the
    summary. ``features(spatial, splits)`` gives (records, head inputs) per split from the cache
    (``pipeline.features_by_split``); ``fingerprint`` names those features."""
    from samprobe.device import resolve_device, resolve_precision

    t0 = time.perf_counter()
    icfg = cfg.inspect
    out = run_dir / INSPECT_DIR
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    data = features(None, SPLITS)
    recs = [r for s in ("train", "val", "test") for r in data[s][0]]
    pooled = np.concatenate([data[s][1] for s in ("train", "val", "test")])

    # --- label issues on train + val (test labels stay unseen) ---
    spatial = cfg.features.spatial if cfg.train.head == "attentive" else None
    fit_data = features(spatial, ("train", "val")) if spatial else data
    fit_recs = fit_data["train"][0] + fit_data["val"][0]
    mapping = ClassMapping.from_train_labels(
        taxonomy, [r.label for r in data["train"][0]], min_classes=1
    )
    y_all = mapping.to_head([r.label for r in fit_recs])
    # val images of classes with no training image: no head class
    usable = np.flatnonzero(y_all != IGNORE)
    labelled = [fit_recs[i] for i in usable]
    y = y_all[usable]
    issues: list[list[Any]] = []
    label_summary: dict[str, Any] = {
        "scored": int(len(y)),
        "skipped_untrained_class": int(len(y_all) - len(usable)),
    }
    confused: list[dict[str, Any]] = []
    if mapping.num_active < 2 or len(y) < 2:
        label_summary["skipped"] = (
            "one class: nothing to confuse a label with"
            if mapping.num_active < 2
            else "fewer than 2 labelled images"
        )
    else:
        x_fit = np.concatenate([fit_data["train"][1], fit_data["val"][1]])[usable]
        weights = class_weights(
            np.bincount(y, minlength=mapping.num_active), cfg.train.class_weights
        )
        settings, why = _setting_candidates(cfg, fingerprint)
        fit = cross_fit(
            x_fit,
            y,
            weights,
            cfg.train,
            folds=icfg.folds,
            seed=cfg.seed,
            settings=settings,
            device=device,
            precision=precision,
        )
        found = find_label_issues(y, fit.probs)
        names = mapping.active_names
        predicted = fit.probs.argmax(1)
        for i in found:
            r = labelled[i]
            issues.append(
                [r.path, r.split, r.label, names[predicted[i]], round(float(fit.probs[i, y[i]]), 6)]
            )
        confused = confused_pairs([names[c] for c in y], [names[c] for c in predicted])
        label_summary.update(
            {
                "issues": len(issues),
                "folds": int(fit.fold.max()) + 1,
                "setting": {"lr": fit.setting[0], "weight_decay": fit.setting[1]},
                "setting_from": why,
                "out_of_sample_accuracy": round(float((predicted == y).mean()), 4),
                "seconds": round(fit.seconds, 2),
            }
        )
    _write_csv(
        out / "label_issues.csv",
        ["path", "split", "given_label", "suggested_label", "score"],
        issues,
    )

    # --- near-duplicates, leakage, outliers over every split ---
    t_nn = time.perf_counter()
    # GPUs: fp32 is plenty fast
    matmul = torch.bfloat16 if precision == "bf16" and device.type == "cpu" else torch.float32
    sims, idx = nearest_neighbours(pooled, max(icfg.neighbours, 10), dtype=matmul, device=device)
    pairs = configured_duplicate_pairs(sims, idx, icfg)
    groups = duplicate_groups(len(recs), pairs)
    dup_rows = [
        [
            recs[a].path,
            recs[a].split,
            recs[a].label,
            recs[b].path,
            recs[b].split,
            recs[b].label,
            round(c, 6),
            round(m, 6),
            int(groups[a]),
            is_leak(recs[a].split, recs[b].split),
        ]
        for a, b, c, m in pairs
    ]
    _write_csv(
        out / "near_duplicates.csv",
        [
            "path_a",
            "split_a",
            "label_a",
            "path_b",
            "split_b",
            "label_b",
            "cosine",
            "margin",
            "group",
            "leakage",
        ],
        dup_rows,
    )
    scores = outlier_scores(sims[:, : icfg.neighbours])
    threshold = outlier_threshold(scores, icfg.outlier_iqr)
    flagged = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > threshold]
    _write_csv(
        out / "outliers.csv",
        ["path", "split", "label", "knn_distance", "nearest_path"],
        [
            [
                recs[i].path,
                recs[i].split,
                recs[i].label,
                round(float(scores[i]), 6),
                recs[int(idx[i, 0])].path if idx.shape[1] else "",
            ]
            for i in flagged
        ],
    )
    nn_seconds = time.perf_counter() - t_nn

    _write_csv(
        out / "map2d.csv",
        ["path", "split", "label", "x", "y"],
        [
            [r.path, r.split, r.label, round(float(a), 5), round(float(b), 5)]
            for r, (a, b) in zip(recs, feature_map(pooled, cfg.seed))
        ],
    )

    leaks = [r for r in dup_rows if r[-1]]
    summary = {
        "images": len(recs),
        "label_issues": label_summary,
        "near_duplicates": {
            "pairs": len(dup_rows),
            "groups": int(groups.max()) + 1 if len(recs) else 0,
            "cosine_threshold": icfg.duplicate_cosine,
            "margin_threshold": icfg.duplicate_margin,
            "within_split": sum(r[1] == r[4] for r in dup_rows),
            "across_splits": sum(r[1] != r[4] for r in dup_rows),
            "leakage_pairs": len(leaks),
            "different_labels": sum(r[2] != r[5] for r in dup_rows),
        },
        "outliers": {
            "count": len(flagged),
            "neighbours": icfg.neighbours,
            "threshold": round(threshold, 6),
        },
        "most_confused": confused,
        "search": {
            "method": "exhaustive cosine kNN, blocked matrix products",
            "dtype": str(matmul).removeprefix("torch."),
            "seconds": round(nn_seconds, 2),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    for line in summary_lines(summary, issues, dup_rows, [recs[i] for i in flagged]):
        log.info(line)
    return summary


def counted(n: int, noun: str) -> str:
    """'1 pair', '1,234 pairs'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def summary_lines(
    summary: dict[str, Any], issues: list[list[Any]], dups: list[list[Any]], outliers: list[Record]
) -> list[str]:
    li, nd = summary["label_issues"], summary["near_duplicates"]
    lines = [f"inspect: {summary['images']} images"]
    if "skipped" in li:
        lines.append(f"  label issues: not searched ({li['skipped']})")
    else:
        lines.append(
            f"  label issues: {li['issues']} of {li['scored']} train+val images "
            f"({li['folds']}-fold cross-fit, lr {li['setting']['lr']:g} "
            f"weight_decay {li['setting']['weight_decay']:g}, "
            f"out-of-sample accuracy {li['out_of_sample_accuracy']:.3f})"
        )
        lines += [
            f"    {p} ({s}): given {g}, looks like {sg} (score {sc:.3f})"
            for p, s, g, sg, sc in issues[:SHOWN]
        ]
    lines.append(
        f"  near-duplicates: {counted(nd['pairs'], 'pair')} in {counted(nd['groups'], 'group')} "
        f"(cosine >= {nd['cosine_threshold']:g}, margin >= {nd['margin_threshold']:g}), "
        f"{nd['across_splits']} across splits, {nd['leakage_pairs']} train/val <-> test leakage"
    )
    shown = [d for d in dups if d[-1]][:SHOWN] or dups[:SHOWN]
    lines += [
        f"    {'LEAK ' if d[-1] else ''}{d[0]} ({d[1]}) ~ {d[3]} ({d[4]}), cosine {d[6]:.4f}"
        for d in shown
    ]
    lines.append(
        f"  outliers: {len(outliers)} (kNN distance > {summary['outliers']['threshold']:.4f})"
    )
    lines += [f"    {r.path} ({r.split}, {r.label})" for r in outliers[:SHOWN]]
    if summary["most_confused"]:
        lines.append(
            "  most confused: "
            + ", ".join(
                f"{c['given']} -> {c['predicted']} ({c['count']})"
                for c in summary["most_confused"][:SHOWN]
            )
        )
    lines.append(
        f"  wrote {INSPECT_DIR}/label_issues.csv, near_duplicates.csv, outliers.csv, map2d.csv, "
        f"summary.json ({summary['seconds']:.1f} s)"
    )
    return lines
