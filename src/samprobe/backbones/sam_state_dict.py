"""Reading SAM image-encoder weights: files, key layouts, and the geometry they imply.

Accepted inputs, all normalised to timm ``VisionTransformerSAM`` key names:
- the official full SAM checkpoint (``image_encoder.*`` keys; prompt encoder / mask decoder dropped),
- an encoder-only state dict in ``segment_anything`` naming (``mlp.lin1``...),
- a timm ``samvit_*`` state dict (``mlp.fc1``..., maybe a ``head.*``), ``.pth`` or ``.safetensors``,
- any of these inside a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper.

Geometry comes from tensor shapes only, so detection is cheap and works on meta tensors.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from samprobe.errors import CheckpointError, ConfigError

# (embed_dim, depth) -> (variant, official global-attention block indexes, heads). vit_h has
# head_dim 80 (1280 / 16), the others 64: heads come from the rel-pos table width, not a rule.
KNOWN_VARIANTS: dict[tuple[int, int], tuple[str, tuple[int, ...], int]] = {
    (768, 12): ("vit_b", (2, 5, 8, 11), 12),
    (1024, 24): ("vit_l", (5, 11, 17, 23), 16),
    (1280, 32): ("vit_h", (7, 15, 23, 31), 16),
}
DOWNLOAD_FIX = (
    "download it with `samprobe weights download sam_vit_b --dir weights` "
    "and set backbone.checkpoint to the file it prints"
)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class SamGeometry:
    """The encoder shape a state dict implies."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    pos_embed_grid: tuple[int, int]
    out_chans: int
    mlp_ratio: float
    variant: str  # vit_b | vit_l | vit_h | custom

    def describe(self) -> str:
        return f"{self.variant} encoder (embed {self.embed_dim}, depth {self.depth})"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        d["pos_embed_grid"] = list(self.pos_embed_grid)
        return d


# ---------------------------------------------------------------------------------------
# files


def _read_cause(exc: BaseException) -> str:
    """Turn a torch.load failure into a cause a user can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return (
            "it holds Python objects besides tensors, which weights_only=True refuses to "
            f"unpickle because doing so could run code ({text})"
        )
    if (
        isinstance(exc, (EOFError, zipfile.BadZipFile))
        or "zip archive" in str(exc)
        or "EOF" in str(exc)
    ):
        return f"the file is truncated or corrupt ({text})"
    if isinstance(exc, pickle.UnpicklingError):
        return f"it is not a PyTorch checkpoint ({text})"
    return f"{type(exc).__name__}: {text}"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely (never unpickles code) -> flat ``{name: tensor}``."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"SAM checkpoint {path} {what}", fix=DOWNLOAD_FIX)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(
                f"cannot read SAM checkpoint {path}: not a valid safetensors file ({exc})",
                fix="re-download the file; check its size against the source",
            ) from None
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip (PK..); the legacy format starts with a pickle PROTO opcode.
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
            raise CheckpointError(
                f"cannot read SAM checkpoint {path}: it is not a PyTorch checkpoint "
                f"(starts with {head!r}, expected a torch.save zip or pickle)",
                fix="point backbone.checkpoint at the .pth weights file, not an image or text file",
            )

        def load(mmap: bool) -> Any:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

        try:
            # A zip checkpoint is memory-mapped: building the encoder (meta device, assign=True)
            # reads
            # no weight until it is used, so train / evaluate, which only need the fingerprint, stay
            # quick.
            try:
                obj = load(mmap=head.startswith(b"PK\x03\x04"))
            except RuntimeError:
                # a filesystem that cannot map files; a bad file fails again below
                obj = load(mmap=False)
        except Exception as exc:  # torch raises several types for bad files; all mean the same here
            raise CheckpointError(
                f"cannot read SAM checkpoint {path}: {_read_cause(exc)}",
                fix="use an official SAM .pth (or a timm samvit_* .pth/.safetensors); "
                "re-download it if it is truncated",
            ) from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(
    obj: Any,
    path: Path | str = "<state dict>",
    fix: str = "point backbone.checkpoint at an official SAM .pth or a timm samvit_* file",
) -> dict[str, torch.Tensor]:
    """Accept ``state_dict`` or ``{"model"|"state_dict": state_dict}`` (every backbone's weights
    file is read through here); check it is tensors."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise CheckpointError(
            f"{path} is not a state dict of tensors ({type(obj).__name__})",
            fix=fix,
        )
    return dict(obj)


# ---------------------------------------------------------------------------------------
# key layouts


def to_timm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any accepted layout -> timm ``VisionTransformerSAM`` names, encoder tensors only."""
    if any(k.startswith("image_encoder.") for k in state_dict):
        # Official full SAM: keep the encoder, drop prompt encoder / mask decoder / pixel stats.
        state_dict = {
            k[len("image_encoder.") :]: v
            for k, v in state_dict.items()
            if k.startswith("image_encoder.")
        }
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):  # DataParallel wrappers
            k = k[len("module.") :]
        if k.startswith("head."):  # timm classifier head: not part of the SAM encoder
            continue
        out[k.replace("mlp.lin", "mlp.fc")] = v
    return out


def _require(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        seen = ", ".join(list(sd)[:5])
        raise CheckpointError(
            f"{where} does not hold a SAM image encoder: no {key!r} (keys start: {seen})",
            fix="use an official SAM checkpoint (sam_vit_b/l/h) or a timm samvit_* state dict",
        )
    return sd[key]


def infer_geometry(
    state_dict: Mapping[str, torch.Tensor], where: str = "the state dict"
) -> SamGeometry:
    """Encoder geometry from tensor SHAPES only (works on meta tensors; no forward)."""
    sd = to_timm_keys(state_dict)
    patch_w = _require(sd, "patch_embed.proj.weight", where)  # [embed, 3, p, p]
    pos = _require(sd, "pos_embed", where)  # [1, gh, gw, embed]
    embed_dim, patch_size = int(patch_w.shape[0]), int(patch_w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        _require(sd, "blocks.0.attn.qkv.weight", where)
    grid = (int(pos.shape[1]), int(pos.shape[2]))
    # rel_pos tables are [2*S-1, head_dim]: S is the grid for global blocks, the window otherwise.
    lengths = [
        int(_require(sd, f"blocks.{i}.attn.rel_pos_h", where).shape[0]) for i in range(depth)
    ]
    head_dim = int(sd["blocks.0.attn.rel_pos_h"].shape[1])
    global_len = 2 * grid[0] - 1
    known = KNOWN_VARIANTS.get((embed_dim, depth))
    if len(set(lengths)) > 1:
        global_idx = tuple(i for i, n in enumerate(lengths) if n == max(lengths))
        window = (min(lengths) + 1) // 2
    elif known is not None and lengths[0] == global_len:
        # Window == grid (e.g. a 224 model): shapes cannot tell; the official layout is the answer.
        global_idx, window = known[1], (lengths[0] + 1) // 2
    elif lengths[0] == global_len:
        global_idx, window = tuple(range(depth)), 0
    else:
        global_idx, window = (), (lengths[0] + 1) // 2
    out_chans = int(_require(sd, "neck.0.weight", where).shape[0])
    mlp_ratio = int(_require(sd, "blocks.0.mlp.fc1.weight", where).shape[0]) / embed_dim
    # A known name only when everything matches the official model, else "custom".
    official = known is not None and (
        global_idx,
        embed_dim // head_dim,
        patch_size,
        window,
        out_chans,
        mlp_ratio,
    ) == (known[1], known[2], 16, 14, 256, 4.0)
    variant = known[0] if official else "custom"
    return SamGeometry(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window,
        patch_size=patch_size,
        pos_embed_grid=grid,
        out_chans=out_chans,
        mlp_ratio=mlp_ratio,
        variant=variant,
    )


def check_variant(requested: str, geometry: SamGeometry, where: str) -> None:
    """A config that names a variant must get that variant: say both when it does not."""
    if requested in ("auto", None) or requested == geometry.variant:
        return
    raise ConfigError(
        f"backbone.variant is {requested} but {where} holds a {geometry.describe()}",
        fix=f"set backbone.variant: {geometry.variant} (or auto), or point backbone.checkpoint "
        f"at {requested} weights",
    )


# ---------------------------------------------------------------------------------------
# input-size adaptation


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """[L, hd] -> [length, hd] by linear interpolation, exactly as SAM/timm ``get_rel_pos`` does on the fly."""
    if rel_pos.shape[0] == length:
        return rel_pos
    out = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")  # [1, hd, length]
    return out[0].t().to(rel_pos.dtype).contiguous()


def adapt_to_grid(
    sd: dict[str, torch.Tensor], geometry: SamGeometry, grid: int
) -> dict[str, torch.Tensor]:
    """Resize pos_embed (timm's bicubic resample) and the global blocks' rel_pos tables for a new grid.

    Doing it once here gives the same numbers timm computes on every forward at another size.
    """
    from timm.layers import resample_abs_pos_embed_nhwc

    if (grid, grid) == geometry.pos_embed_grid:
        return sd
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed_nhwc(sd["pos_embed"], [grid, grid])
    for i in geometry.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            sd[key] = resize_rel_pos(sd[key], 2 * grid - 1)
    return sd
