"""Every ordinary user mistake of issue 12 goes through the real CLI and ends in exit 2 with one line
naming the field or file and the fix, never in exit 1 ("unexpected error"). What a mistake used to
break but should simply work (read-only caches, other metadata dialects, ``~``) is tested to work."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from helpers.digits_run import write_digits_project
from samprobe.cli import main

# each test runs a pipeline, a server or a reference model: the full suite's, not the inner loop's
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validated, extracted and trained digits project (efficientnet_lite0 at 64 px)."""
    root = tmp_path_factory.mktemp("mistakes")
    cfg = write_digits_project(root, per_class=8, epochs=2)
    for cmd in ("validate", "extract", "train"):
        assert main([cmd, "-c", str(cfg)]) == 0
    return root


def _drop_root_write_override() -> None:
    """In the child, before exec: without CAP_DAC_OVERRIDE in the bounding set, root obeys
    permission bits like any user (tests run as root in some CI containers)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``samprobe ARGV`` in a child process whose permission checks bind (see above): (exit code, stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "samprobe", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_drop_root_write_override,
    )
    return out.returncode, out.stderr


def read_only(*paths: Path) -> None:
    for path in paths:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            p.chmod(p.stat().st_mode & ~0o222)


def writable(*paths: Path) -> None:
    for path in paths:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            p.chmod(p.stat().st_mode | 0o200)


@dataclass
class Mistake:
    name: str
    argv: Callable[[Path], list[str]]  # project root -> CLI arguments
    says: list[str]  # the message names the field / file and the fix
    setup: Callable[[Path], None] = lambda root: None
    child: bool = False  # run in a child process whose permission bits bind (unwritable paths)
    cleanup: Callable[[Path], None] = field(default=lambda root: None)


def _cfg(root: Path) -> str:
    return str(root / "samprobe.yaml")


def _best(root: Path) -> str:
    return str(root / "run" / "checkpoints" / "best.pt")


def _locked(root: Path) -> Path:
    return root / "locked"


def _make_locked(root: Path) -> None:
    _locked(root).mkdir(exist_ok=True)
    read_only(_locked(root))


def _edited_best(root: Path, name: str, **changes: object) -> None:
    """The run's best.pt with top-level fields changed (None: removed), saved as ``name``."""
    import torch

    ckpt = torch.load(_best(root), weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, root / name)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(data)


def _yaml_with(text: str, name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_text((root / "samprobe.yaml").read_text() + text)


MISTAKES = [
    # defect 3: outputs checked before any work, binary / UTF-16 metadata, a format without its file
    Mistake(
        "predict --out is a folder",
        lambda r: [
            "predict",
            "--checkpoint",
            _best(r),
            str(r / "data/images"),
            "--out",
            str(r / "data"),
        ],
        ["--out", "is a folder", "predictions.csv"],
    ),
    Mistake(
        "predict --out in a read-only folder",
        lambda r: [
            "predict",
            "--checkpoint",
            _best(r),
            str(r / "data/images"),
            "--out",
            str(_locked(r) / "p.csv"),
        ],
        ["--out", "locked", "cannot be created or written", "writable"],
        setup=_make_locked,
        child=True,
        cleanup=lambda r: writable(_locked(r)),
    ),
    Mistake(
        "export --out is a folder",
        lambda r: ["features", "export", "-c", _cfg(r), "--out", str(r / "data")],
        ["--out", "is a folder", "train_features"],
    ),
    Mistake(
        "export --out in a read-only folder",
        lambda r: ["features", "export", "-c", _cfg(r), "--out", str(_locked(r) / "x.npz")],
        ["--out", "locked", "cannot be created or written", "writable"],
        setup=_make_locked,
        child=True,
        cleanup=lambda r: writable(_locked(r)),
    ),
    Mistake(
        "binary metadata",
        lambda r: ["validate", "-c", _cfg(r), "--set", f"data.metadata={r / 'blob.csv'}"],
        ["data.metadata", "blob.csv", "binary", "re-export"],
        setup=_write("blob.csv", bytes(range(256)) * 8),
    ),
    Mistake(
        "data.format csv without data.metadata",
        lambda r: [
            "validate",
            "-c",
            _cfg(r),
            "--set",
            "data.format=csv",
            "--set",
            "data.metadata=null",
        ],
        ["data.format is csv", "data.metadata is not set", "set data.metadata"],
    ),
    Mistake(
        "data.format jsonl without data.metadata",
        lambda r: [
            "doctor",
            "-c",
            _cfg(r),
            "--set",
            "data.format=jsonl",
            "--set",
            "data.metadata=null",
        ],
        ["data.format is jsonl", "data.metadata is not set", "set data.metadata"],
    ),
    Mistake(
        "data.format parquet without data.metadata",
        lambda r: [
            "train",
            "-c",
            _cfg(r),
            "--set",
            "data.format=parquet",
            "--set",
            "data.metadata=null",
            "--set",
            f"run_dir={r / 'run_parquet'}",
        ],
        ["data.format is parquet", "data.metadata is not set", "set data.metadata"],
    ),
    # defect 5: --set errors name the --set item; YAML booleans are not numbers
    Mistake(
        "--set unknown key",
        lambda r: ["validate", "-c", _cfg(r), "--set", "train.lrr=0.1"],
        ["--set train.lrr=0.1", "unknown key 'train.lrr'", "did you mean train.lr"],
    ),
    Mistake(
        "--set bad value",
        lambda r: ["validate", "-c", _cfg(r), "--set", "train.epochs=true"],
        [
            "--set train.epochs=true",
            "train.epochs",
            "yes/no",
            "give --set train.epochs= a valid value",
        ],
    ),
    Mistake(
        "epochs: true in the file",
        lambda r: ["train", "-c", str(r / "bool_epochs.yaml")],
        [
            "bool_epochs.yaml",
            "train.epochs",
            "not a yes/no value",
            "set train.epochs to a valid value",
        ],
        setup=lambda r: (r / "bool_epochs.yaml").write_text(
            (r / "samprobe.yaml").read_text().replace("epochs: 2", "epochs: true")
        ),
    ),
    Mistake(
        "seed: yes in the file",
        lambda r: ["validate", "-c", str(r / "bool_seed.yaml")],
        ["bool_seed.yaml", "seed", "not a yes/no value"],
        setup=_yaml_with("seed: yes\n", "bool_seed.yaml"),
    ),
    # defect 9: a folder as -c, an empty config, an empty split to export
    Mistake(
        "-c names a folder",
        lambda r: ["validate", "-c", str(r)],
        ["is a folder, not a file", "samprobe.yaml"],
    ),
    Mistake(
        "empty config",
        lambda r: ["validate", "-c", str(r / "empty.yaml")],
        ["neither data.metadata nor data.image_root is set", "set data.metadata"],
        setup=_write("empty.yaml", b""),
    ),
    Mistake(
        "export of an empty split",
        lambda r: [
            "features",
            "export",
            "-c",
            _cfg(r),
            "--split",
            "test",
            "--set",
            "data.test_fraction=0",
            "--set",
            f"run_dir={r / 'run_no_test'}",
            "--out",
            str(r / "test.npz"),
        ],
        ["split 'test' has no samples", "--split"],
    ),
    # defect 9: a message quoting torch.load carries no terminal escape codes (its bold "only if you
    # trust" part)
    Mistake(
        "checkpoint that needs code to load",
        lambda r: ["evaluate", "-c", _cfg(r), "--checkpoint", str(r / "pickled.pt")],
        ["pickled.pt", "cannot be read as a samprobe checkpoint", "best.pt"],
        setup=lambda r: __import__("torch").save(
            {"args": __import__("argparse").Namespace(lr=1)}, r / "pickled.pt"
        ),
    ),
    # a head written under another checkpoint schema, and one with a field missing: refused by name
    Mistake(
        "checkpoint of another format version",
        lambda r: ["evaluate", "-c", _cfg(r), "--checkpoint", str(r / "other_version.pt")],
        [
            "other_version.pt",
            "format 'samprobe.head/0'",
            "reads samprobe.head/1",
            "train the head again",
        ],
        setup=lambda r: _edited_best(r, "other_version.pt", format="samprobe.head/0"),
    ),
    Mistake(
        "checkpoint with a missing field",
        lambda r: [
            "predict",
            "--checkpoint",
            str(r / "no_classes.pt"),
            str(r / "data"),
            "--out",
            str(r / "p.csv"),
        ],
        ["no_classes.pt", "missing or unexpected field", "'classes'", "samprobe train"],
        setup=lambda r: _edited_best(r, "no_classes.pt", classes=None),
    ),
    # defect 6: a Windows drive path cannot be read, and says what to write instead
    # (bad_rows.csv; exit 2 via on_bad_rows)
    Mistake(
        "Windows absolute path",
        lambda r: [
            "validate",
            "-c",
            _cfg(r),
            "--set",
            f"data.metadata={r / 'win.csv'}",
            "--set",
            "data.on_bad_rows=error",
        ],
        ["win.csv", "Windows absolute path", "relative to data.image_root", "d0000.png"],
        setup=_write("win.csv", b"path,label\r\nC:\\data\\images\\d0000.png,zero\r\n"),
    ),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.name)
def test_mistake_exits_2_naming_the_field_and_the_fix(
    trained: Path, mistake: Mistake, capsys: pytest.CaptureFixture[str]
) -> None:
    mistake.setup(trained)
    try:
        if mistake.child:
            rc, err = run_cli(mistake.argv(trained), trained)
        else:
            rc = main(mistake.argv(trained))
            captured = capsys.readouterr()
            err = captured.err + (
                "\n" + captured.out if mistake.argv(trained)[0] == "doctor" else ""
            )
    finally:
        mistake.cleanup(trained)
    assert rc == 2, err
    assert "unexpected error" not in err and "\x1b" not in err
    line = next(ln for ln in err.splitlines() if "[SP" in ln)
    for text in mistake.says:
        assert text in line, (text, line)
    assert "Fix:" in line or "fix:" in line


# ---------------------------------------------------------------------------------------
# what used to fail and now works


def test_read_only_cache_can_be_read(trained: Path, tmp_path: Path) -> None:
    """defect 4: train, evaluate, cache info / verify and export need read access to the cache only."""
    cache = trained / "cache"
    cfg = [*("-c", _cfg(trained)), "--set", f"run_dir={tmp_path / 'run'}"]
    read_only(cache)
    try:
        for argv in (
            ["train", *cfg],
            ["cache", "info", *cfg],
            ["cache", "verify", *cfg],
            ["features", "export", *cfg, "--out", str(tmp_path / "train.npz")],
        ):
            rc, err = run_cli(argv, trained)
            assert rc == 0, (argv, err)
        rc, err = run_cli(
            ["evaluate", *cfg, "--checkpoint", str(tmp_path / "run/checkpoints/best.pt")], trained
        )
        assert rc == 0, err
        # repairing writes: refused, exit 2
        rc, err = run_cli(["cache", "verify", *cfg, "--repair"], trained)
        assert rc == 2 and "features.cache_dir" in err and "cannot be created or written" in err, (
            err
        )
    finally:
        writable(cache)
    assert np.load(tmp_path / "train.npz")["features"].shape[1] == 1280
    assert json.loads((tmp_path / "run/eval/test/metrics.json").read_text())["n"] > 0


def test_home_is_expanded_in_command_line_paths(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """defect 8: '~' in -c, --checkpoint, inputs and --out (quoted, so the shell left it alone)."""
    home = tmp_path / "home"
    shutil.copytree(trained, home, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                "~/run/checkpoints/best.pt",
                "~/data/images/d0000.png",
                "--out",
                "~/pred.csv",
            ]
        )
        == 0
    )
    assert (home / "pred.csv").read_text().count("\n") == 2 and not (tmp_path / "~").exists()
    assert main(["validate", "-c", "~/samprobe.yaml"]) == 0


def test_metadata_dialects_are_read(trained: Path, tmp_path: Path) -> None:
    """defect 6: semicolon CSV (European Excel), UTF-16 tab-separated ("Unicode text"), JSON lines and
    a JSON array named .json, Windows separators in paths: all read as the plain CSV is."""
    from samprobe.config import DataConfig
    from samprobe.data.validate import validate

    images = trained / "data" / "images"
    rows = [ln.split(",") for ln in (trained / "data/metadata.csv").read_text().splitlines()[1:]]
    (images / "sub").mkdir(exist_ok=True)
    shutil.copy(images / rows[0][0], images / "sub" / rows[0][0])
    variants = {
        "semi.csv": ("path;label\n" + "".join(f"{p};{label}\n" for p, label in rows)).encode(
            "cp1252"
        ),
        "excel.txt": ("path\tlabel\r\n" + "".join(f"{p}\t{label}\r\n" for p, label in rows)).encode(
            "utf-16"
        ),
        "lines.json": "".join(
            json.dumps({"path": p, "label": label}) + "\n" for p, label in rows
        ).encode(),
        "array.json": json.dumps(
            [{"path": p, "label": label} for p, label in rows], indent=1
        ).encode(),
    }
    plain = validate(DataConfig(metadata=trained / "data/metadata.csv", image_root=images))
    expected = [(r.path, r.label) for r in plain.records]
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        ds = validate(DataConfig(metadata=tmp_path / name, image_root=images))
        assert [(r.path, r.label) for r in ds.records] == expected and not ds.problems, name
    assert (
        validate(DataConfig(metadata=tmp_path / "excel.txt", image_root=images)).encoding
        == "utf-16"
    )
    (tmp_path / "win.csv").write_text(f"path,label\nsub\\{rows[0][0]},{rows[0][1]}\n")
    (record,) = validate(DataConfig(metadata=tmp_path / "win.csv", image_root=images)).records
    assert Path(record.file) == (images / "sub" / rows[0][0]).resolve()
