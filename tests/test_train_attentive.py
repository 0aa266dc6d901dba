"""train.head attentive: the attentive probe over the cached token grid (features.spatial), from
the stacked sweep form to the CLI on real images with a tiny SAM encoder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers.digits_run import CLASSES, EMPTY_CLASS, write_digits_project
from helpers.resume_check import assert_resumes_bitwise
from helpers.sam_factory import write_official_checkpoint
from helpers.tolerance import close_after_rounding, magnitude, rounding_atol
from samprobe.cli import main
from samprobe.config import SweepConfig, TrainConfig, load_config
from samprobe.data.records import read_splits
from samprobe.errors import CheckpointError, ConfigError, TrainingError
from samprobe.features.extract import Extractor, load_grid
from samprobe.predict import Classifier, predict_features
from samprobe.train import heads
from samprobe.train.checkpoint import load_checkpoint
from samprobe.train.heads import AttentiveProbe, StackedAttentiveProbe
from samprobe.train.loop import SweepTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise-comparable CPU matmuls


def _cfg(**kw) -> TrainConfig:
    base = {
        "head": "attentive",
        "epochs": 3,
        "batch_size": 32,
        "patience": 100,
        "sweep": SweepConfig(lrs=[0.02, 0.06], weight_decays=[1e-4, 1e-2]),
    }
    return TrainConfig(**{**base, **kw})


def _marked_token_grids(
    n: int, T: int = 16, C: int = 16, K: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Grids [n, T, C] where every token looks like some class (a class centre plus noise), and
    only the token marked in channel 0, at a random place, carries the label: the mean over the
    tokens hardly tells the class; attending to the marked token does."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    centres = np.random.default_rng(99).normal(size=(K, C)) * 2
    centres[:, 0] = 0
    x = centres[rng.integers(0, K, (n, T))] + rng.normal(size=(n, T, C)) * 0.5
    pos = rng.integers(0, T, n)
    x[np.arange(n), pos] = centres[y] + rng.normal(size=(n, C)) * 0.5
    x[np.arange(n), pos, 0] = 4.0
    return x.astype(np.float32), y


# ---------------------------------------------------------------------------------------
# the stacked form is H single probes; the single probe is textbook attention


def _textbook(probe: AttentiveProbe, tokens: torch.Tensor) -> torch.Tensor:
    """The attentive probe written plainly: keys and values of every token, SDPA with the learned query."""
    N, T, C = tokens.shape
    A = probe.attn_heads
    kv = probe.norm((tokens - probe.mean) / probe.std)  # [N, T, C]
    k = probe.k(kv).view(N, T, A, -1).transpose(1, 2)  # [N, A, T, d]
    v = probe.v(kv).view(N, T, A, -1).transpose(1, 2)
    q = probe.query.view(1, A, 1, -1).expand(N, -1, -1, -1)  # [N, A, 1, d]
    pooled = F.scaled_dot_product_attention(q, k, v).reshape(N, C)
    return probe.fc(probe.out_norm(pooled))


def test_stacked_settings_equal_single_probes_equal_textbook_attention():
    gen = torch.Generator().manual_seed(0)
    model = StackedAttentiveProbe(3, 16, 5, spatial=2, attn_heads=4, generator=gen)
    # away from the init (unit norms, zero classifier), so every parameter matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(7, 4, 16, generator=gen) * 3 + 1  # [B, T, C] raw grids
    model.set_normalisation(x)
    model.eval()
    # Accumulations along the forward: normalisation and layer norm over C, keys / values over C,
    # softmax-weighted sum over the T tokens, output norm and classifier over C. Their size: the
    # normalised tokens and parameters are O(1)-O(10); the logits bound the products summed.
    terms = 5 * 16 + 4
    with torch.no_grad():
        stacked = model(x)  # [3, 7, 5]
        assert stacked.shape == (3, 7, 5)
        scale = magnitude(stacked, *model.parameters())
        torch.testing.assert_close(
            model(x, torch.tensor([2, 0])),
            stacked[[2, 0]],
            **close_after_rounding(torch.float32, terms=terms, scale=scale),
        )
        for h in range(3):
            single = model.to_head(h)
            assert isinstance(single, AttentiveProbe) and single.spec == model.spec()
            torch.testing.assert_close(
                single(x),
                stacked[h],
                **close_after_rounding(torch.float32, terms=terms, scale=scale),
            )
            # the factorised keys / values are the textbook computation, not an approximation
            exact = single.double()
            torch.testing.assert_close(
                exact(x.double()),
                _textbook(exact, x.double()),
                **close_after_rounding(torch.float64, terms=terms, scale=scale),
            )
    assert set(model.to_head(0).state_dict()) == set(AttentiveProbe(16, 5, 2, 4).state_dict())


# ---------------------------------------------------------------------------------------
# training through SweepTrainer


@pytest.mark.slow
def test_attentive_sweep_learns_what_mean_pooling_cannot():
    x, y = _marked_token_grids(480)
    res = SweepTrainer(
        x[:360], y[:360], x[360:], y[360:], class_weights=np.ones(3), cfg=_cfg(epochs=20), seed=0
    ).run()
    with torch.no_grad():
        acc = (res.head(torch.from_numpy(x[360:])).argmax(1).numpy() == y[360:]).mean()
    assert acc > 0.95  # chance is 1/3
    assert res.head.spec["kind"] == "attentive" and res.head.spec["spatial"] == 4
    pooled = x.mean(1)  # [N, C]: the same data through a linear head on the mean token
    lin = SweepTrainer(
        pooled[:360],
        y[:360],
        pooled[360:],
        y[360:],
        class_weights=np.ones(3),
        cfg=_cfg(head="linear", epochs=20),
        seed=0,
    ).run()
    assert max(r["best_balanced_accuracy"] for r in lin.table) < 0.7


def test_attentive_sweep_resumes_bitwise_and_checks_what_it_resumes():
    x, y = _marked_token_grids(120)
    cfg = _cfg(epochs=4, dropout=0.1)
    _, state = assert_resumes_bitwise(
        lambda: SweepTrainer(
            x[:90], y[:90], x[90:], y[90:], class_weights=np.ones(3), cfg=cfg, seed=5
        ),
        stop_after=2,
    )
    # linear heads on C-d pooled features have a mean of the same shape: the head spec tells them
    # apart
    pooled = x.mean(1)
    linear = SweepTrainer(
        pooled[:90],
        y[:90],
        pooled[90:],
        y[90:],
        class_weights=np.ones(3),
        cfg=_cfg(head="linear", epochs=4),
        seed=5,
    )
    with pytest.raises(
        CheckpointError,
        match=r"written for train.head attentive \(features.spatial 4\) heads, "
        r"this config trains train.head linear heads",
    ):
        linear.load_state_dict(state)
    with pytest.raises(
        TrainingError,
        match=r"train.head attentive trains on token grids \[N, S\*S, C\], got features of shape "
        r"\(90, 16\)",
    ):
        SweepTrainer(
            pooled[:90], y[:90], pooled[90:], y[90:], class_weights=np.ones(3), cfg=cfg, seed=5
        )


def test_large_grid_batches_run_as_accumulated_parts(monkeypatch):
    x, y = _marked_token_grids(100)
    ref = SweepTrainer(
        x, y, x[:0], y[:0], class_weights=np.ones(3), cfg=_cfg(batch_size=8, accumulate=4), seed=1
    )
    ref.run()
    # room for 8 grids of 16 x 16 per forward
    monkeypatch.setattr(heads, "STEP_ELEMENTS", 8 * 16 * 16)
    cut = SweepTrainer(
        x, y, x[:0], y[:0], class_weights=np.ones(3), cfg=_cfg(batch_size=32), seed=1
    )
    assert (cut.batch_size, cut.accumulate, cut.eval_batch) == (8, 4, 8)
    cut.run()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, cut.model.state_dict()[k]), k


# ---------------------------------------------------------------------------------------
# config


def test_attentive_without_spatial_is_a_config_error(tmp_path, capsys):
    cfg = write_digits_project(tmp_path, per_class=2)
    with pytest.raises(
        ConfigError, match="train.head is attentive but features.spatial is not set"
    ):
        load_config(cfg, ["train.head=attentive"])
    assert (
        load_config(cfg, ["train.head=attentive", "features.spatial=2"]).train.head == "attentive"
    )
    for command in ("validate", "train"):  # before any work: the run directory is not even created
        assert main([command, "-c", str(cfg), "--set", "train.head=attentive"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and "[SP100]" in err[0] and "set features.spatial (e.g. 8)" in err[0]
        ), err
        assert "only the grids are added" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# end to end on real images with a tiny SAM encoder


@pytest.mark.slow
def test_attentive_head_end_to_end_through_the_cli(tmp_path, capsys):
    ckpt = write_official_checkpoint(tmp_path / "weights" / "tiny.pth", "tiny", img_size=256)
    cfg = write_digits_project(tmp_path, per_class=16, epochs=6)
    raw = yaml.safe_load(cfg.read_text())
    raw["backbone"] = {"name": "sam", "checkpoint": str(ckpt), "img_size": 256}
    raw["features"]["dtype"] = "float16"
    raw["train"]["batch_size"] = 8
    cfg.write_text(yaml.safe_dump(raw))
    c = ["-c", str(cfg)]
    attentive = ["--set", "train.head=attentive", "--set", "features.spatial=4"]

    assert main(["extract", *c]) == 0  # pooled features only
    capsys.readouterr()
    assert main(["train", *c, *attentive]) == 2  # the grids are not in the cache yet
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "have no cached 4x4 token grid" in err[0]
        and "only the missing grids are added" in err[0]
    ), err
    assert main(["extract", *c, *attentive]) == 0
    assert main(["train", *c, *attentive]) == 0

    best_path = tmp_path / "run" / "checkpoints" / "best.pt"
    best = torch.load(best_path, weights_only=True)
    spec = best["head"]["spec"]
    assert spec == {
        "kind": "attentive",
        "in_dim": 256,
        "num_classes": 3,
        "spatial": 4,
        "attn_heads": 8,
        "dropout": 0.0,
    }
    assert best["head"]["state_dict"]["k.weight"].shape == (256, 256)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (
        last["train_state"]["model"]["wk"].shape == (8, 256, 256)
        and last["train_state"]["head_spec"] == spec
    )
    # --resume reads last.pt back (weights_only; two optimizer groups: no decay on norms, biases,
    # the query)
    assert main(["train", *c, *attentive, "--resume"]) == 0
    again = torch.load(best_path, weights_only=True)
    assert all(
        torch.equal(again["head"]["state_dict"][k], v)
        for k, v in best["head"]["state_dict"].items()
    )
    capsys.readouterr()
    # linear heads on the 256-d pooled features: same sweep, same dims
    assert main(["train", *c, "--resume"]) == 2
    assert (
        "last.pt was written for train.head attentive (features.spatial 4) heads, this config "
        "trains train.head linear heads" in capsys.readouterr().err
    )

    # evaluate reads the test grids from the cache; the checkpoint, not the config, says which grid
    assert main(["evaluate", *c, *attentive, "--checkpoint", str(best_path)]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    # features.spatial unset here
    assert main(["evaluate", *c, "--checkpoint", str(best_path)]) == 0
    assert (
        json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())["accuracy"]
        == metrics["accuracy"]
    )
    # 3 classes: chance is 1/3 (12 images: 9 gave 0.44 or 1.0 by the split drawn)
    assert metrics["n"] == 12 and metrics["balanced_accuracy"] > 0.5
    assert metrics["not_trained_classes"] == [EMPTY_CLASS]

    # predict: through the cache (CLI) and from pixels (Classifier.predict computes the grid) agree,
    # and both agree with the head on the cached test grids
    images = tmp_path / "data" / "images"
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(best_path),
                str(images),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with open(out, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 48 and all(r["label"] in CLASSES and not r["error"] for r in rows.values())
    clf = Classifier.load(best_path, device="cpu")
    test = [r for r in read_splits(tmp_path / "run" / "splits.csv") if r.split == "test"]
    preds = clf.predict([r.file for r in test], top_k=3)
    loaded = load_config(cfg, attentive[1::2])
    with Extractor.from_config(loaded).open_cache(loaded.features.cache_dir) as cache:
        idx, scores = predict_features(
            load_checkpoint(best_path), load_grid(cache, test, 4), top_k=3
        )
    for r, p, i, s in zip(test, preds, idx, scores):
        row = rows[Path(r.file).name]
        assert p.label == row["label"] == clf.mapping.taxonomy[i[0]], r.file
        # the CSV holds 6 decimals (half a unit of the last: 5e-7); a probability from the same
        # cached fp16
        # grid, through float32 sums over C = 256 channels and the 16 tokens, of products bounded by
        # the logits
        head_rounding = rounding_atol(torch.float32, terms=4 * 256 + 16, scale=1.0)
        assert p.score == pytest.approx(float(row["score"]), abs=5e-7 + head_rounding)
        assert p.score == pytest.approx(float(s[0]), abs=head_rounding)


def test_grid_statistics_sample_whole_images_not_grid_positions():
    # 2000 grids of 8x8 tokens (128k tokens, so statistics come from a sample): the left column
    # is 0, the rest 10. Sampling must cover every grid position (mean 8.75, not 0 or 10).
    grids = torch.full((2000, 64, 4), 10.0)
    grids[:, ::8] = 0.0
    probe = AttentiveProbe(4, 3, spatial=8, attn_heads=2)
    probe.set_normalisation(grids)
    torch.testing.assert_close(probe.mean, torch.full((4,), 8.75))
