"""docs/troubleshooting.md documents every error samprobe raises and every error of the seed notes."""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass
from pathlib import Path

from samprobe import errors

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "samprobe"
DOCS = REPO / "docs" / "troubleshooting.md"
SEED_ERRORS = [  # the error lines of the seed notes (shared/seed/common-errors.md)
    "Cannot re-initialize CUDA in forked subprocess",
    "CUDA out of memory",
    "IndexError: index out of range in self",
    "GradScaler(args...)` is deprecated",
    "PermissionError: [Errno 13] Permission denied",
    "FileNotFoundError: [Errno 2] No such file or directory",
    "Error(s) in loading state_dict",
    "wandb.errors.CommError",
]


@dataclass
class RaiseSite:
    file: str
    line: int
    error: str
    # the longest literal part of the message, None when the message is a variable
    literal: str | None


def _literal(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = [node.value]
    elif isinstance(node, ast.JoinedStr):
        parts = [
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        ]
    else:
        return None
    best = max((p.strip() for p in parts), key=len, default="")
    return best if len(best) >= 4 else None


def raise_sites() -> list[RaiseSite]:
    sites = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else None
                )
                if name and name.endswith("Error"):
                    msg = _literal(node.exc.args[0]) if node.exc.args else None
                    sites.append(RaiseSite(str(path.relative_to(SRC)), node.lineno, name, msg))
    return sites


def docs_text() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_the_scan_finds_raise_sites():
    sites = raise_sites()
    assert any(s.error == "CheckpointError" and s.file == "train/checkpoint.py" for s in sites)
    assert any(s.literal == "does not hold EfficientNet-Lite0 weights (" for s in sites)


def test_every_error_class_has_a_section_with_its_code():
    text = docs_text()
    for cls in errors.all_error_types():
        assert re.search(rf"^#+ {re.escape(cls.code)} {cls.__name__}\b", text, re.M), (
            f"docs/troubleshooting.md lacks a '### {cls.code} {cls.__name__}' section"
        )
    codes = [cls.code for cls in errors.all_error_types()]
    assert len(codes) == len(set(codes)), f"duplicate error codes: {codes}"


def test_every_raised_error_type_is_a_samprobe_error_or_a_builtin():
    """A user-facing error must be a SamprobeError subclass (exit 2, code, docs); builtins are bug guards."""
    ours = {cls.__name__ for cls in errors.all_error_types()}
    for site in raise_sites():
        assert site.error in ours or isinstance(getattr(builtins, site.error, None), type), (
            f"{site.file}:{site.line} raises {site.error}, which is neither in samprobe.errors "
            f"nor a builtin"
        )


def test_every_raise_site_message_is_documented():
    text = docs_text()
    ours = {cls.__name__ for cls in errors.all_error_types()}
    missing = [
        f"{s.file}:{s.line} {s.error}({s.literal!r})"
        for s in raise_sites()
        if s.error in ours and s.literal and s.literal not in text
    ]
    assert not missing, "add these messages to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_every_seed_error_is_covered():
    text = docs_text()
    seed_part = text[text.index("## Errors from the seed notes") :]
    for err in SEED_ERRORS:
        assert err in seed_part, f"seed error {err!r} is not in docs/troubleshooting.md"
    for section in re.split(r"^### ", seed_part, flags=re.M)[1:]:
        assert "Prevented:" in section, (
            f"seed section {section.splitlines()[0]!r} does not say whether samprobe prevents it"
        )
