"""Fuzzing the metadata reader through the CLI: whatever bytes, encoding, delimiter or column names a
metadata file holds, `samprobe validate` ends in exit 0 (rows read, bad ones reported) or exit 2 (one
line naming the file and the fix), never in exit 1."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from samprobe.cli import main

ENCODINGS = [
    "utf-8",
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "cp1252",
    "latin-1",
    "shift_jis",
]
DELIMITERS = [",", ";", "\t", "|", ":", " "]
SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet", ""]

names = st.one_of(
    st.sampled_from(["path", "label", "split", "", " path ", "Path", "ï»¿path"]),
    st.text(max_size=12),
)
odd = st.one_of(
    st.sampled_from(["", "NaN", "null", '"', "1" * 5000, "²", "a\x00b", "-1", "0"]),
    st.text(max_size=40),
)
# cells by column, so that many rows get as far as the image checks: real files, Windows and outside
# paths
column_cells = {
    "path": st.one_of(
        st.sampled_from(
            [
                "img.png",
                "other.png",
                "img.png",
                "other.png",
                "sub/img.png",
                "sub\\img.png",
                "C:\\x\\img.png",
                "../img.png",
                "/etc/passwd",
                "a" * 300 + ".png",
            ]
        ),
        odd,
    ),
    "label": st.one_of(st.sampled_from(["cat", "dog", "1"]), odd),
    "split": st.one_of(
        st.sampled_from(["train", "val", "Validation", "test", "holdout", " "]), odd
    ),
}


@st.composite
def tables(draw: st.DrawFn) -> tuple[bytes, str, dict]:
    """(file bytes, suffix, data settings): a table in a random dialect, or random bytes."""
    suffix = draw(st.sampled_from(SUFFIXES))
    # mostly a plausible table and config, so rows get as far as the image checks
    if draw(st.integers(0, 3)):
        header = draw(st.sampled_from([["path", "label"], ["split", "label", "path"]]))
        settings_ = {
            "path_column": "path",
            "label_column": "label",
            "split_column": draw(st.sampled_from([None, "split"])) if "split" in header else None,
        }
    else:
        header = draw(st.lists(names, min_size=1, max_size=4))
        settings_ = {
            "path_column": draw(st.one_of(st.sampled_from(header), names)),
            "label_column": draw(st.one_of(st.sampled_from(header), names)),
            "split_column": draw(st.one_of(st.none(), st.sampled_from(header), names)),
        }
    # one cell per column, sometimes one cell more or fewer
    row = st.tuples(*(column_cells.get(h, odd) for h in header)).map(list)
    rows = draw(
        st.lists(
            st.one_of(
                row, row.map(lambda r: r[:-1]), st.tuples(row, odd).map(lambda t: [*t[0], t[1]])
            ),
            min_size=1,
            max_size=6,
        )
    )
    kind = draw(st.sampled_from(["bytes", "delimited", "delimited", "json lines", "json array"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600)), suffix, settings_
    if kind == "delimited":
        delim = draw(st.sampled_from(DELIMITERS))
        quote = draw(st.booleans())
        newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        fmt = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
        text = newline.join(delim.join(fmt(c) for c in row) for row in [header, *rows]) + newline
    else:
        objs = [dict(zip(header, row)) for row in rows]
        if draw(st.booleans()):  # numbers, nulls and nesting where strings are expected
            objs.append(
                {
                    settings_["path_column"]: draw(
                        st.one_of(
                            st.integers(),
                            st.floats(),
                            st.none(),
                            st.lists(st.integers(), max_size=2),
                        )
                    ),
                    settings_["label_column"]: draw(
                        st.one_of(st.integers(), st.floats(), st.booleans())
                    ),
                }
            )
        if kind == "json lines":
            # lone surrogates
            tail = [
                "",
                "\n",
                "\n{broken",
                "\n[1, 2]",
                '\n{"path": "\\ud800.png", "label": "\\udfff"}',
            ]
            text = "\n".join(json.dumps(o) for o in objs) + draw(st.sampled_from(tail))
        else:
            text = json.dumps(objs, indent=draw(st.sampled_from([None, 1])))
    encoding = draw(st.sampled_from(ENCODINGS))
    return text.encode(encoding, errors="replace"), suffix, settings_


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-images")
    (root / "sub").mkdir()
    from sklearn.datasets import load_digits

    digits = load_digits().images
    # three real scans, distinct bytes
    for k, name in enumerate(("img.png", "other.png", "sub/img.png")):
        Image.fromarray(
            np.clip(np.rint(digits[k] * 255 / 16), 0, 255).astype(np.uint8), mode="L"
        ).save(root / name)
    return root


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.slow
@given(table=tables(), use_classes_file=st.integers(0, 3).map(lambda k: k == 0))
def test_validate_never_exits_1(
    image_root: Path, capsys: pytest.CaptureFixture[str], table, use_classes_file
) -> None:
    data, suffix, columns = table
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / f"meta{suffix}"
        meta.write_bytes(data)
        cfg = {
            "run_dir": str(Path(tmp) / "run"),
            "device": "cpu",
            "data": {"metadata": str(meta), "image_root": str(image_root), **columns},
        }
        # the same bytes as a classes file: any text is a taxonomy, binary is refused
        if use_classes_file:
            cfg["data"]["classes_file"] = str(meta)
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        rc = main(["validate", "-c", str(Path(tmp) / "c.yaml")])
    err = capsys.readouterr().err
    assert rc in (0, 2), err
    assert "unexpected error" not in err
    if rc == 2:
        line = err.strip().splitlines()[-1]
        assert line.startswith("samprobe: error [SP") and "Fix:" in line, err
