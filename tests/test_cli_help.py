import subprocess
import sys

import pytest

from samprobe.cli import build_parser, main

COMMANDS = [
    ["demo"],
    ["init"],
    ["doctor"],
    ["validate"],
    ["extract"],
    ["train"],
    ["evaluate"],
    ["predict"],
    ["serve"],
    ["features"],
    ["features", "export"],
    ["weights"],
    ["weights", "download"],
    ["cache"],
    ["cache", "info"],
    ["cache", "verify"],
    ["cache", "prune"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*cmd, "--help"])
    assert exit_.value.code == 0
    assert "usage: samprobe" in capsys.readouterr().out


def test_design_commands_exist() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {
        "demo",
        "init",
        "doctor",
        "validate",
        "extract",
        "train",
        "evaluate",
        "predict",
        "features",
        "serve",
    } <= set(sub.choices)


def test_console_script_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "samprobe", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "validate" in out.stdout
