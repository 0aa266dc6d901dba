"""The resume check shared by the sweep tests: a run stopped after some epochs (as a kill
leaves it: only the saved state survives) and resumed must end bit for bit as an
uninterrupted one."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from samprobe.train.loop import SweepResult, SweepTrainer


def assert_resumes_bitwise(
    make: Callable[[], SweepTrainer], stop_after: int
) -> tuple[SweepResult, dict[str, Any]]:
    """``make`` builds the same trainer each call; returns the resumed run's result and the
    saved state."""
    full = make().run()
    part = make()
    part.run(until_epoch=stop_after)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    torch.manual_seed(999)  # a fresh process has another global RNG state
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = make()
    # it lives in metrics.jsonl: last.pt must not grow with the epochs
    assert "history" not in state
    resumed.load_state_dict(state, part.history)
    res = resumed.run()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k
    assert full.history == res.history and full.table == res.table
    return res, state
