"""Every SAM-family encoder at its native size, samprobe against each reference implementation.

Run from the repo root:  PYTHONPATH=src python bench/encoders.py [--quick] [--precision fp32|bf16]

Random weights in each family's official format (no real weights exist on this machine; speed
does not depend on the values): SAM 1 vit_b and SAM-HQ vit_b (segment_anything /
segment_anything_hq), SAM 2.1 hiera_t (sam2 1.1.0), MobileSAM TinyViT-5M (mobile_sam),
EfficientViT-SAM-L0 (efficientsam, at its own 512 px; the others at 1024). The same
real photos (skimage.data) go through every encoder in the same run, round robin, so load from
other processes hits every contender alike; the matmul peak of the chosen precision is measured
every round and each samprobe encoder's share of it comes from FLOPs counted by torch's
FlopCounterMode on its own forward. Both sides run the same precision. Ends with one JSON line.
"""

from __future__ import annotations

import os

# see bench/encoder.py: spinning OpenMP threads double CPU time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SAM2_BUILD_CUDA", "0")

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from encoder import count_flops  # bench/encoder.py: FlopCounterMode plus oneDNN's fused linear

# official-format weight factories
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGETS = {
    "mobile_sam_vs_vit_b": 15.0,
    "efficientvit_l0_vs_vit_b": 10.0,
    "sam2_1_t_vs_vit_b": 2.0,
    "vit_b_vs_reference": 1.2,
    "sam_hq_vs_reference": 1.2,
    "sam2_1_t_vs_reference": 1.2,
    "mobile_sam_vs_reference": 1.2,
    "efficientvit_l0_vs_reference": 1.2,
}
NATIVE_SIZE = {"efficientvit_l0": 512}
"""Families whose release runs at another size than 1024 px."""
Run = Callable[[list[np.ndarray]], None]


def photos(n: int) -> list[np.ndarray]:
    from skimage import data

    return [
        np.ascontiguousarray(p[..., :3])
        for p in (data.astronaut(), data.chelsea(), data.coffee())[:n]
    ]


def peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def samprobe_runner(cfg: dict, autocast, precision: str) -> Run:
    """The backbone as the extractor sets it up (``use_precision``, then its autocast)."""
    from samprobe.backbones.registry import build_backbone
    from samprobe.config import BackboneConfig

    bb = build_backbone(BackboneConfig(**cfg))
    bb.use_precision(torch.device("cpu"), precision)

    def run(group: list[np.ndarray]) -> None:
        prepared = [bb.prepare(img) for img in group]  # in samprobe this runs in DataLoader workers
        x, hw = torch.stack([p[0] for p in prepared]), torch.tensor([p[1] for p in prepared])
        with autocast():
            bb.encode(x, hw, ["neck_avg"])

    return run


def sam1_reference(sam, autocast) -> Run:
    """Official path: ResizeLongestSide (numpy) + Sam.preprocess + image_encoder, one image at a time."""
    from segment_anything.utils.transforms import ResizeLongestSide

    tf = ResizeLongestSide(sam.image_encoder.img_size)

    def run(group: list[np.ndarray]) -> None:
        for img in group:
            x = sam.preprocess(torch.as_tensor(tf.apply_image(img)).permute(2, 0, 1)[None].float())
            with torch.no_grad(), autocast():
                sam.image_encoder(x)

    return run


def sam2_reference(model, autocast) -> Run:
    from sam2.utils.transforms import SAM2Transforms

    tf = SAM2Transforms(resolution=1024, mask_threshold=0.0)

    def run(group: list[np.ndarray]) -> None:
        x = tf.forward_batch(group)
        with torch.no_grad(), autocast():
            model.image_encoder(x)

    return run


def efficientvit_reference(model, autocast) -> Run:
    """Official path: ``EfficientViTSam.transform`` (SamResize, ToTensor, Normalize, SamPad) + image_encoder,
    one image at a time, as ``EfficientViTSamPredictor.set_image`` does."""

    def run(group: list[np.ndarray]) -> None:
        for img in group:
            x = model.transform(img)[None]
            with torch.no_grad(), autocast():
                model.image_encoder(x)

    return run


def build(tmp: Path, autocast, precision: str) -> dict[str, dict[str, Run]]:
    """family -> {"samprobe": run, "reference": run}, all on random official-format weights at their
    native size (1024 px; EfficientViT-SAM-L0 512)."""
    from helpers.sam_factory import (
        build_official_efficientvit_sam,
        build_official_mobile_sam,
        build_official_sam,
        build_official_sam_hq,
    )

    out: dict[str, dict[str, Run]] = {}
    sam = build_official_sam("vit_b", img_size=1024)
    torch.save(sam.state_dict(), tmp / "sam_vit_b.pth")
    out["vit_b"] = {
        "samprobe": samprobe_runner({"checkpoint": tmp / "sam_vit_b.pth"}, autocast, precision),
        "reference": sam1_reference(sam, autocast),
    }
    hq = build_official_sam_hq("vit_b", img_size=1024)
    torch.save(hq.state_dict(), tmp / "sam_hq_vit_b.pth")
    out["sam_hq"] = {
        "samprobe": samprobe_runner({"checkpoint": tmp / "sam_hq_vit_b.pth"}, autocast, precision),
        "reference": sam1_reference(hq, autocast),
    }
    import sam2  # noqa: F401  (initialises Hydra: fine in this process of its own)
    from sam2.build_sam import build_sam2

    s2 = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval")
    torch.save({"model": s2.state_dict()}, tmp / "sam2.1_hiera_tiny.pt")
    out["sam2_1_t"] = {
        "samprobe": samprobe_runner(
            {"checkpoint": tmp / "sam2.1_hiera_tiny.pt"}, autocast, precision
        ),
        "reference": sam2_reference(s2, autocast),
    }
    ms = build_official_mobile_sam("tiny_vit_5m", img_size=1024)
    torch.save(ms.state_dict(), tmp / "mobile_sam.pt")
    out["mobile_sam"] = {
        "samprobe": samprobe_runner({"checkpoint": tmp / "mobile_sam.pt"}, autocast, precision),
        "reference": sam1_reference(ms, autocast),
    }
    ev = build_official_efficientvit_sam("l0")
    torch.save(ev.state_dict(), tmp / "efficientvit_sam_l0.pt")
    out["efficientvit_l0"] = {
        "samprobe": samprobe_runner(
            {"checkpoint": tmp / "efficientvit_sam_l0.pt"}, autocast, precision
        ),
        "reference": efficientvit_reference(ev, autocast),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="one photo, one round (a few minutes on 2 cores)"
    )
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    n = args.images or (1 if args.quick else 3)
    images = photos(n)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if dtype == torch.bfloat16
        else nullcontext
    )
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        runners = build(Path(tmp), autocast, args.precision)
        # also warms up
        flops = {fam: count_flops(r["samprobe"], images[0]) for fam, r in runners.items()}
        for r in runners.values():
            r["reference"](images[:1])  # warm-up: first-call kernel selection is not throughput
        totals = {(fam, side): 0.0 for fam, r in runners.items() for side in r}
        peaks = []
        for img in images:  # round robin, one photo per round
            peaks.append(peak_gflops(dtype))
            for fam, side in totals:
                el = _timed(lambda run=runners[fam][side], img=img: run([img]))
                totals[fam, side] += el
                print(f"  {fam:11s} {side:9s} {el:7.2f} s", flush=True)
    s_per = {
        fam: {side: totals[fam, side] / n for side in ("samprobe", "reference")} for fam in runners
    }
    peak = max(peaks)
    ours = {fam: s["samprobe"] for fam, s in s_per.items()}
    ratios: dict[str, float] = {
        "mobile_sam_vs_vit_b": ours["vit_b"] / ours["mobile_sam"],
        "efficientvit_l0_vs_vit_b": ours["vit_b"] / ours["efficientvit_l0"],
        "sam2_1_t_vs_vit_b": ours["vit_b"] / ours["sam2_1_t"],
        **{f"{fam}_vs_reference": s["reference"] / s["samprobe"] for fam, s in s_per.items()},
    }
    share = {fam: flops[fam] / ours[fam] / (peak * 1e9) for fam in runners}
    for fam, s in s_per.items():
        print(
            f"{fam:11s} samprobe {s['samprobe']:7.2f} s/img  reference {s['reference']:7.2f} "
            f"s/img  "
            f"{flops[fam] / 1e9:7.1f} GFLOP/img  {share[fam]:.0%} of the {args.precision} matmul "
            f"peak"
        )
    passed = all(ratios[k] >= v for k, v in TARGETS.items())
    print(
        json.dumps(
            {
                "bench": "encoders",
                "precision": args.precision,
                "images": n,
                "img_size": {fam: NATIVE_SIZE.get(fam, 1024) for fam in runners},
                "s_per_img": {
                    fam: {k: round(v, 3) for k, v in s.items()} for fam, s in s_per.items()
                },
                "ratios": {k: round(v, 2) for k, v in ratios.items()},
                "targets": TARGETS,
                "gflop_per_img": {fam: round(f / 1e9, 1) for fam, f in flops.items()},
                "peak_gflops": round(peak, 1),
                "peak_share": {fam: round(v, 3) for fam, v in share.items()},
                "load_avg_1min": {
                    "start": round(load_start, 2),
                    "end": round(os.getloadavg()[0], 2),
                },
                "pass": passed,
            }
        )
    )


if __name__ == "__main__":
    main()
