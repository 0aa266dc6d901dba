"""User errors found in review: each exits 2 (or raises a SamprobeError) with the fix, and stale
state is never reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers.digits import write_config, write_digits
from helpers.tolerance import close_after_storage, efficientnet_lite0_terms, magnitude
from samprobe.cli import main
from samprobe.config import load_config
from samprobe.errors import ConfigError, DataError
from samprobe.pipeline import load_dataset, run_validate


def test_fractions_leaving_nothing_to_train_are_rejected(digits_project: Path) -> None:
    with pytest.raises(ConfigError, match="nothing would be left to train on"):
        load_config(
            digits_project / "samprobe.yaml", ["data.val_fraction=0.5", "data.test_fraction=0.5"]
        )


def test_home_in_paths_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_config(tmp_path / "c.yaml", data={"metadata": "~/meta.csv"})
    assert load_config(tmp_path / "c.yaml").data.metadata == tmp_path / "meta.csv"


def test_init_on_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["init", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_corrupt_parquet_metadata_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_digits(tmp_path / "data", per_class=3, classes=(0, 1))
    (tmp_path / "data" / "meta.parquet").write_bytes(b"PAR1 this is not parquet")
    write_config(tmp_path / "samprobe.yaml", data={"metadata": "data/meta.parquet"})
    assert main(["validate", "-c", str(tmp_path / "samprobe.yaml")]) == 2
    assert "not a readable parquet file" in capsys.readouterr().err


def test_on_bad_rows_error_leaves_no_splits_to_train_on(digits_project: Path) -> None:
    meta = digits_project / "data" / "metadata.csv"
    meta.write_text(meta.read_text() + "missing.png,d0\n")
    cfg = load_config(digits_project / "samprobe.yaml", ["data.on_bad_rows=error"])
    with pytest.raises(DataError, match="1 bad rows"):
        run_validate(cfg, progress=False)
    assert not (cfg.run_dir / "splits.csv").exists() and (cfg.run_dir / "bad_rows.csv").exists()
    assert (
        main(
            [
                "train",
                "-c",
                str(digits_project / "samprobe.yaml"),
                "--set",
                "data.on_bad_rows=error",
            ]
        )
        == 2
    )


def test_changed_data_settings_validate_again(digits_project: Path) -> None:
    cfg = load_config(digits_project / "samprobe.yaml")
    records, _ = run_validate(cfg, progress=False)
    assert sum(r.split == "test" for r in records) == 16
    again, _ = load_dataset(
        load_config(digits_project / "samprobe.yaml", ["data.test_fraction=0.4"])
    )
    assert sum(r.split == "test" for r in again) == 32  # not the stale splits.csv
    report = json.loads((cfg.run_dir / "data_report.json").read_text())
    assert report["data_settings"]


def test_predict_top_k_must_be_positive(
    digits_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                "x.pt",
                str(digits_project),
                "--out",
                "p.csv",
                "--top-k",
                "0",
            ]
        )
        == 2
    )
    assert "--top-k must be 1 or more" in capsys.readouterr().err


@pytest.mark.slow
def test_classifier_api_takes_grey_rgba_and_refuses_float_arrays(digits_project: Path) -> None:
    from samprobe.predict import Classifier

    cfg = str(digits_project / "samprobe.yaml")
    for cmd in ("validate", "extract", "train"):
        assert main([cmd, "-c", cfg]) == 0
    clf = Classifier.load(digits_project / "run" / "checkpoints" / "best.pt", device="cpu")
    grey = np.zeros((8, 8), np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert len(clf.predict([grey, rgba])) == 2
    with pytest.raises(DataError, match="must be uint8"):
        clf.predict([np.zeros((8, 8, 3), np.float32)])

    listing = digits_project / "list.csv"
    listing.write_text("path\n\n,\n")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(digits_project / "run/checkpoints/best.pt"),
                str(listing),
                "--out",
                str(digits_project / "p.csv"),
            ]
        )
        == 2
    )


def test_run_log_records_the_error_line(digits_project: Path) -> None:
    cfg = str(digits_project / "samprobe.yaml")
    assert main(["validate", "-c", cfg]) == 0
    assert main(["train", "-c", cfg]) == 2  # nothing extracted yet
    log_text = (digits_project / "run" / "run.log").read_text()
    assert "ERROR samprobe: error [SP200]" in log_text and "samprobe extract" in log_text


@pytest.mark.slow
def test_path_features_equal_extracted_features(digits_project: Path) -> None:
    from samprobe.features.extract import Extractor, load_features, path_features

    cfg = load_config(digits_project / "samprobe.yaml")
    records, _ = run_validate(cfg, progress=False)
    assert main(["extract", "-c", str(digits_project / "samprobe.yaml")]) == 0
    ex = Extractor.from_config(cfg)
    with ex.open_cache(cfg.features.cache_dir) as cache:
        cached = load_features(cache, records[:5])
    direct = path_features(ex, [r.file for r in records[:5]])
    np.testing.assert_allclose(
        direct.astype(np.float16).astype(np.float32),
        cached,  # 5 images vs batches of 16
        **close_after_storage(
            np.float16, terms=efficientnet_lite0_terms(), scale=magnitude(cached)
        ),
    )


def test_console_log_follows_the_current_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() twice in one process (notebooks, tests) under redirected output: messages go to the
    # stdout of the moment, not to the (closed) stream of the first call.
    import io

    from samprobe.logs import log, setup_console

    setup_console()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", first)
    log.info("one")
    first.close()
    monkeypatch.setattr("sys.stdout", second)
    log.info("two")
    assert second.getvalue() == "two\n"
