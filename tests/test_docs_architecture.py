"""docs/architecture.md cannot go stale: every name it puts in backticks is checked against the
code. ``samprobe.x.y`` is imported / looked up, a config key (``train.head``) must be a Config
field, ``samprobe <command>`` a CLI command, a repo path (``src/...``, ``tests/...``) a file, and a
bare name (``encode``) an attribute of a class or module named in the same section."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from samprobe.cli import build_parser
from samprobe.config import Config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
EXTENSIONS = ("A backbone", "A pooling", "A head", "A metric", "A CLI command")

CODE = re.compile(r"samprobe(\.[A-Za-z_]\w*)+")
REPO_PATH = re.compile(r"(src|tests|docs|bench)/[\w./-]*")
BARE = re.compile(r"[A-Za-z_]\w*")


def sections(text: str) -> dict[str, list[str]]:
    """Heading -> the inline code spans under it (fenced blocks left out)."""
    out: dict[str, list[str]] = {"": []}
    current, fenced = "", False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            current = line.lstrip("#").strip()
            out[current] = []
        elif not fenced:
            out[current] += re.findall(r"`([^`]+)`", line)
    return out


def resolve(dotted: str) -> object:
    """The object ``dotted`` names: its longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # this prefix is not a module: look the rest up as attributes
            raise  # a module that exists failed to import
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def config_error(key: str) -> str | None:
    model: type[BaseModel] | None = Config
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return f"`{key}`: no config field {part!r}"
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return None


def cli_error(words: list[str]) -> str | None:
    parser = build_parser()
    for word in words:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            return f"`samprobe {' '.join(words)}`: no command {word!r}"
        parser = sub.choices[word]
    return None


def check(spans_by_section: dict[str, list[str]]) -> tuple[list[str], dict[str, int]]:
    """(errors, how many spans of each kind were checked)."""
    errors: list[str] = []
    counts = dict.fromkeys(("code", "config", "cli", "path", "member"), 0)
    for spans in spans_by_section.values():
        named: list[object] = []  # what bare names in this section may be attributes of
        for span in spans:
            if CODE.fullmatch(span):
                counts["code"] += 1
                try:
                    named.append(resolve(span))
                except (ImportError, AttributeError) as exc:
                    errors.append(f"`{span}`: {exc}")
        for span in spans:
            if CODE.fullmatch(span):
                continue
            if span.startswith("samprobe "):
                counts["cli"] += 1
                error = cli_error([w for w in span.split()[1:] if not w.startswith("-")])
            elif REPO_PATH.fullmatch(span):
                counts["path"] += 1
                error = (
                    None if (REPO / span).exists() else f"`{span}`: no such file in the repository"
                )
            elif (
                re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", span)
                and span.split(".")[0] in Config.model_fields
            ):
                counts["config"] += 1
                error = config_error(span)
            elif BARE.fullmatch(span) and span not in Config.model_fields:
                counts["member"] += 1
                error = (
                    None
                    if any(hasattr(obj, span) for obj in named)
                    else (f"`{span}`: not an attribute of anything this section names")
                )
            else:
                continue  # file names of a run (`splits.csv`), options (`--resume`): prose
            if error:
                errors.append(error)
    return errors, counts


def test_every_name_on_the_architecture_page_exists():
    errors, counts = check(sections(DOC.read_text(encoding="utf-8")))
    assert not errors, "\n".join(errors)
    assert all(counts.values()), counts  # every kind of reference is on the page, so each check ran


def test_the_page_names_the_place_for_each_extension():
    spans = sections(DOC.read_text(encoding="utf-8"))
    for heading in EXTENSIONS:
        assert heading in spans, f"docs/architecture.md has no section {heading!r}"
        assert any(CODE.fullmatch(s) for s in spans[heading]), (
            f"{heading!r} names no module, class or function"
        )


@pytest.mark.parametrize(
    "span",
    [
        "samprobe.train.heads.NoSuchHead",
        "samprobe.no_such_module.run",
        "train.no_such_key",
        "samprobe no-such-command",
        "src/samprobe/no_such.py",
        "no_such_member",
    ],
)
def test_a_stale_name_is_reported(span: str):
    errors, _ = check({"A backbone": ["samprobe.backbones.registry.Backbone", span]})
    assert len(errors) == 1 and span in errors[0], errors
