"""Training on synthetic feature tensors: class mapping properties, guards against bad targets and
features, the stacked sweep, per-head optimisers, early stopping, accumulation, resume (attentive
probe: test_train_attentive.py)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.resume_check import assert_resumes_bitwise
from helpers.tolerance import close_after_rounding, eps, magnitude, rounding_atol
from samprobe.config import SweepConfig, TrainConfig
from samprobe.errors import CheckpointError, TrainingError
from samprobe.train.classes import IGNORE, ClassMapping, class_weights
from samprobe.train.heads import StackedHeads, feature_stats
from samprobe.train.loop import SweepTrainer, _head_losses, evaluate_heads
from samprobe.train.metrics import classification_metrics, per_class_table
from samprobe.train.optim import StackedAdamW, StackedSGD

# one thread, as the subprocesses: bitwise-comparable CPU matmuls; tiny tensors gain nothing from
# more
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> TrainConfig:
    base = {
        "epochs": 3,
        "batch_size": 16,
        "patience": 50,
        "sweep": SweepConfig(lrs=[1e-3, 1e-2], weight_decays=[0.0]),
    }
    base.update(kw)
    return TrainConfig(**base)


def _blobs(labels: np.ndarray, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Features [N, dim]: a class-dependent mean plus noise (labels are any ints)."""
    rng = np.random.default_rng(seed)
    centres = (
        np.random.default_rng(1234).normal(size=(int(labels.max()) + 1 if len(labels) else 1, dim))
        * 3
    )
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32)


# --- property test over label distributions -----------------------------------------------

split_counts = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=7
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=split_counts,
    gaps=st.lists(st.integers(1, 40), min_size=7, max_size=7),
    scheme=st.sampled_from(["balanced", "sqrt", "effective_number", "none"]),
)
def test_any_label_distribution_trains_and_predicts_original_classes(counts, gaps, scheme):
    # Non-contiguous integer class names (e.g. "3", "17", "52"), some empty, some val/test only.
    names = [str(v) for v in np.cumsum(gaps[: len(counts)])]
    train = [n for n, (c, _, _) in zip(names, counts) for _ in range(c)]
    held = [n for n, (_, v, t) in zip(names, counts) for _ in range(v + t)]
    if len(set(train)) < 2:  # no class, or one class, to tell apart
        with pytest.raises(TrainingError):
            ClassMapping.from_train_labels(names, train)
        return
    mapping = ClassMapping.from_train_labels(names, train)
    active = {n for n, (c, _, _) in zip(names, counts) if c > 0}
    assert mapping.num_active == len(active) and set(mapping.active_names) == active

    y_train = mapping.to_head(train)
    assert y_train.min() >= 0 and y_train.max() < mapping.num_active
    w = class_weights(np.bincount(y_train, minlength=mapping.num_active), scheme)
    assert len(w) == mapping.num_active and np.isfinite(w).all() and (w > 0).all()

    y_held = mapping.to_head(held)
    untrained_held = [lab for lab in held if lab not in active]
    assert (y_held == IGNORE).sum() == len(untrained_held)  # never remapped to another class

    x_train = _blobs(mapping.taxonomy_index(train))
    x_held = _blobs(mapping.taxonomy_index(held), seed=1) if held else np.zeros((0, 8), np.float32)
    trainer = SweepTrainer(
        x_train,
        y_train,
        x_held,
        y_held,
        class_weights=w,
        cfg=_cfg(epochs=2),
        seed=0,
        val_untrained_classes=len(set(untrained_held)),
    )
    assert trainer.model.w.shape == (2, 8, mapping.num_active)  # head size = active classes
    res = trainer.run()
    assert all(math.isfinite(r["train_loss"]) for r in res.history)
    assert res.head.net.out_features == mapping.num_active
    if not held:
        return
    with torch.no_grad():
        pred_head = res.head(torch.from_numpy(x_held)).argmax(1).numpy()
    pred_names = mapping.to_names(pred_head)
    assert set(pred_names) <= active  # every prediction is an original, trained class name
    y_true = mapping.taxonomy_index(held)
    y_pred = mapping.taxonomy_index(pred_names)
    m = classification_metrics(y_true, y_pred, list(mapping.taxonomy), list(mapping.active))
    assert m["n_not_trained"] == len(untrained_held)
    # untrained samples are errors
    assert m["accuracy"] <= 1 - len(untrained_held) / len(held) + 1e-9
    table = {
        r["class"]: r
        for r in per_class_table(y_true, y_pred, list(mapping.taxonomy), list(mapping.active))
    }
    for lab in set(untrained_held):
        assert (
            table[lab]["status"] == "not trained"
            and table[lab]["recall"] == 0.0
            and table[lab]["support"] > 0
        )


# --- empty classes and out-of-range targets --------------------------------------------------------------


def test_seed_failure_modes_cannot_happen():
    # Taxonomy of 10 classes; training data only for classes 7 and 9 (zero-sample classes 0..6, 8).
    names = [f"c{i}" for i in range(10)]
    train = ["c7"] * 5 + ["c9"] * 3
    mapping = ClassMapping.from_train_labels(names, train)
    y = mapping.to_head(train)
    assert mapping.num_active == 2 and set(y.tolist()) == {0, 1}  # never an index >= active classes
    w = class_weights(np.bincount(y), "balanced")
    assert np.isfinite(w).all() and (w > 0).all()  # no zero/NaN weight for the empty classes
    # A held-out sample of an empty class is IGNORE, not silently class 0 (as a `dict.get(label, 0)`
    # lookup of the head index would make it).
    assert mapping.to_head(["c0", "c7"]).tolist() == [IGNORE, 0]

    # batch_size 1: every batch holds a single class; the weighted loss stays finite.
    x = _blobs(mapping.taxonomy_index(train))
    res = SweepTrainer(
        x, y, x[:0], y[:0], class_weights=w, cfg=_cfg(batch_size=1, epochs=2), seed=0
    ).run()
    assert all(
        math.isfinite(h["train_loss"]) for r in res.history for h in r["heads"] if h["training"]
    )
    assert all(h["training"] for h in res.history[0]["heads"])  # every head trains the first epoch
    one_class = _head_losses(
        torch.randn(2, 4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 3.0])
    )
    assert torch.isfinite(one_class).all()

    # Labels above the number of active classes fail here, naming the range, not deep in the loss
    # (cross_entropy's bare "IndexError: index out of range in self").
    with pytest.raises(TrainingError, match="head indices 0..1"):
        SweepTrainer(
            x, np.array([0, 1, 7, 9, 0, 1, 0, 1]), x[:0], y[:0], class_weights=w, cfg=_cfg(), seed=0
        )
    with pytest.raises(ValueError):
        class_weights(np.array([3, 0, 2]), "balanced")  # weights over empty classes are refused


# --- optimizer, sweep mechanics ------------------------------------------------------------


def test_stacked_adamw_matches_torch_adamw_per_head():
    torch.manual_seed(0)
    _assert_stacked_matches_per_head(
        torch.tensor([1e-3, 1e-2, 3e-2]),
        torch.tensor([0.0, 0.1, 0.5]),
        (3, 5, 4),
        lambda w, lrs, wds: StackedAdamW([w], lrs, wds),
        torch.optim.AdamW,
    )


def test_stacked_adam_l2_mode_matches_torch_adam_weight_decay():
    torch.manual_seed(1)
    # L2 in the gradient
    _assert_stacked_matches_per_head(
        torch.tensor([1e-3, 1e-2]),
        torch.tensor([1e-4, 0.3]),
        (2, 6, 3),
        lambda w, lrs, wds: StackedAdamW([w], lrs, wds, decoupled=False),
        torch.optim.Adam,
    )


def _assert_stacked_matches_per_head(lrs, wds, shape, make_stacked, ref_cls):
    """5 steps of a stacked optimizer over H heads == H torch optimizers, one per head."""
    w = torch.nn.Parameter(torch.randn(*shape))
    refs = [torch.nn.Parameter(w.detach()[h].clone()) for h in range(shape[0])]
    opt = make_stacked(w, lrs, wds)
    ref_opts = [
        ref_cls([refs[h]], lr=float(lrs[h]), weight_decay=float(wds[h])) for h in range(shape[0])
    ]
    for _ in range(5):
        g = torch.randn(*shape)
        w.grad = g.clone()
        opt.step()
        for h in range(shape[0]):
            refs[h].grad = g[h].clone()
            ref_opts[h].step()
    # elementwise updates only (no sums): 5 steps of about 8 roundings each, of values up to the
    # weights' or the gradients' size (randn: 1-4)
    tol = close_after_rounding(torch.float32, terms=5 * 8, scale=magnitude(w, *refs, 4.0))
    for h in range(shape[0]):
        torch.testing.assert_close(w.detach()[h], refs[h].detach(), **tol)


@pytest.mark.parametrize("decoupled", [False, True])
def test_stacked_sgd_matches_torch_sgd_nesterov_per_head(decoupled):
    torch.manual_seed(2)
    lrs, wds = torch.tensor([1e-2, 3e-2, 0.1]), torch.tensor([1e-4, 0.1, 0.5])
    w = torch.nn.Parameter(torch.randn(3, 6, 4))
    refs = [torch.nn.Parameter(w.detach()[h].clone()) for h in range(3)]
    opt = StackedSGD([w], lrs, wds, decoupled=decoupled)
    ref_opts = [
        torch.optim.SGD(
            [refs[h]],
            lr=float(lrs[h]),
            momentum=0.9,
            nesterov=True,
            weight_decay=0.0 if decoupled else float(wds[h]),
        )
        for h in range(3)
    ]
    for step in range(5):
        g = torch.randn(3, 6, 4)
        if step == 3:
            # head 1 stops: never moves again, even on a NaN grad
            opt.freeze(torch.tensor([False, True, False]))
            g[1] = float("nan")
        frozen_before = w.detach()[1].clone()
        w.grad = g.clone()
        opt.step()
        for h in (0, 2) if step >= 3 else range(3):
            if decoupled:
                # decoupled decay on the weights
                refs[h].data.mul_(1 - float(lrs[h]) * float(wds[h]))
            refs[h].grad = g[h].clone()
            ref_opts[h].step()
        if step >= 3:
            assert torch.equal(w.detach()[1], frozen_before)
    # as above, 6 steps
    tol = close_after_rounding(torch.float32, terms=6 * 8, scale=magnitude(w, *refs, 4.0))
    for h in (0, 2):
        torch.testing.assert_close(w.detach()[h], refs[h].detach(), **tol)


def test_sweep_picks_best_head_and_restores_its_best_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = _blobs(y, dim=16)
    cfg = _cfg(
        epochs=12,
        patience=3,
        batch_size=32,
        sweep=SweepConfig(lrs=[1e-5, 1e-3, 3e-2], weight_decays=[0.0, 1e-2]),
    )
    res = SweepTrainer(
        x[:300], y[:300], x[300:], y[300:], class_weights=np.ones(4), cfg=cfg, seed=0
    ).run()
    assert len(res.table) == 6 and sum(r["selected"] for r in res.table) == 1
    scores = [r["best_balanced_accuracy"] for r in res.table]
    # Lowest index on ties (zero-initialised linear heads separate these blobs after one step even
    # at lr 1e-5).
    assert res.best_index == int(np.argmax(scores)) and scores[res.best_index] == max(scores)
    # The selected head holds the weights of its best epoch: re-evaluating gives the recorded score.
    with torch.no_grad():
        pred = res.head(torch.from_numpy(x[300:])).argmax(1).numpy()
    from sklearn.metrics import balanced_accuracy_score

    assert balanced_accuracy_score(y[300:], pred) == pytest.approx(scores[res.best_index], abs=1e-6)
    assert any("early-stopped" in r["status"] for r in res.table) or all(
        r["best_epoch"] >= 10 for r in res.table
    )


def test_diverging_head_is_frozen_and_all_diverging_stops_with_training_error():
    y = np.arange(64) % 3
    x = _blobs(y) * 1e3
    cfg = _cfg(epochs=3, sweep=SweepConfig(lrs=[1e-3, 1e38], weight_decays=[0.0]), warmup_epochs=0)
    res = SweepTrainer(x, y, x, y, class_weights=np.ones(3), cfg=cfg, seed=0).run()
    assert res.table[1]["status"].startswith("diverged at epoch") and res.best_index == 0
    assert all(torch.isfinite(p).all() for p in res.head.parameters())
    # The diverged head leaves the others untouched: head 0 trains (weights, per-epoch training
    # loss) exactly as it does alone.
    alone = SweepTrainer(
        x,
        y,
        x,
        y,
        class_weights=np.ones(3),
        cfg=_cfg(epochs=3, sweep=SweepConfig(lrs=[1e-3], weight_decays=[0.0]), warmup_epochs=0),
        seed=0,
    ).run()
    # 3 epochs x 4 steps, each summing over the D = 8 features (logits) and the B = 16 samples
    # (gradient)
    terms = 12 * (8 + 16)
    torch.testing.assert_close(
        res.head.state_dict()["net.weight"],
        alone.head.state_dict()["net.weight"],
        **close_after_rounding(
            torch.float32, terms=terms, scale=magnitude(alone.head.state_dict()["net.weight"])
        ),
    )
    losses = [r["train_loss"] for r in alone.history]
    assert [r["heads"][0]["train_loss"] for r in res.history] == pytest.approx(
        losses, abs=rounding_atol(torch.float32, terms=terms, scale=max(losses))
    )
    with pytest.raises(TrainingError, match=r"epoch \d+, step \d+.*lr 1e\+38"):
        SweepTrainer(
            x,
            y,
            x,
            y,
            class_weights=np.ones(3),
            cfg=_cfg(sweep=SweepConfig(lrs=[1e38], weight_decays=[0.0]), warmup_epochs=0),
            seed=0,
        ).run()
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(TrainingError, match="NaN/inf"):
        SweepTrainer(bad, y, x, y, class_weights=np.ones(3), cfg=cfg, seed=0)


def test_gradient_accumulation_equals_the_larger_batch():
    y = np.arange(64) % 4
    x = _blobs(y)
    a = SweepTrainer(
        x, y, x[:0], y[:0], class_weights=np.ones(4), cfg=_cfg(batch_size=32, accumulate=1), seed=3
    ).run()
    b = SweepTrainer(
        x, y, x[:0], y[:0], class_weights=np.ones(4), cfg=_cfg(batch_size=16, accumulate=2), seed=3
    ).run()
    # the same gradient summed as 32 or as 16 + 16: per step sums over B = 32, D = 8 and C = 4; 3
    # epochs x 2 steps
    torch.testing.assert_close(
        a.model.w,
        b.model.w,
        **close_after_rounding(
            torch.float32, terms=6 * (32 + 8 + 4), scale=magnitude(a.model.w, 1.0)
        ),
    )


def test_resume_from_saved_state_is_bitwise_identical():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    x = _blobs(y)
    cfg = _cfg(epochs=6, head="mlp", hidden=16, dropout=0.2)
    _, state = assert_resumes_bitwise(
        lambda: SweepTrainer(
            x[:90], y[:90], x[90:], y[90:], class_weights=np.ones(3), cfg=cfg, seed=5
        ),
        stop_after=3,
    )

    other = SweepTrainer(
        x[:90],
        y[:90],
        x[90:],
        y[90:],
        class_weights=np.ones(3),
        cfg=_cfg(epochs=6, sweep=SweepConfig(lrs=[1e-3], weight_decays=[0.0])),
        seed=5,
    )
    with pytest.raises(CheckpointError, match="sweep over 2 settings"):
        other.load_state_dict(state)
    adam = SweepTrainer(
        x[:90],
        y[:90],
        x[90:],
        y[90:],
        class_weights=np.ones(3),
        cfg=_cfg(epochs=6, head="mlp", hidden=16, dropout=0.2, optimizer="adamw"),
        seed=5,
    )
    with pytest.raises(CheckpointError, match="train.optimizer sgd; this config has adamw"):
        adam.load_state_dict(state)


def test_validation_metrics_count_untrained_samples_as_errors():
    model = StackedHeads(1, 2, 2)
    with torch.no_grad():
        model.w.copy_(torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, IGNORE, IGNORE])  # two samples of one untrained class
    m = evaluate_heads(
        model, x, y, torch.ones(2), num_untrained=1, device=torch.device("cpu"), precision="fp32"
    )
    assert m["val_accuracy"].item() == pytest.approx(0.5)
    # recalls 1, 1, 0 (not trained)
    assert m["val_balanced_accuracy"].item() == pytest.approx(2 / 3)
    assert math.isfinite(m["val_loss"].item())


_EVALUATE_PEAK = """
import json, sys
import torch
from samprobe.train.classes import IGNORE
from samprobe.train.heads import StackedHeads
from samprobe.train.loop import evaluate_heads

n, d, c = int(sys.argv[1]), 16, int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
model = StackedHeads(2, d, c, generator=gen)
x = torch.randn(n, d, generator=gen) * 2 + 1
model.set_normalisation(x)
y = torch.randint(0, c, (n,), generator=gen)
y[::7] = IGNORE  # samples of an untrained class: errors in accuracy
opts = dict(num_untrained=1, device=torch.device("cpu"), precision="fp32", batch_size=256)
evaluate_heads(model, x[:64], y[:64], torch.ones(c), **opts)  # first-use allocations
before = reset_peak()
m = evaluate_heads(model, x, y, torch.ones(c), **opts)
growth = status("VmHWM") - before
with torch.no_grad():
    pred = model(x).argmax(-1)  # [H, N]
print(json.dumps({"growth": growth, "pred": pred.tolist(), "y": y.tolist(),
                  **{k: v.tolist() for k, v in m.items()}}))
"""


def test_validation_metrics_hold_nothing_of_samples_x_classes():
    """The per-class counts came from a product with a one-hot [N, C] (int64, then two float32
    copies): at 300 k val rows x 1000 classes that was 4.8 GB, bench/scale.py's peak RSS. The same
    metrics (scikit-learn's, on the heads' predictions) with a peak far below one such copy."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from helpers.memory import run_measured

    n, c = 20_000, 1000
    m = run_measured(_EVALUATE_PEAK, str(n), str(c), timeout=300)  # 4.3 MB with a fixed threshold
    # a float32 [N, C] is 80 MB (the one-hot path peaked at 338 MB here); measured 4.3 MB
    assert m["growth"] < n * c * 4 / 4, m["growth"]
    pred, truth = np.array(m["pred"]), np.array(m["y"])
    known = truth != IGNORE
    present = np.unique(truth[known])
    for h in range(2):
        assert m["val_accuracy"][h] == pytest.approx(accuracy_score(truth, pred[h]))
        recalls = balanced_accuracy_score(truth[known], pred[h][known]) * len(present)
        assert m["val_balanced_accuracy"][h] == pytest.approx(recalls / (len(present) + 1))
        # an untrained class's sample predicted as c is one of c's false positives
        f1 = f1_score(truth, pred[h], labels=present, average="macro") * len(present)
        assert m["val_macro_f1"][h] == pytest.approx(f1 / (len(present) + 1))


_VALIDATION_PEAK = """
import json
import numpy as np, torch
from samprobe.config import TrainConfig
from samprobe.train.loop import SweepTrainer, evaluate_heads

c, d = 1000, 16
rng = np.random.default_rng(0)
xt, xv = rng.normal(size=(2000, d)).astype(np.float32), rng.normal(size=(20000, d)).astype(np.float32)
yt, yv = np.arange(2000) % c, rng.integers(0, c, 20000)
trainer = SweepTrainer(xt, yt, xv, yv, class_weights=np.ones(c), cfg=TrainConfig(), seed=0)
opts = dict(num_untrained=0, device=trainer.device, precision=trainer.precision,
            batch_size=trainer.eval_batch)
evaluate_heads(trainer.model, trainer.xv[:64], trainer.yv[:64], trainer.weights, **opts)
before = reset_peak()
evaluate_heads(trainer.model, trainer.xv, trainer.yv, trainer.weights, **opts)  # as each epoch
print(json.dumps({"growth": status("VmHWM") - before, "heads": trainer.model.num_heads,
                  "batch": trainer.eval_batch}))
"""


def test_a_sweep_over_many_classes_validates_in_batches_of_bounded_logits():
    """Validation forwards of 4096 rows through 8 heads x 1000 classes peaked at 330 MB (the
    loss copies the logits [H, B, C] a few times): most of what kept bench/scale.py's streamed
    3 M-row sweep above its 3 GB. Batches are cut to 4 M logits (524 rows here): 42 MB."""
    from helpers.memory import run_measured

    m = run_measured(_VALIDATION_PEAK, timeout=300)
    assert m["heads"] == 8 and m["batch"] < 4096, m
    assert m["growth"] < 100e6, m  # 4096-row batches: 330 MB


# --- exporting heads -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_each_stacked_head_exports_to_an_identical_single_head(kind):
    gen = torch.Generator().manual_seed(0)
    model = StackedHeads(3, 12, 5, kind, hidden=7, generator=gen)
    x = torch.randn(20, 12) * 3 + 1
    model.set_normalisation(x)
    model.eval()
    with torch.no_grad():
        stacked = model(x)  # [3, 20, 5]
        for h in range(3):
            # normalisation, then sums over D = 12 and the hidden 7, of values up to the logits'
            # size
            torch.testing.assert_close(
                model.to_head(h)(x),
                stacked[h],
                **close_after_rounding(
                    torch.float32, terms=12 + 7 + 12, scale=magnitude(stacked, *model.parameters())
                ),
            )


def test_resume_checks_name_the_mismatch():
    import dataclasses

    from samprobe.data.records import Record
    from samprobe.train.checkpoint import FeatureSource, HeadCheckpoint, ImageSet, check_resumable

    def recs(*names: str) -> list[Record]:
        return [
            Record(i, n, n, "a", "train", hashlib.sha256(n.encode()).hexdigest())
            for i, n in enumerate(names)
        ]

    mapping = ClassMapping(("a", "b", "c"), (0, 2))
    train, val = ImageSet.of(recs("x", "y")), ImageSet.of(recs("z"))
    source = FeatureSource({"name": "sam"}, "f1", None, "fp32", ["mean"], "float16", 1024)
    ok = HeadCheckpoint(
        mapping.to_dict(),
        [1.0, 1.0],
        source,
        "cache",
        {},
        train,
        val,
        {},
        {},
        1,
        {},
        train_state={},
    )

    def check(ckpt=ok, fingerprint="f1", mapping=mapping, train_images=train, val_images=val):
        check_resumable(
            ckpt,
            "last.pt",
            fingerprint=fingerprint,
            mapping=mapping,
            train_images=train_images,
            val_images=val_images,
        )

    check()
    with pytest.raises(CheckpointError, match="no training state"):
        check(dataclasses.replace(ok, train_state=None))
    with pytest.raises(CheckpointError, match="features f1, this config gives f2"):
        check(fingerprint="f2")
    with pytest.raises(CheckpointError, match="other classes or splits"):
        check(mapping=ClassMapping(("a", "b", "c"), (0, 1)))
    with pytest.raises(
        CheckpointError, match=r"trained on 2 train images, .* has 3 \(2 of them the same\)"
    ):
        check(train_images=ImageSet.of(recs("x", "y", "w")))
    with pytest.raises(
        CheckpointError, match=r"trained on 1 val images, .* has 1 \(0 of them the same\)"
    ):
        check(val_images=ImageSet.of(recs("v")))
    with pytest.raises(TrainingError, match="no training samples"):
        SweepTrainer(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.int64),
            class_weights=np.ones(2),
            cfg=_cfg(),
            seed=0,
        )


def test_sweep_stops_when_the_best_head_stops_improving():
    y = np.arange(200) % 2
    x = _blobs(y, dim=4) * 3  # separable: validation balanced accuracy reaches 1.0 and stays
    cfg = _cfg(epochs=50, patience=2, sweep=SweepConfig(lrs=[1e-2, 1e-4], weight_decays=[0.0]))
    res = SweepTrainer(
        x[:150], y[:150], x[150:], y[150:], class_weights=np.ones(2), cfg=cfg, seed=0
    ).run()
    assert len(res.history) < 50 and res.table[res.best_index]["best_balanced_accuracy"] == 1.0
    assert any(
        "the best head did not improve" in r["status"] or "early-stopped" in r["status"]
        for r in res.table
    )
    assert all(not r["status"].startswith("finished") for r in res.table)


def test_head_losses_match_torch_cross_entropy_values_and_gradients():
    # The fused loss (hand-written backward) against F.cross_entropy(weight, ignore_index) per head.
    torch.manual_seed(3)
    H, B, C = 3, 17, 5
    logits = (torch.randn(H, B, C) * 4).requires_grad_()
    y = torch.randint(0, C, (B,))
    y[[2, 9]] = IGNORE  # samples of untrained classes: out of the loss, not class 0
    weights = torch.rand(C) + 0.1
    losses = _head_losses(logits, y, weights)
    (losses * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.stack(
        [
            torch.nn.functional.cross_entropy(ref_logits[h], y, weight=weights, ignore_index=IGNORE)
            for h in range(H)
        ]
    )
    (ref * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    # log-sum-exp over C, weighted mean over B: products of logits (|x| < 20) and weights (< 1.1)
    tol = close_after_rounding(torch.float32, terms=C + B, scale=magnitude(logits, 1.0) * 1.1)
    torch.testing.assert_close(losses, ref, **tol)
    torch.testing.assert_close(logits.grad, ref_logits.grad, **tol)
    assert (logits.grad[:, [2, 9]] == 0).all()
    # A batch of untrained-class samples only: zero loss and gradient, never NaN.
    none_known = _head_losses(torch.randn(H, 4, C), torch.full((4,), IGNORE), weights)
    assert torch.equal(none_known, torch.zeros(H))


def test_feature_stats_match_float64_reference():
    # A large mean with a small spread (float32 sums of raw values would lose the spread),
    # fp16 input as the cache stores it, and the ragged last chunk.
    rng = np.random.default_rng(0)
    x = (
        rng.normal(size=(1000, 7)) * [0.01, 1, 5, 0.5, 2, 1, 3] + [300, 0, -7, 1, 2, 50, 0]
    ).astype(np.float16)
    mean, std = feature_stats(torch.from_numpy(x))
    ref = x.astype(np.float64)
    # float32 sums of 256-row chunks of values shifted by the first row, then one rounding to
    # float32
    shifted = magnitude(ref - ref[:1])
    np.testing.assert_allclose(
        mean.numpy(),
        ref.mean(0),
        rtol=eps(np.float32),
        atol=rounding_atol(np.float32, terms=256, scale=shifted),
    )
    floor = 1e-3 + 1e-2 * ref.std(0).mean()
    np.testing.assert_allclose(std.numpy(), np.maximum(ref.std(0), floor), rtol=1e-3)


def test_training_flushes_subnormals_and_restores_the_setting():
    from samprobe.train.loop import flush_denormals

    tiny = torch.tensor([1e-39])  # a float32 subnormal
    assert float(tiny * 1.0) != 0.0
    with flush_denormals():
        assert float(tiny * 1.0) == 0.0  # subnormal results are flushed while training
    assert float(tiny * 1.0) != 0.0  # and the process setting is restored afterwards


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_heads_left_after_pruning_train_exactly_as_alone(optimizer):
    # prune_margin 0 stops every head below the leader after epoch 1; the leader then trains in
    # a packed copy (its weights and optimizer state only). Its result must be the one it gets
    # when trained alone: per-head math, same batches, state carried through the packing.
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 120)
    x, (xv, yv) = _blobs(y), (_blobs(y[:40], seed=9), y[:40])
    w = class_weights(np.bincount(y), "balanced")
    lrs = [0.05, 0.001, 0.0003] if optimizer == "sgd" else [0.01, 1e-4, 3e-5]
    sweep = _cfg(
        epochs=4,
        optimizer=optimizer,
        monitor="val_loss",
        sweep=SweepConfig(lrs=lrs, weight_decays=[1e-3], prune_margin=0.0),
    )
    res = SweepTrainer(x, y, xv, yv, class_weights=w, cfg=sweep, seed=0).run()
    assert [row["heads_training"] for row in res.history][:2] == [1, 1]  # packed from epoch 2 on
    assert [h["status"].startswith("pruned at epoch 1") for h in res.table] == [False, True, True]
    alone_cfg = _cfg(
        epochs=4,
        optimizer=optimizer,
        monitor="val_loss",
        sweep=SweepConfig(lrs=[lrs[0]], weight_decays=[1e-3]),
    )
    alone = SweepTrainer(x, y, xv, yv, class_weights=w, cfg=alone_cfg, seed=0).run()
    assert res.best_index == 0 and res.best_epoch == alone.best_epoch
    # 4 epochs x 8 steps over B = 16 samples, D = 8 features and C = 3 classes (stacked vs packed vs
    # alone: other GEMM shapes), in values up to the weights' and normalised features' size
    terms = 32 * (16 + 8 + 3)
    for key, value in alone.head.state_dict().items():
        torch.testing.assert_close(
            res.head.state_dict()[key],
            value,
            **close_after_rounding(torch.float32, terms=terms, scale=magnitude(value, 1.0)),
        )
    last = alone.last_head.state_dict()["net.weight"]
    torch.testing.assert_close(
        res.last_head.state_dict()["net.weight"],
        last,
        **close_after_rounding(torch.float32, terms=terms, scale=magnitude(last, 1.0)),
    )


def test_all_finite_is_exact():
    from samprobe.train.stream import all_finite as _all_finite

    x = np.ones((50, 4), np.float32)
    assert _all_finite(x) and _all_finite(x[:0])
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[17, 2] = bad
        assert not _all_finite(y)
    huge = np.full((50, 4), 3e38, np.float32)  # finite values whose float32 sum overflows
    assert _all_finite(huge)


def test_last_live_heads_diverging_fall_back_to_a_head_that_stopped_earlier():
    # Head 0 was stopped earlier (pruned, say) with a finite best score; the last live head
    # then diverges. Training ends with head 0's best weights instead of failing the run.
    y = np.arange(60) % 3
    x = _blobs(y)
    trainer = SweepTrainer(x, y, x, y, class_weights=np.ones(3), cfg=_cfg(epochs=4), seed=0)
    trainer.run(until_epoch=1)
    trainer.alive[:] = torch.tensor([False, True])
    trainer._diverged(torch.tensor([False, True]), step=0)
    res = trainer.run()
    assert res.best_index == 0 and res.table[1]["status"].startswith("diverged at epoch 2")
    # With no head holding a finite score to fall back on, it is the TrainingError.
    fresh = SweepTrainer(x, y, x, y, class_weights=np.ones(3), cfg=_cfg(epochs=4), seed=0)
    with pytest.raises(TrainingError, match="for every head"):
        fresh._diverged(torch.tensor([True, True]), step=3)
