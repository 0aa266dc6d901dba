"""validate on a corpus with one file per problem kind, built on the fly from real photos;
then the good rows go through extract and train with a real backbone."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.images import photos, png16
from samprobe.config import Config, DataConfig
from samprobe.data.records import PROBLEM_KINDS, read_splits
from samprobe.data.validate import validate
from samprobe.errors import DataError

MAX_PIXELS = 200 * 200


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def good_images() -> dict[str, tuple[str, bytes]]:
    """18 distinct real-photo crops, 6 per class, as {file name: (label, bytes)}."""
    out = {}
    for label, photo in (
        ("café", photos()["tall_2to1"]),
        ("rocket", photos()["rocket"]),
        ("astronaut", photos()["square"]),
    ):
        for k in range(6):
            crop = np.ascontiguousarray(photo[k * 9 : k * 9 + 120, k * 7 : k * 7 + 90])
            out[f"{label}_{k}.jpg"] = (label, _jpeg(crop))
    return out


def build_corpus(tmp: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """images/ + meta.csv (cp1252). Returns (root, [(path, label, expected kind)])."""
    root = tmp / "images"
    root.mkdir()
    rows: list[tuple[str, str, str]] = []
    for name, (label, data) in good_images().items():
        (root / name).write_bytes(data)
        rows.append((name, label, "ok"))
    rgb = photos()["square"][:96, :128]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6
    cmyk, palette = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb[5:]).convert("CMYK").save(cmyk, "JPEG", quality=90)
    Image.fromarray(rgb[:, 7:]).quantize(32).save(palette, "GIF")
    special = {
        "cmyk.jpg": cmyk.getvalue(),
        "grey16.png": png16(rgb[..., 1].astype(np.uint16) * 256),
        "palette.gif": palette.getvalue(),
        "rgba.png": _png(Image.fromarray(rgba[:, ::-1].copy())),
        "exif_rotated.jpg": _jpeg(np.ascontiguousarray(rgb[10:, 5:]), exif=exif),
    }
    for name, data in special.items():
        (root / name).write_bytes(data)
        rows.append((name, "astronaut", "ok"))

    big = np.array(Image.fromarray(rgb).resize((250, 250)))
    (root / "zero.jpg").write_bytes(b"")
    whole = _jpeg(np.array(Image.fromarray(rgb).resize((180, 180))))  # under the pixel limit
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "not_an_image.jpg").write_text("this is a text file")
    (root / "too_big.png").write_bytes(_png(Image.fromarray(big)))  # 62,500 px > MAX_PIXELS
    (root / "conflict_copy.jpg").write_bytes((root / "rocket_0.jpg").read_bytes())
    (tmp / "outside.jpg").write_bytes(_jpeg(rgb))
    os.symlink(tmp / "outside.jpg", root / "link_out.jpg")
    rows += [
        ("zero.jpg", "rocket", "unreadable"),
        ("truncated.jpg", "rocket", "unreadable"),
        ("not_an_image.jpg", "rocket", "unreadable"),
        ("too_big.png", "rocket", "unreadable"),
        ("nowhere.jpg", "rocket", "missing"),
        ("café_1.jpg", "zebra", "unknown_label"),  # not in classes.txt
        ("rocket_1.jpg", "", "unknown_label"),  # empty label
        ("café_2.jpg", "café", "duplicate"),  # same file listed twice, same label
        (
            "conflict_copy.jpg",
            "astronaut",
            "label_conflict",
        ),  # rocket_0's bytes under another label
        ("../outside.jpg", "rocket", "outside_root"),
        ("link_out.jpg", "rocket", "outside_root"),
        ("", "rocket", "bad_path"),
    ]
    # rocket_0 itself now conflicts with its copy: neither can be trusted
    rows = [(p, lab, "label_conflict" if p == "rocket_0.jpg" else k) for p, lab, k in rows]
    meta = tmp / "meta.csv"
    text = "path,label\n" + "".join(f"{p},{lab}\n" for p, lab, _ in rows)
    meta.write_bytes(text.encode("cp1252"))  # a spreadsheet export from Windows: not UTF-8
    # the full taxonomy, UTF-8, with a class that has no images
    (tmp / "classes.txt").write_text("astronaut\ncafé\nrocket\ndog\n", encoding="utf-8")
    return root, rows


def make_config(tmp: Path, **data) -> Config:
    return Config(
        run_dir=tmp / "run",
        seed=3,
        device="cpu",
        precision="fp32",
        data=DataConfig(
            **{
                "metadata": tmp / "meta.csv",
                "image_root": tmp / "images",
                "max_pixels": MAX_PIXELS,
                "classes_file": tmp / "classes.txt",
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                **data,
            }
        ),
        backbone={"name": "efficientnet_lite0", "img_size": 64},
        features={
            "cache_dir": tmp / "cache",
            "batch_size": 8,
            "num_workers": 0,
            "dtype": "float32",
        },
        train={"epochs": 15, "patience": 15},
    )


@pytest.mark.slow
def test_bad_corpus_every_row_classified_then_good_rows_train(tmp_path: Path) -> None:
    from samprobe.pipeline import run_extract, run_train, run_validate

    _, rows = build_corpus(tmp_path)
    cfg = make_config(tmp_path)
    records, taxonomy = run_validate(cfg, progress=False)
    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text(encoding="utf-8"))
    expected = {k: sum(1 for r in rows if r[2] == k) for k in ("ok", *PROBLEM_KINDS)}
    assert report["encoding"] == "cp1252"
    assert report["total"] == len(rows)
    assert {k: report[k] for k in expected} == expected
    assert taxonomy == ["astronaut", "café", "rocket", "dog"]
    assert report["classes_without_train_images"] == ["dog"]
    with open(run / "bad_rows.csv", encoding="utf-8", newline="") as f:
        bad = {int(r["row"]): r for r in csv.DictReader(f)}
    for i, (path, _label, kind) in enumerate(rows, start=1):
        got = bad[i]["kind"] if i in bad else "ok"
        assert got == kind, (
            f"row {i} {path!r}: {got} ({bad.get(i, {}).get('detail')}), expected {kind}"
        )
    assert "pixel limit" in bad[[p for p, _, _ in rows].index("too_big.png") + 1]["detail"]
    assert "truncated" in bad[[p for p, _, _ in rows].index("truncated.jpg") + 1]["detail"]

    splits = read_splits(run / "splits.csv")
    assert {r.row for r in splits} == {i for i, r in enumerate(rows, 1) if r[2] == "ok"}
    assert {r.split for r in splits} == {"train", "val", "test"}

    # An image that breaks after validate is reported at extract, the run goes on.
    broken = next(r for r in splits if r.split == "train" and r.label == "café")
    Path(broken.file).write_bytes(Path(broken.file).read_bytes()[:500])
    gone = next(
        r
        for r in splits
        if r.split == "train" and r.label == "astronaut" and r.path.endswith(".jpg")
    )
    Path(gone.file).unlink()
    result = run_extract(cfg, progress=False)
    assert result.extracted == len(splits) - 2
    with open(run / "extract_failures.csv", encoding="utf-8", newline="") as f:
        failed = {int(r["row"]): r["kind"] for r in csv.DictReader(f)}
    assert failed == {broken.row: "unreadable", gone.row: "missing"}

    out = run_train(cfg)
    assert (run / "checkpoints" / "best.pt").is_file()
    assert out["classes"].num_active == 3
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_skip_prints_one_line_per_kind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from samprobe.pipeline import run_validate

    _, rows = build_corpus(tmp_path)
    with caplog.at_level("INFO", logger="samprobe"):
        run_validate(make_config(tmp_path), progress=False)
    for kind in {k for _, _, k in rows} - {"ok"}:
        lines = [m for m in caplog.messages if m.strip().split(" ")[1:2] == [kind]]
        assert len(lines) == 1, (kind, caplog.messages)
        assert "first: row" in lines[0]


def test_on_bad_rows_error_stops_with_the_first_bad_row(tmp_path: Path) -> None:
    from samprobe.pipeline import run_validate

    build_corpus(tmp_path)
    with pytest.raises(DataError, match=r"bad rows in .*meta.csv; first: row \d+") as exc:
        run_validate(make_config(tmp_path, on_bad_rows="error"), progress=False)
    assert "bad_rows.csv" in exc.value.fix and (tmp_path / "run" / "bad_rows.csv").is_file()


def test_validate_uses_a_pool_and_gives_the_same_answer(tmp_path: Path) -> None:
    build_corpus(tmp_path)
    cfg = make_config(tmp_path).data
    serial, pooled = validate(cfg, workers=1), validate(cfg, workers=4, processes=False)
    assert serial.records == pooled.records and serial.problems == pooled.problems


def test_worker_processes_give_the_in_process_answer_in_row_order(tmp_path: Path) -> None:
    from samprobe.data import validate as v

    _, rows = build_corpus(tmp_path)
    cfg = make_config(tmp_path).data
    threads = validate(cfg, processes=False)
    kinds = {p.kind for p in threads.problems}
    assert {"unreadable", "missing", "outside_root", "label_conflict"} <= kinds
    # forked workers, and a fork server's (as after CUDA initialised: the checker is pickled)
    for method in ("fork", "forkserver"):
        record = tmp_path / f"record-{method}"
        # chunks of 3 rows over 2 processes: every chunk boundary, results in row order
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(v, "CHUNK_ROWS", 3)
            mp.setattr(v, "_worker_context", lambda m=method: v.mp.get_context(m))
            processes = validate(cfg, processes=True, workers=2, record_dir=record)
        assert processes.records == threads.records and processes.problems == threads.problems
        assert processes.extra["files"] == threads.extra["files"]
        assert len(processes.records) + len(processes.problems) == len(rows)
        # what the workers found is remembered: a rerun reads no file that decoded
        again = validate(cfg, processes=False, record_dir=record)
        assert again.records == threads.records and again.problems == threads.problems
        assert again.extra["files"]["remembered"] >= len(threads.records)


_ORPHAN = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from samprobe.data import validate as v

start = {"initializer": v._start_worker, "initargs": (os.getpid(), None)} if sys.argv[1] else {}
with ProcessPoolExecutor(2, mp_context=v._worker_context(), **start) as pool:
    pool.submit(os.getpid).result()
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(60)  # killed here
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_processes_die_with_their_parent() -> None:
    import signal
    import subprocess
    import time

    from helpers.cache_corpus import PY, REPO

    proc = subprocess.Popen(
        [PY, "-c", _ORPHAN, "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), workers
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _write_images(root: Path, names: dict[str, str]) -> None:
    imgs = list(good_images().values())
    for k, (name, _) in enumerate(names.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(imgs[k][1])


def test_parquet_integer_labels_classes_file_and_null_path(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "images"
    names = {f"img{k}.jpg": "" for k in range(6)}
    _write_images(root, names)
    # bird has no images
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n", encoding="utf-8")
    table = pa.table(
        {
            "file": [*names, None, "img0.jpg"],
            "y": [0, 1, 0, 1, 0, 1, 0, 7],
            "fold": ["train", "train", "val", "test", "train", "train", "train", "train"],
        }
    )
    pq.write_table(table, tmp_path / "meta.parquet")
    cfg = DataConfig(
        metadata=tmp_path / "meta.parquet",
        image_root=root,
        path_column="file",
        label_column="y",
        split_column="fold",
        classes_file=tmp_path / "classes.txt",
    )
    ds = validate(cfg)
    assert ds.taxonomy == ["cat", "dog", "bird"]
    assert [(r.path, r.label, r.split) for r in ds.records] == [
        ("img0.jpg", "cat", "train"),
        ("img1.jpg", "dog", "train"),
        ("img2.jpg", "cat", "val"),
        ("img3.jpg", "dog", "test"),
        ("img4.jpg", "cat", "train"),
        ("img5.jpg", "dog", "train"),
    ]
    assert [(p.row, p.kind) for p in ds.problems] == [(7, "bad_path"), (8, "unknown_label")]


def test_jsonl_malformed_line_bad_split_and_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _write_images(root, {"a/1.jpg": "", "a/2.jpg": "", "b/3.jpg": ""})
    (root / "b" / "notes.txt").write_text("not listed: not an image suffix")
    lines = [
        '{"path": "a/1.jpg", "label": "a", "split": "train"}',
        "{not json",
        '["a list"]',
        '{"path": "b/3.jpg", "label": "b", "split": "holdout"}',
        '{"path": "a/2.jpg", "label": "a", "split": "Validation"}',
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n")
    ds = validate(
        DataConfig(metadata=tmp_path / "meta.jsonl", image_root=root, split_column="split")
    )
    assert [(p.row, p.kind) for p in ds.problems] == [
        (2, "malformed"),
        (3, "malformed"),
        (4, "bad_split"),
    ]
    assert [r.split for r in ds.records] == ["train", "val"]

    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    folder = validate(DataConfig(image_root=root, classes_file=tmp_path / "classes.txt"))
    assert [(r.path, r.label) for r in folder.records] == [
        ("a/1.jpg", "a"),
        ("a/2.jpg", "a"),
        ("b/3.jpg", "b"),
    ]
    assert folder.taxonomy == ["a", "b", "c"] and folder.total == 3
    assert folder.extra["ignored_files"] == 1 and folder.extra["ignored_files_examples"] == [
        "b/notes.txt"
    ]


# ---------------------------------------------------------------------------------------
# user errors: one message naming the field or file, and the fix


def _small_csv(tmp: Path, header: str = "path,label") -> None:
    _write_images(tmp / "images", {"x.jpg": ""})
    (tmp / "meta.csv").write_text(f"{header}\nx.jpg,a\n")


@pytest.mark.parametrize(
    "data, match, fix",
    [
        (
            {"metadata": "nope.csv"},
            r"data.metadata file .*nope.csv does not exist",
            "fix data.metadata",
        ),
        ({"label_column": "class"}, r"data.label_column 'class' is not a column", "path, label"),
        ({"path_column": "file"}, r"data.path_column 'file' is not a column", "path, label"),
        ({"split_column": "fold"}, r"data.split_column 'fold' is not a column", "path, label"),
        (
            {"classes_file": "none.txt"},
            r"data.classes_file .*none.txt does not exist",
            "set it to null",
        ),
        ({"classes_file": "dup.txt"}, r"dup.txt lists 'a' twice", "keep each class name once"),
        (
            {"metadata": None, "image_root": "nowhere"},
            r"data.image_root .*nowhere is not a folder",
            "<class>/<image>",
        ),
    ],
)
def test_user_errors(tmp_path: Path, data: dict, match: str, fix: str) -> None:
    _small_csv(tmp_path)
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    data = {
        k: (tmp_path / v if k in ("metadata", "classes_file", "image_root") and v else v)
        for k, v in data.items()
    }
    cfg = DataConfig(
        **{"metadata": tmp_path / "meta.csv", "image_root": tmp_path / "images", **data}
    )
    with pytest.raises(DataError, match=match) as exc:
        validate(cfg)
    assert fix in exc.value.fix


def test_parquet_without_pyarrow_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from samprobe.errors import ConfigError

    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="needs pyarrow") as exc:
        validate(DataConfig(metadata=tmp_path / "m.parquet"))
    assert "samprobe[parquet]" in exc.value.fix


def test_no_usable_rows_and_missing_splits_via_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from samprobe.cli import main

    (tmp_path / "images").mkdir()
    (tmp_path / "meta.csv").write_text("path,label\ngone.jpg,a\n")
    (tmp_path / "cfg.yaml").write_text(
        "run_dir: run\ndata:\n  metadata: meta.csv\n  image_root: images\n"
    )
    assert main(["validate", "-c", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("samprobe: error [")
        and "no usable rows in" in err[-1]
        and "bad_rows.csv" in err[-1]
    )
    with pytest.raises(DataError, match="splits.csv does not exist") as exc:
        read_splits(tmp_path / "other_run" / "splits.csv")
    assert "samprobe validate" in exc.value.fix


def test_folder_layout_hidden_empty_and_top_level(tmp_path: Path) -> None:
    from samprobe.data.data_report import summary_lines, write_report

    root = tmp_path / "images"
    _write_images(
        root,
        {"cat/1.jpg": "", "cat/.2.jpg": "", ".thumbs/3.jpg": "", "stray.jpg": "", "dog/4.jpg": ""},
    )
    (root / "empty_class").mkdir()
    ds = validate(DataConfig(image_root=root))
    # the empty folder is a class; .thumbs is not
    assert ds.taxonomy == [
        "cat",
        "dog",
        "empty_class",
    ]
    assert [(r.path, r.label) for r in ds.records] == [("cat/1.jpg", "cat"), ("dog/4.jpg", "dog")]
    reasons = ds.extra["ignored_by_reason"]
    assert reasons["top_level_images"]["examples"] == ["stray.jpg"]
    assert sorted(reasons["hidden"]["examples"]) == [".thumbs/", "cat/.2.jpg"]
    lines = summary_lines(write_report(ds, tmp_path / "run"), ds.problems)
    assert any("no class folder" in ln and "stray.jpg" in ln for ln in lines), lines
    assert not any("not images by suffix" in ln for ln in lines), lines
    # listed among the classes without training images
    assert any("empty_class" in ln for ln in lines)


def test_classes_file_comments_and_empty_split_cells(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = {f"{c}{k}.jpg": c for c in "ab" for k in range(3)}
    _write_images(root, names)
    (tmp_path / "classes.txt").write_text("# taxonomy v2\na\n\n  # b was renamed\nb\nc\n")
    splits = ["train", "", "test", "train", "  ", "val"]
    (tmp_path / "meta.csv").write_text(
        "path,label,split\n" + "".join(f"{n},{c},{s}\n" for (n, c), s in zip(names.items(), splits))
    )
    ds = validate(
        DataConfig(
            metadata=tmp_path / "meta.csv",
            image_root=root,
            split_column="split",
            classes_file=tmp_path / "classes.txt",
        )
    )
    assert ds.taxonomy == ["a", "b", "c"] and not ds.problems
    # blank: assigned later
    assert [r.split for r in ds.records] == [
        "train",
        None,
        "test",
        "train",
        None,
        "val",
    ]


def test_validate_progress_bar_ends_at_n_of_n(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    _write_images(root, {f"a/{k}.jpg": "" for k in range(3)})
    validate(DataConfig(image_root=root), progress=True)
    assert "3/3" in capsys.readouterr().err


def test_check_file_with_a_locator_answers_as_the_full_resolve(tmp_path: Path) -> None:
    """The locator (each folder resolved once, a file stat'ed once) gives every row the answer
    `Path.resolve` gives: symlinked files and folders, `..`, paths leaving the root, missing
    files, folders, backslashes, absolute paths, a NUL; and it does take the short way."""
    from samprobe.data.validate import _Locator, check_file

    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    png = _png(Image.fromarray(photos()["square"][:40, :40]))
    for rel in ("a/one.png", "a/b/two.png", "top.png", "a\\odd.png"):
        (root / rel).write_bytes(png)
    (tmp_path / "elsewhere" / "out.png").write_bytes(png)
    (tmp_path / "images-side").mkdir()  # shares the root's name as a prefix
    (tmp_path / "images-side" / "x.png").write_bytes(png)
    os.symlink(root / "a" / "one.png", root / "link_in.png")
    os.symlink(tmp_path / "elsewhere" / "out.png", root / "a" / "link_out.png")
    os.symlink(tmp_path / "elsewhere", root / "dir_out")
    os.symlink(root / "a" / "b", root / "dir_in")
    os.symlink(root / "loop", root / "loop")
    paths = [
        "a/one.png", "a/b/two.png", "./a//b/two.png", "a/b/../one.png", "a/b/../../top.png",
        "top.png", "link_in.png", "a/link_out.png", "dir_out/out.png", "dir_in/two.png",
        "dir_in/../one.png", "a\\b\\two.png", "a\\odd.png", "../elsewhere/out.png",
        "../images-side/x.png", "nowhere.png", "a/nowhere/x.png", "a", "a/b/", "a/..", "loop",
        "loop/x.png", str(root / "a" / "one.png"), str(tmp_path / "elsewhere" / "out.png"),
        "a/one.png\0", "x" * 300 + ".png",
    ]  # fmt: skip
    real = root.resolve()
    locator = _Locator(root, real)
    for read in (True, False):
        for p in paths:
            full = check_file(root, real, p, max_pixels=10**6, read=read)
            short = check_file(
                root, root.resolve(), p, max_pixels=10**6, read=read, locator=locator
            )
            assert short == full, p
    kinds = {p: check_file(root, real, p, max_pixels=10**6).kind for p in paths}
    assert kinds["a/one.png"] is None and kinds["dir_in/two.png"] is None
    assert kinds["a/link_out.png"] == kinds["../images-side/x.png"] == "outside_root"
    assert kinds["nowhere.png"] == kinds["a"] == "missing"
    assert kinds["a/one.png\0"] == "bad_path"
    # the short way: the folders of the plain rows resolved once each, not once per row
    assert set(locator.folders) >= {str(root / "a"), str(root / "a" / "b")}
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            Path, "resolve", lambda self, *a, **k: calls.append(self) or os.path.realpath(self)
        )
        for p in ("a/one.png", "a/b/two.png", "top.png"):
            assert check_file(root, real, p, max_pixels=10**6, locator=locator).kind is None
    assert calls == []


def test_read_all_reads_to_the_end_whatever_fstat_said(tmp_path: Path) -> None:
    """Validation reads a file in one call when fstat's size is right, and every byte when it is
    not (a file that grew, one that shrank, /proc files that say 0 bytes)."""
    from samprobe.data.validate import _read_all

    data = os.urandom(200_000)
    (tmp_path / "f").write_bytes(data)
    for size in (200_000, 0, 10, 199_999, 200_001, 10**6):
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            assert _read_all(fd, size) == data, size
        finally:
            os.close(fd)
    (tmp_path / "empty").write_bytes(b"")
    fd = os.open(tmp_path / "empty", os.O_RDONLY)
    assert _read_all(fd, 0) == b""
    os.close(fd)
    if Path("/proc/self/status").exists():
        fd = os.open("/proc/self/status", os.O_RDONLY)
        assert os.fstat(fd).st_size == 0 and b"Pid:" in _read_all(fd, 0)
        os.close(fd)
