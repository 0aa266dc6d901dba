"""User-facing errors.

Every expected failure (bad config, missing file, wrong checkpoint, unwritable cache) is a
``SamprobeError``: the CLI prints ``error: <message>`` plus ``fix: <hint>`` and exits 2,
with no traceback unless ``--debug``. Anything else is a bug and exits 1.

Each subclass has a stable ``code`` so docs/troubleshooting.md can list it (a test checks
that every code defined here is documented).
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain_text(text: str) -> str:
    """``text`` without terminal escape codes: torch.load's weights-only message carries bold
    markers (ESC[1m ... ESC[0m) that show as garbage in run.log and in terminals without colour."""
    return _ANSI.sub("", text)


class SamprobeError(Exception):
    """An expected user error: says what is wrong and how to fix it."""

    code = "SP000"
    exit_code = 2

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


class ConfigError(SamprobeError):
    """The config file or a --set override is invalid."""

    code = "SP100"


class DataError(SamprobeError):
    """Metadata or images cannot be used (missing file, bad rows with on_bad_rows=error)."""

    code = "SP200"


class CheckpointError(SamprobeError):
    """A weights or head checkpoint cannot be loaded or does not fit the config."""

    code = "SP300"


class CacheError(SamprobeError):
    """The feature cache location cannot be created, written, or read."""

    code = "SP400"


class TrainingError(SamprobeError):
    """Training cannot go on (no active class, non-finite loss)."""

    code = "SP500"


class DeviceError(SamprobeError):
    """The requested device or precision is not available, or memory ran out at batch size 1."""

    code = "SP600"


class DownloadError(SamprobeError):
    """A weights download failed or its checksum does not match."""

    code = "SP700"


def all_error_types() -> list[type[SamprobeError]]:
    """Every user-facing error class, for docs checks."""
    seen: list[type[SamprobeError]] = [SamprobeError]
    stack = [SamprobeError]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen
