from pathlib import Path

import pytest

from samprobe.cli import main
from samprobe.config import TEMPLATE, Config, apply_overrides, load_config
from samprobe.errors import ConfigError


def test_template_validates_and_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert main(["init", str(tmp_path / "sub")]) == 0
    cfg = load_config(tmp_path / "sub" / "samprobe.yaml")
    assert cfg.data.metadata == (tmp_path / "sub" / "data" / "metadata.csv").resolve()
    assert cfg.features.cache_dir == (tmp_path / "sub" / "cache").resolve()
    assert cfg.backbone.variant == "auto"


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path)]) == 0
    assert main(["init", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--force"]) == 0


def test_overrides_are_typed(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    cfg = load_config(
        tmp_path / "c.yaml",
        [
            "train.lr=5e-4",
            "train.epochs=7",
            "features.num_workers=0",
            "features.pooling=[neck_avg, block_avg]",
            "data.split_column=split",
        ],
    )
    assert cfg.train.lr == pytest.approx(5e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.features.num_workers == 0
    assert cfg.features.pooling == ["neck_avg", "block_avg"]
    assert cfg.data.split_column == "split"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=0.1", "train.lrr"),  # typo'd key: full path named
        ("train.lr=-0.1", "train.lr"),  # negative learning rate
        ("data.on_bad_rows=ignore", "data.on_bad_rows"),
        ("trian.lr=0.1", "trian"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, needle: str) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml", [override])
    assert needle in err.value.message


def test_typo_suggests_the_right_key(tmp_path: Path) -> None:
    assert "\n  lr: " in TEMPLATE
    (tmp_path / "c.yaml").write_text(TEMPLATE.replace("\n  lr: ", "\n  lrate: "))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert "train.lrate" in err.value.message and "train.lr" in (err.value.fix or "")


def test_enum_error_lists_allowed_values(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml", ["train.class_weights=inverse"])
    assert "balanced" in err.value.message and "effective_number" in err.value.message


def test_cli_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    assert main(["validate", "-c", str(tmp_path / "c.yaml"), "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_metadata_file_exits_2_naming_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    assert main(["validate", "-c", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "data" / "metadata.csv") in err and "data.metadata" in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_bad_yaml_and_bad_override_syntax(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(TEMPLATE)
    assert main(["--debug", "validate", "-c", str(tmp_path / "c.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_defaults_are_valid() -> None:
    cfg = Config()
    assert cfg.train.class_weights == "balanced" and cfg.resolved_num_workers() >= 1
