"""Input size: speed vs fidelity of SAM vit_b features at 512 / 768 / 1024 px.

Run from the repo root:  PYTHONPATH=src python bench/input_size.py [--quick]

Same random vit_b weights (official format) and the same real photos (skimage.data) at every
size, through samprobe's extraction path (bf16 where the CPU has it). Speed: s/image. Fidelity:
cosine similarity of each image's pooled neck features (neck_avg) at that size to the same
image's features at 1024, the size SAM was trained at. With random weights this measures how
much the representation moves, not accuracy: a proxy, stated as such. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# helpers.sam_factory: official-format weights
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny geometry, 2 images: a smoke run")
    args = parser.parse_args()
    from skimage import data

    from helpers.sam_factory import write_official_checkpoint
    from samprobe.backbones.sam import SamBackbone
    from samprobe.device import autocast_context, resolve_precision

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()][
        : 2 if args.quick else 4
    ]
    photos = [np.ascontiguousarray(p[..., :3]) for p in photos]
    geometry, sizes = ("tiny", [256, 384, 512]) if args.quick else ("vit_b", [512, 768, 1024])
    device = torch.device("cpu")
    precision = resolve_precision(device, "auto")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_official_checkpoint(
            Path(tmp) / "sam.pth", geometry=geometry, img_size=max(sizes)
        )
        feats, s_per_img = {}, {}
        for size in sizes:
            backbone = SamBackbone.from_checkpoint(ckpt, img_size=size)
            backbone.use_precision(device, precision)  # as the extractor sets it up
            prepared = [backbone.prepare(p) for p in photos]
            images = torch.stack([p[0] for p in prepared])
            hw = torch.tensor([p[1] for p in prepared])
            with autocast_context(device, precision):
                backbone.encode(images[:2], hw[:2], ["neck_avg"])  # warm-up at the timed shape
                start = time.perf_counter()
                out = torch.cat(
                    [
                        backbone.encode(images[i : i + 2], hw[i : i + 2], ["neck_avg"])
                        for i in range(0, len(photos), 2)
                    ]
                )
                s_per_img[size] = (time.perf_counter() - start) / len(photos)
            feats[size] = out.float()
            print(f"{size:5d}px: {s_per_img[size]:.2f} s/img", flush=True)
    ref = feats[max(sizes)]
    cosine = {s: float(torch.nn.functional.cosine_similarity(feats[s], ref).mean()) for s in sizes}
    speedup = {s: s_per_img[max(sizes)] / s_per_img[s] for s in sizes}
    for s in sizes:
        print(
            f"{s:5d}px: {speedup[s]:.2f}x faster than {max(sizes)}, cosine to {max(sizes)}px "
            f"features {cosine[s]:.4f}"
        )
    print(
        json.dumps(
            {
                "bench": "input_size",
                "geometry": geometry,
                "precision": precision,
                "s_per_img": {str(k): round(v, 3) for k, v in s_per_img.items()},
                "speedup_vs_native": {str(k): round(v, 2) for k, v in speedup.items()},
                "cosine_vs_native": {str(k): round(v, 4) for k, v in cosine.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
