"""Train / resume / evaluate through the pipeline and the CLI on real images (scikit-learn
digits, efficientnet_lite0 at 64 px, fp32, CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samprobe.cli import main
from samprobe.config import load_config
from samprobe.pipeline import run_evaluate, run_extract, run_train, run_validate

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = ["zero", "one", "two", "three", "four"]


# one thread, as the subprocesses: bitwise-comparable CPU matmuls; tiny tensors gain nothing from
# more.
# Slow: every test trains on the module's corpus, whose features take a real backbone to extract.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """126 real digit scans of 5 classes. 'four' has only val/test images; 'empty' is in the
    taxonomy with no image at all. Features are extracted once into a shared cache."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    (root / "images").mkdir()
    digits = load_digits()
    rows, per_class = [], dict.fromkeys(range(5), 0)
    for i, (img, t) in enumerate(zip(digits.images, digits.target)):
        t = int(t)
        if t > 4 or per_class[t] >= 30:
            continue
        k = per_class[t]
        per_class[t] += 1
        split = "val" if k in (0, 1, 2) else "test" if k in (3, 4, 5) else "train"
        if NAMES[t] == "four" and split == "train":
            continue
        Image.fromarray(np.clip(np.rint(img * 255 / 16), 0, 255).astype(np.uint8), mode="L").save(
            root / "images" / f"d{i}.png"
        )
        rows.append((f"d{i}.png", NAMES[t], split))
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    (root / "classes.txt").write_text("\n".join(["empty", *NAMES]) + "\n")
    (root / "base.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        device: cpu
        precision: fp32
        data: {metadata: metadata.csv, image_root: images, classes_file: classes.txt, split_column: split}
        backbone: {name: efficientnet_lite0, img_size: 64}
        features: {cache_dir: cache, dtype: float32, batch_size: 32, num_workers: 0}
        train: {epochs: 8, batch_size: 8, patience: 100, warmup_epochs: 1}
        """)
    )
    cfg = load_config(root / "base.yaml", [f"run_dir={root / 'extract_run'}"])
    run_validate(cfg)
    run_extract(cfg)
    return root


def _cfg(corpus: Path, run: str):
    return corpus / "base.yaml", [f"run_dir={corpus / run}"]


def test_train_evaluate_end_to_end(corpus):
    path, sets = _cfg(corpus, "e2e")
    assert main(["train", "-c", str(path), *sum([["--set", s] for s in sets], [])]) == 0
    run = corpus / "e2e"
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert best["classes"]["active"] == [1, 2, 3, 4]  # zero..three; 'empty' and 'four' not trained
    assert best["head"]["state_dict"]["net.weight"].shape == (4, 1280)
    assert {"optimizer", "scheduler", "rng", "best"} <= set(
        last["train_state"]
    ) and "history" not in last["train_state"]
    assert best["backbone"]["fingerprint"] and best["config"]["train"]["epochs"] == 8
    with open(run / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert len(sweep) == 8 and sum(r["selected"] == "True" for r in sweep) == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8

    cfg = load_config(path, sets)
    m = run_evaluate(cfg, run / "checkpoints" / "best.pt", "test")
    assert (
        m["n"] == 15
        and m["n_not_trained"] == 3
        and set(m["not_trained_classes"]) == {"empty", "four"}
    )
    assert m["accuracy"] <= 12 / 15 and m["balanced_accuracy"] <= 4 / 5
    assert m["balanced_accuracy"] > 0.5  # the four trained digits are learnt from real features
    assert {"top1_accuracy", "top3_accuracy", "macro_f1"} <= set(m)
    with open(run / "eval" / "test" / "per_class.csv") as f:
        per_class = {r["class"]: r for r in csv.DictReader(f)}
    assert per_class["four"]["status"] == "not trained" and per_class["four"]["support"] == "3"
    assert float(per_class["four"]["recall"]) == 0.0 and per_class["empty"]["support"] == "0"
    assert (run / "eval" / "test" / "confusion_matrix.png").stat().st_size > 1000

    from samprobe.predict import Classifier

    clf = Classifier.load(run / "checkpoints" / "best.pt", device="cpu", precision="fp32")
    preds = clf.predict(
        [corpus / "images" / p for p in sorted(os.listdir(corpus / "images"))[:5]], top_k=3
    )
    assert all(p.label in {"zero", "one", "two", "three"} and len(p.top_k) == 3 for p in preds)


KILL_AFTER_3_EPOCHS = """
import os, signal, sys, torch
torch.set_num_threads(1)
import samprobe.pipeline as pl
from samprobe.config import load_config
saves = []
real_save = pl.save_checkpoint
def save_then_die(payload, path):
    real_save(payload, path)
    saves.append(path)
    if len(saves) == 3:  # last.pt of epoch 3 is on disk: die the hardest way, mid-run
        os.kill(os.getpid(), signal.SIGKILL)
pl.save_checkpoint = save_then_die
pl.run_train(load_config(sys.argv[1], sys.argv[2:]))
"""


@pytest.mark.parametrize("features", ["memory", "streamed"])
def test_killed_run_resumes_to_the_same_weights_and_metrics(corpus, features):
    # streamed: train + val features over train.memory_budget_gb, read from the shard files
    budget = ["train.memory_budget_gb=1e-6"] if features == "streamed" else []
    path, sets = _cfg(corpus, f"killed-{features}")
    sets += budget
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_3_EPOCHS, str(path), *sets],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = corpus / f"killed-{features}"
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (killed / "checkpoints" / "best.pt").exists()

    cfg = load_config(path, sets)
    run_train(cfg, resume=True)
    full_path, full_sets = _cfg(corpus, f"uninterrupted-{features}")
    full_cfg = load_config(full_path, full_sets + budget)
    run_train(full_cfg)

    a = torch.load(killed / "checkpoints" / "best.pt", weights_only=True)
    b = torch.load(
        corpus / f"uninterrupted-{features}" / "checkpoints" / "best.pt", weights_only=True
    )
    for k, v in b["head"]["state_dict"].items():
        assert torch.equal(a["head"]["state_dict"][k], v), k
    la = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    lb = torch.load(
        corpus / f"uninterrupted-{features}" / "checkpoints" / "last.pt", weights_only=True
    )["train_state"]
    for k, v in lb["model"].items():
        assert torch.equal(la["model"][k], v), k
    assert la["streamed"] is lb["streamed"] is (features == "streamed")
    assert a["metrics"] == b["metrics"] and a["sweep"] == b["sweep"]
    assert (killed / "metrics.jsonl").read_text() == (
        corpus / f"uninterrupted-{features}" / "metrics.jsonl"
    ).read_text()
    assert (killed / "sweep.csv").read_text() == (
        corpus / f"uninterrupted-{features}" / "sweep.csv"
    ).read_text()


def test_resume_errors_are_user_errors(corpus, capsys):
    path, sets = _cfg(corpus, "never_trained")
    args = ["train", "-c", str(path), "--resume", *sum([["--set", s] for s in sets], [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "last.pt does not exist" in err and "train without --resume" in err

    # A run trained with another sweep grid cannot be resumed with this one.
    path, sets = _cfg(corpus, "grid_changed")
    assert (
        main(
            ["train", "-c", str(path), *sum([["--set", s] for s in [*sets, "train.epochs=1"]], [])]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "-c",
                str(path),
                "--resume",
                *sum([["--set", s] for s in [*sets, "train.sweep.lrs=[0.01]"]], []),
            ]
        )
        == 2
    )
    assert "sweep over 8 settings" in capsys.readouterr().err


def test_epoch_checkpoints_are_rotated(corpus):
    path, sets = _cfg(corpus, "rotated")
    cfg = load_config(
        path, [*sets, "train.epochs=5", "train.save_every=1", "train.keep_checkpoints=2"]
    )
    run_train(cfg)
    kept = sorted(p.name for p in (corpus / "rotated" / "checkpoints").glob("epoch_*.pt"))
    assert kept == ["epoch_0004.pt", "epoch_0005.pt"]
    assert (
        torch.load(corpus / "rotated" / "checkpoints" / "epoch_0004.pt", weights_only=True)[
            "train_state"
        ]["epoch"]
        == 4
    )


def test_out_of_memory_in_training_is_a_device_error_and_the_run_resumes(
    corpus, capsys, monkeypatch
):
    # The GPU runs out of memory in epoch 2 (injected: this machine has no GPU). The user gets
    # one line with the settings to change, and --resume continues from epoch 1's last.pt.
    from samprobe.train.loop import SweepTrainer

    calls = {"n": 0}
    real = SweepTrainer._train_steps

    def second_epoch_oom(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args)

    monkeypatch.setattr(SweepTrainer, "_train_steps", second_epoch_oom)
    path, sets = _cfg(corpus, "oom")
    args = ["train", "-c", str(path), *sum([["--set", s] for s in [*sets, "train.epochs=3"]], [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    # the rest: validate's progress bar
    [line] = [ln for ln in err.splitlines() if ln.startswith("samprobe: error")]
    assert (
        "[SP600]" in line and "out of memory on cpu in epoch 2" in line and "Traceback" not in err
    )
    assert "halve train.batch_size and double train.accumulate" in line
    assert torch.load(corpus / "oom" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(SweepTrainer, "_train_steps", real)
    assert main([*args, "--resume"]) == 0
    assert torch.load(corpus / "oom" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3
