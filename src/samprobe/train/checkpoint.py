"""Head checkpoints: plain tensors and builtins only, so ``torch.load(weights_only=True)`` reads
them; written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samprobe.errors import CheckpointError
from samprobe.io import atomic_torch_save

FORMAT = "samprobe.head/1"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    atomic_torch_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist",
            fix="pass --checkpoint RUN_DIR/checkpoints/best.pt from a finished `samprobe train`",
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or a pickle that wants code
        raise CheckpointError(
            f"{path} cannot be read as a samprobe checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            fix="pass a checkpoints/best.pt written by `samprobe train`",
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a samprobe head checkpoint (format "
            f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})",
            fix="pass checkpoints/best.pt from a samprobe run; SAM weights go in backbone.checkpoint",
        )
    return ckpt
