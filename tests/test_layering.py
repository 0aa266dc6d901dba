"""The stage hub stays a hub: ``samprobe.pipeline`` calls into every other module, none calls back
(only the CLI and the demo, which run stages, import it)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "samprobe"
MAY_IMPORT_PIPELINE = {"cli.py", "demo.py"}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_only_the_cli_and_the_demo_import_the_pipeline():
    offenders = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p.name not in MAY_IMPORT_PIPELINE and "samprobe.pipeline" in imported_modules(p)
    )
    assert not offenders, f"these modules import samprobe.pipeline: {offenders}"


def test_the_check_sees_an_import_of_the_pipeline(tmp_path):
    # the check itself can fail: a function-level import is found as well as a top-level one
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from samprobe.pipeline import load_dataset\n")
    assert "samprobe.pipeline" in imported_modules(module)
    module.write_text("from samprobe import pipeline\n")
    assert "samprobe.pipeline" in imported_modules(module)


def test_the_cli_starts_without_the_heavy_libraries_only_some_commands_use():
    """sklearn (1.3 s) and matplotlib (0.5 s) are imported where metrics are computed and plots
    drawn: every torchrun rank and every `samprobe cache ...` would pay them at start otherwise."""
    import subprocess
    import sys

    code = (
        "import sys, samprobe.cli, samprobe.pipeline; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'matplotlib', 'cleanlab'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
