"""Shared fixtures: small real-image datasets written on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.digits import write_config, write_digits


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after (oneDNN results depend on the thread
    count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def digits_project(tmp_path: Path) -> Path:
    """tmp_path with data/ (4 digit classes x 20 real scans) and samprobe.yaml
    (efficientnet_lite0 @96px)."""
    write_digits(tmp_path / "data")
    write_config(tmp_path / "samprobe.yaml")
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory):
    """Weights hashes are remembered under $XDG_CACHE_HOME: tests use their own, never the user's
    (session scope: set before any module-scoped fixture extracts features)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    yield
    patch.undo()
