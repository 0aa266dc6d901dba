"""Validation at scale: what validate remembers of each file (``data/check_record.py``) so that a
rerun reads only what changed, a killed validation resumes, and torchrun ranks share the files.

Real images (skimage photo crops and sklearn digits, ``make_corpus``); the reads are counted
independently of the code under test by a Python audit hook on ``open``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.cache_corpus import PY, REPO, make_corpus
from samprobe.config import DataConfig
from samprobe.data.check_record import JOURNAL_GLOB, SNAPSHOT, CheckRecord
from samprobe.data.validate import validate

N_IMAGES = 40  # make_corpus: 5 photos x 4 crops + 20 digits

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, Path)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside _reads


def _reads(images: Path, fn, *args, **kwargs):
    """(fn's result, the files under ``images`` that were opened while it ran)."""
    global _opened
    _opened = []
    try:
        out = fn(*args, **kwargs)
    finally:
        opened, _opened = _opened, None
    inside = str(images.resolve())
    return out, sorted(p for p in opened if p.startswith(inside))


def _summary(ds) -> tuple:
    return (
        [(r.row, r.path, r.file, r.label, r.split, r.sha256) for r in ds.records],
        [(p.row, p.path, p.kind) for p in ds.problems],
        ds.taxonomy,
    )


@pytest.fixture
def corpus(tmp_path):
    images = make_corpus(tmp_path, n_digits=20, crops=4)
    return images, DataConfig(image_root=images), tmp_path / "run" / "validation"


def test_rerun_reads_only_the_files_that_changed(corpus):
    images, cfg, record = corpus
    plain = validate(cfg)  # no record: the reference outcome
    first, opened = _reads(images, validate, cfg, record_dir=record)
    assert len(opened) == N_IMAGES and first.extra["files"]["read"] == N_IMAGES
    assert _summary(first) == _summary(plain)
    assert (record / SNAPSHOT).is_file() and not list(record.glob(JOURNAL_GLOB))

    again, opened = _reads(images, validate, cfg, record_dir=record)
    assert opened == [] and again.extra["files"] == {
        "checked": N_IMAGES,
        "read": 0,
        "bytes_read": 0,
        "remembered": N_IMAGES,
    }
    assert _summary(again) == _summary(plain)

    touched = sorted((images / "digit").iterdir())[:3]
    for f in touched:
        f.touch()
    third, opened = _reads(images, validate, cfg, record_dir=record)
    assert opened == sorted(str(f.resolve()) for f in touched)
    assert third.extra["files"]["read"] == 3
    assert third.extra["files"]["bytes_read"] == sum(f.stat().st_size for f in touched)
    assert _summary(third) == _summary(plain)


def test_a_replaced_or_deleted_file_is_checked_again(corpus):
    images, cfg, record = corpus
    validate(cfg, record_dir=record)
    photos = sorted((images / "photo").iterdir(), key=lambda f: f.stat().st_size)
    # a smaller real image put in place of the largest one, padded after its end to the same
    # size and given the same mtime (as `cp -p` of an edited copy would): only a new inode
    target, other = photos[-1], photos[0]
    st = target.stat()
    data = other.read_bytes()
    replacement = target.with_suffix(".new")
    replacement.write_bytes(data + bytes(st.st_size - len(data)))  # PNG readers stop at IEND
    os.replace(replacement, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert target.stat().st_ino != st.st_ino
    # another deleted, and a file of that name written again: a digit scan
    reborn = photos[1]
    reborn.unlink()
    reborn.write_bytes(sorted((images / "digit").iterdir())[0].read_bytes())
    deleted = photos[2]
    deleted.unlink()
    ds, opened = _reads(images, validate, cfg, record_dir=record)
    assert opened == sorted(str(f.resolve()) for f in (target, reborn))
    assert _summary(ds) == _summary(validate(cfg))  # the new bytes' verdict, not the old one
    assert len(ds.records) + len(ds.problems) == N_IMAGES - 1
    # its new bytes are a digit's, under the photo label: both rows are a label conflict
    assert any(p.kind == "label_conflict" and p.path.endswith(reborn.name) for p in ds.problems)


def test_changing_the_pixel_limit_checks_every_file_again(corpus):
    images, cfg, record = corpus
    validate(cfg, record_dir=record)
    small = DataConfig(image_root=images, max_pixels=40 * 40)
    ds, opened = _reads(images, validate, small, record_dir=record)
    assert len(opened) == N_IMAGES
    assert sum(p.kind == "unreadable" for p in ds.problems) == 20  # the 96x80 photo crops


_KILLED_VALIDATION = """
import os, signal, sys
from pathlib import Path
import samprobe.data.check_record as check_record
import samprobe.data.validate as v
from samprobe.config import DataConfig

check_record.FLUSH_LINES = 5  # batches of 5 journal lines: some flushed before the kill
check_record.FLUSH_S = 1e9
added = []
real = check_record.CheckRecord.add


def add_then_die(self, *args):
    real(self, *args)
    added.append(1)
    if len(added) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would


check_record.CheckRecord.add = add_then_die
v.validate(DataConfig(image_root=Path(sys.argv[1])), record_dir=Path(sys.argv[2]), workers=1)
"""


def test_a_killed_validation_resumes_reading_only_unfinished_files(corpus):
    images, cfg, record = corpus
    killed = subprocess.run(
        [PY, "-c", _KILLED_VALIDATION, str(images), str(record), "23"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    (journal,) = record.glob(JOURNAL_GLOB)
    assert not (record / SNAPSHOT).exists()
    # 23 outcomes found before the kill, flushed in batches of 5: 20 lines whole on disk
    assert len(CheckRecord(record, max_pixels=cfg.max_pixels).entries) == 20
    # a torn last line (killed mid-write) is dropped, not misread
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 30])
    assert len(CheckRecord(record, max_pixels=cfg.max_pixels).entries) == 19

    ds, opened = _reads(images, validate, cfg, record_dir=record)
    assert len(opened) == N_IMAGES - 19 and ds.extra["files"]["remembered"] == 19
    assert _summary(ds) == _summary(validate(cfg))
    # resumed to the end: one snapshot, the dead run's journal folded into it
    assert (record / SNAPSHOT).is_file() and not list(record.glob(JOURNAL_GLOB))
    _, opened = _reads(images, validate, cfg, record_dir=record)
    assert opened == []


def _metadata_project(root: Path, images: Path) -> Path:
    """A metadata CSV over the corpus with a missing file, a label conflict and a duplicate."""
    files = sorted(images.rglob("*.png"))
    meta = root / "meta.csv"
    with open(meta, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for file in files:
            w.writerow([str(file.relative_to(images)), file.parent.name])
        w.writerow(["digit/none.png", "digit"])
        w.writerow([str(files[0].relative_to(images)), "cat"])
        w.writerow([str(files[1].relative_to(images)), files[1].parent.name])
    cfg = {
        "run_dir": str(root / "run"),
        "device": "cpu",
        "data": {"metadata": str(meta), "image_root": str(images), "val_fraction": 0.2},
    }
    path = root / "samprobe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun_validate(cfg: Path, nproc: int) -> subprocess.CompletedProcess:
    torchrun = Path(PY).parent / "torchrun"
    return subprocess.run(
        [
            str(torchrun),
            "--standalone",  # a rendezvous on a free loopback port
            f"--nproc_per_node={nproc}",
            "-m",
            "samprobe",
            "validate",
            "-c",
            str(cfg),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outputs(run: Path) -> tuple:
    report = json.loads((run / "data_report.json").read_text())
    report.pop("files")  # how many files were read: the rest is the same whoever reads them
    report.pop("source"), report.pop("data_settings")  # the metadata file's own path, hashed
    return report, (run / "splits.csv").read_text(), (run / "bad_rows.csv").read_text()


@pytest.mark.slow
def test_two_ranks_validate_their_shares_and_match_one_process(tmp_path):
    images = make_corpus(tmp_path, n_digits=20, crops=4)
    single = tmp_path / "single"
    single.mkdir()
    out = subprocess.run(
        [PY, "-m", "samprobe", "validate", "-c", str(_metadata_project(single, images))],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    cfg = _metadata_project(ranks, images)
    run = _torchrun_validate(cfg, 2)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert _outputs(ranks / "run") == _outputs(single / "run")
    report = json.loads((ranks / "run" / "data_report.json").read_text())
    # the label-conflict and the duplicate row read their file again: 42 reads of 40 files
    assert report["files"]["read"] == N_IMAGES + 2
    # rank 0 folded both ranks' journals into one snapshot naming every file
    record = ranks / "run" / "validation"
    assert not list(record.glob(JOURNAL_GLOB))
    assert len(CheckRecord(record, max_pixels=DataConfig().max_pixels).entries) == N_IMAGES
    # a rerun on two ranks reads nothing: each rank finds its share remembered
    again = _torchrun_validate(cfg, 2)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert json.loads((ranks / "run" / "data_report.json").read_text())["files"]["read"] == 0
    # the same rows and splits (the report now says the splits were kept from the first run)
    assert _outputs(ranks / "run")[1:] == _outputs(single / "run")[1:]
    shutil.rmtree(ranks / "run" / "validation")


def test_record_lines_are_frame_line_bytes_and_read_back(tmp_path: Path) -> None:
    """The record's hand-written JSON lines are the bytes `frame_line` writes for the same
    entry (quotes, backslashes, non-ASCII, control characters, None), and a new CheckRecord
    reads each entry back."""
    from samprobe.data.check_record import Outcome, stat_version, version_key
    from samprobe.io import file_version, frame_line

    f = tmp_path / "x.png"
    f.write_bytes(b"123")
    st = os.stat(f)
    assert stat_version(st) == version_key(file_version(st))
    entries = {
        str(f): (stat_version(st), Outcome("ab" * 32, None)),
        '/a/"q"\\b/café\t\x01\u2028.png': ((1, 2, 3, 4), Outcome(None, 'OSError: "bad" \\ ü\n')),
        "/a/empty": ((0, 0, 0, 0), Outcome(None, "")),
    }
    with CheckRecord(tmp_path / "rec", max_pixels=1234) as record:
        for file, (version, outcome) in entries.items():
            line = record._line(file, version, outcome)
            obj = {"p": file, "v": list(version), "c": record.check, "s": outcome.sha256}
            assert line == frame_line({**obj, "e": outcome.reason})
            record.add(file, version, outcome)
    again = CheckRecord(tmp_path / "rec", max_pixels=1234)
    assert again.entries == entries


def test_compaction_keeps_listed_entries_of_the_snapshot_this_rank_and_other_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 compacts: the snapshot's entries still listed, its own new ones and those absorbed
    from other ranks, each once, in the order of the files listed; unlisted ones dropped."""
    from samprobe.data import check_record
    from samprobe.data.check_record import Outcome

    monkeypatch.setattr(check_record, "COMPACT_SHARE", 0.0)  # compact whatever the journals hold
    folder = tmp_path / "rec"
    old = {f"/d/{i}.png": ((i, 1, 2, 3), Outcome(f"{i:064x}", None)) for i in range(4)}
    with CheckRecord(folder, max_pixels=99) as first:
        for file, (version, outcome) in old.items():
            first.add(file, version, outcome)
    assert first.compact(old)  # no snapshot yet: the journal becomes one
    record = CheckRecord(folder, max_pixels=99)
    assert record.entries == old
    mine = ("/d/9.png", (9, 9, 9, 9), Outcome(None, "truncated"))
    theirs = ("/d/8.png", (8, 8, 8, 8), Outcome("e" * 64, None))
    record.add(*mine)
    record.absorb([theirs])
    listed = ["/d/9.png", "/d/0.png", "/d/8.png", "/d/2.png", "/d/0.png", "/d/missing.png"]
    assert record.compact(listed)
    lines = (folder / SNAPSHOT).read_bytes().splitlines()
    assert [json.loads(line.split(b" ", 1)[1])["p"] for line in lines] == [
        "/d/9.png", "/d/0.png", "/d/8.png", "/d/2.png",
    ]  # fmt: skip
    again = CheckRecord(folder, max_pixels=99)
    assert again.entries == {
        "/d/9.png": mine[1:], "/d/0.png": old["/d/0.png"], "/d/8.png": theirs[1:],
        "/d/2.png": old["/d/2.png"],
    }  # fmt: skip
    assert not list(folder.glob(JOURNAL_GLOB))
