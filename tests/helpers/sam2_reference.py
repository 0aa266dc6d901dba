"""The official SAM 2.1 code (PyPI ``sam2`` 1.1.0), run in a process of its own.

Importing ``sam2`` initialises Hydra globally (``initialize_config_module`` at import), so the
tests never import it: they run this file as a script and read what it writes.

    python sam2_reference.py checkpoint SIZE IMG_SIZE SEED OUT_DIR IMAGE...
        builds sam2.1_hiera_SIZE with random weights, writes OUT_DIR/sam2.1_hiera_SIZE.pt exactly
        as the official release does ({"model": state_dict}), and OUT_DIR/reference.pt: the
        official SAM2Transforms input, image_encoder's vision_features and the trunk's stages for
        each skimage.data IMAGE.
    python sam2_reference.py shapes OUT_JSON
        {size: {key: shape}} of the image encoder of every official config (for detection tests).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("SAM2_BUILD_CUDA", "0")

import torch  # noqa: E402

SIZES = ("t", "s", "b+", "l")


def _config(size: str) -> str:
    return f"configs/sam2.1/sam2.1_hiera_{size}.yaml"


def _randomise_positional(model: torch.nn.Module) -> None:
    """Hiera initialises both position embeddings to zeros: parity against zeros would miss a mix-up."""
    trunk = model.image_encoder.trunk
    with torch.no_grad():
        for p in (trunk.pos_embed, trunk.pos_embed_window):
            p.copy_(torch.randn_like(p) * 0.02)


def checkpoint(size: str, img_size: int, seed: int, out_dir: str, images: list[str]) -> None:
    from sam2.build_sam import build_sam2
    from sam2.utils.transforms import SAM2Transforms
    from skimage import data

    torch.manual_seed(seed)
    model = build_sam2(_config(size), ckpt_path=None, device="cpu", mode="eval")
    _randomise_positional(model)
    torch.save({"model": model.state_dict()}, os.path.join(out_dir, f"sam2.1_hiera_{size}.pt"))
    transforms = SAM2Transforms(resolution=img_size, mask_threshold=0.0)
    x = torch.stack([transforms(getattr(data, name)()) for name in images])  # [B, 3, S, S]
    with torch.no_grad():
        enc = model.image_encoder(x)
        stages = model.image_encoder.trunk(x)  # stride 4, 8, 16, 32
    torch.save(
        {"input": x, "vision_features": enc["vision_features"], "stages": list(stages)},
        os.path.join(out_dir, "reference.pt"),
    )


def shapes(out_json: str) -> None:
    from hydra import compose
    from hydra.utils import instantiate

    out = {}
    for size in SIZES:
        encoder = instantiate(
            compose(config_name=_config(size)).model.image_encoder, _recursive_=True
        )
        out[size] = {f"image_encoder.{k}": list(v.shape) for k, v in encoder.state_dict().items()}
        del encoder
    with open(out_json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    import sam2  # noqa: F401  (initialises Hydra with the package's configs)

    torch.set_num_threads(int(os.environ.get("SAM2_REF_THREADS", torch.get_num_threads())))
    if sys.argv[1] == "checkpoint":
        checkpoint(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    elif sys.argv[1] == "shapes":
        shapes(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
