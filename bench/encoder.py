"""Encoder throughput: official SamPredictor (fp32) vs timm samvit vs samprobe SamBackbone (precision auto).

Run from the repo root:  PYTHONPATH=src python bench/encoder.py [--quick]

All three run the same random vit_b weights (saved once in the official format) on the same
real photos (skimage.data). timm and samprobe run in the precision ``precision: auto`` resolves
to on this CPU (the GEMM probe of samprobe.device: bf16 where it measures faster,
else fp32), reported as "precision" with the probe's GFLOP/s; samprobe runs it as the extractor
does (``use_precision`` then the extractor's autocast). The machine's matmul peak in that
precision is measured in the same run (best of a square 4096^3 GEMM and the encoder's own MLP
GEMM), and samprobe's share of it is reported from FLOPs counted by torch's FlopCounterMode on
its own forward. ``seconds_by_op``: one profiled samprobe forward (torch.profiler, self time of
each op) split into gemm (the linear layers), attention (the q.k and p.v matmuls), bias/softmax
(relative-position terms, softmax), copies (layout and dtype copies, concatenations), neck
(everything in the neck) and other (LayerNorm, GELU, residual adds, patch embedding), per image.
Then extraction through the CLI's own stage (``samprobe extract``: decode, letterbox, DataLoader
workers, cache writes) on 20 real photos vs the same extractor encoding the same images already
prepared in memory: ``ratios.cli_vs_encoder``. Ends with one JSON line.
"""

from __future__ import annotations

import os

# Before torch loads libgomp (it reads this once): OpenMP threads that wait for their partner
# sleep instead of spinning. On this shared 2-core machine (load 4-5) spinning doubled the CPU
# time of a vit_b forward (13.4 -> 7.2 s/img CPU, 20-24 -> 7-11 s/img wall); all three
# contenders run in this process, so all get the same policy. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# helpers.sam_factory: official-format weights
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGETS = {"vs_official": 8.0, "vs_timm": 2.5, "peak_share": 0.70, "cli_vs_encoder": 0.90}


def real_images(n: int) -> list[np.ndarray]:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.cat()]
    return [np.ascontiguousarray(p[..., :3]) for p in photos[:n]]


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def matmul_peak_gflops(precision: str, tokens: int, reps: int = 5) -> float:
    """Best GFLOP/s of a square 4096^3 GEMM and of the encoder's MLP GEMM ([tokens, 768] @
    [768, 3072]): a "peak" the encoder's own GEMMs beat would flatter the share (on the AMX Xeon
    the MLP shape ran at 1.7 TFLOP/s where 4096^3 gave 1.25)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((4096, 4096, 4096), (tokens, 768, 3072)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: oneDNN picks its kernel on the first call
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def make_official(sam) -> Callable[[list[np.ndarray]], None]:
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)

    def run(group: list[np.ndarray]) -> None:
        for img in group:  # the official API takes one image at a time
            predictor.set_image(img)

    return run


def letterbox(images: list[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official resize + zero pad, uint8 [B, 3, S, S], and valid (h', w') [B, 2]."""
    from samprobe.data.images import resize_longest_side

    out = torch.zeros(len(images), 3, size, size, dtype=torch.uint8)
    hw = []
    for i, img in enumerate(images):
        r = resize_longest_side(img, size)
        out[i, :, : r.shape[0], : r.shape[1]] = torch.from_numpy(np.array(r)).permute(2, 0, 1)
        hw.append(r.shape[:2])
    return out, torch.tensor(hw)


def make_timm(state_dict: dict, size: int, precision: str) -> Callable[[list[np.ndarray]], None]:
    import timm
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    from samprobe.device import autocast_context

    model = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=size, num_classes=0
    ).eval()
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def run(group: list[np.ndarray]) -> None:
        x, _ = letterbox(group, size)
        with torch.no_grad(), autocast_context(torch.device("cpu"), precision):
            model.forward_features((x.float() - mean) / std)

    return run


def samprobe_backbone(ckpt: Path, size: int, precision: str):
    """The SAM backbone as the extractor sets it up for ``precision`` on the CPU."""
    from samprobe.backbones.sam import SamBackbone

    bb = SamBackbone.from_checkpoint(ckpt, img_size=size, variant="vit_b")
    bb.use_precision(torch.device("cpu"), precision)
    return bb


def make_samprobe(bb, precision: str) -> Callable[[list[np.ndarray]], None]:
    from samprobe.device import autocast_context

    def run(group: list[np.ndarray]) -> None:
        prepared = [bb.prepare(img) for img in group]  # in samprobe this runs in DataLoader workers
        x = torch.stack([p[0] for p in prepared])
        hw = torch.tensor([p[1] for p in prepared])
        with autocast_context(torch.device("cpu"), precision):
            bb.encode(x, hw, ["neck_avg"])

    return run


def _linear_pointwise_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """oneDNN's fused linear (``SamMlp``'s fc1 + GELU): 2 * tokens * in * out, as for addmm."""
    return 2 * int(np.prod(x_shape[:-1])) * w_shape[1] * w_shape[0]


def count_flops(run: Callable[[list[np.ndarray]], None], image: np.ndarray) -> float:
    """FLOPs of one image as torch's FlopCounterMode counts them (matmuls, convs, einsums, and
    oneDNN's fused linear, which it does not know)."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = {torch.ops.mkldnn._linear_pointwise: _linear_pointwise_flops}
    counter = FlopCounterMode(display=False, custom_mapping=fused)
    with counter:
        run([image])
    return float(counter.get_total_flops())


OP_KINDS = ("gemm", "attention", "bias/softmax", "copies", "neck", "other")
_GEMM_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}
_GEMM_OPS |= {"aten::matmul", "aten::linear", "mkldnn::_linear_pointwise"}
_COPY_OPS = {"aten::copy_", "aten::clone", "aten::cat", "aten::_to_copy", "aten::contiguous"}


def op_breakdown(bb, run: Callable[[list[np.ndarray]], None], group: list[np.ndarray]) -> dict:
    """Seconds per image of one profiled forward by kind of op (``OP_KINDS``), from each aten op's
    self time; the attention core and the neck are told apart by profiler ranges put around
    them here (bench-only wrappers: the code measured is unchanged)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from samprobe.backbones.sam_attention import SamAttention

    attend = SamAttention._attend

    def attend_in_range(self, qkv, hw):
        with record_function("bench::attention"):
            return attend(self, qkv, hw)

    neck = bb.encoder.neck
    neck_forward = neck.forward

    def neck_in_range(x):
        with record_function("bench::neck"):
            return neck_forward(x)

    SamAttention._attend = attend_in_range
    neck.forward = neck_in_range
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(group)
    finally:
        SamAttention._attend = attend
        del neck.forward
    seconds = dict.fromkeys(OP_KINDS, 0.0)
    for ev in prof.events():
        if not ev.name.startswith(("aten::", "mkldnn::")):
            continue
        scopes = set()
        parent = ev.cpu_parent
        while parent is not None:
            scopes.add(parent.name)
            parent = parent.cpu_parent
        if "bench::neck" in scopes:
            kind = "neck"
        elif ev.name in _COPY_OPS:
            kind = "copies"
        elif "bench::attention" in scopes:
            kind = "attention" if ev.name in _GEMM_OPS else "bias/softmax"
        elif ev.name in _GEMM_OPS:
            kind = "gemm"
        else:
            kind = "other"
        seconds[kind] += ev.self_cpu_time_total / 1e6
    return {k: round(v / len(group), 3) for k, v in seconds.items()}


def cli_photos(n: int) -> list[np.ndarray]:
    """``n`` distinct real photos: crops of five skimage.data photos at several offsets (not
    ``data.cat``: it is ``data.chelsea`` again, and validation drops duplicate images)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    photos.append(data.immunohistochemistry())
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        step = i // len(photos)
        h, w = p.shape[:2]
        out.append(np.ascontiguousarray(p[step * h // 16 :, step * w // 20 :]))
    return out


def cli_vs_encoder(ckpt: Path, size: int, batch: int, tmp: Path, n: int = 20) -> dict:
    """img/s of ``samprobe extract`` (the CLI's stage, loader and cache included) on ``n`` real
    photos vs the same extractor encoding the same photos prepared beforehand (encoder only)."""
    from PIL import Image

    from samprobe.cli import main as cli_main
    from samprobe.config import load_config
    from samprobe.features.extract import Extractor
    from samprobe.pipeline import run_extract

    photos = cli_photos(n)
    for i, img in enumerate(photos):
        folder = tmp / "photos" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"p{i:02d}.jpg", quality=92)
    cfg_path = tmp / "samprobe.yaml"
    cfg_path.write_text(
        f"run_dir: {tmp / 'run'}\ndevice: cpu\nprecision: auto\n"
        f"data: {{image_root: {tmp / 'photos'}, format: folder, val_fraction: 0.2, "
        f"test_fraction: 0.2}}\n"
        f"backbone: {{name: sam, checkpoint: {ckpt}, img_size: {size}}}\n"
        f"features: {{cache_dir: {tmp / 'cache'}, batch_size: {batch}}}\n"
    )
    if cli_main(["validate", "-c", str(cfg_path)]) != 0:
        raise SystemExit("bench: samprobe validate failed on the bench photos")
    cfg = load_config(cfg_path)
    result = run_extract(cfg, progress=False)
    assert result.extracted == n, (result.extracted, n)
    extractor = Extractor.from_config(cfg)
    prepared = [extractor.backbone.prepare(img) for img in photos]  # untimed: encoder only
    extractor.encode_batch(
        torch.stack([p[0] for p in prepared[:batch]]),
        torch.tensor([p[1] for p in prepared[:batch]]),
    )  # warm-up at the timed batch shape
    t = time.perf_counter()
    for i in range(0, n, batch):
        group = prepared[i : i + batch]
        extractor.encode_batch(
            torch.stack([p[0] for p in group]), torch.tensor([p[1] for p in group])
        )
    encoder_s = time.perf_counter() - t
    return {
        "cli_img_per_s": round(result.extracted / result.seconds, 3),
        "encoder_img_per_s": round(n / encoder_s, 3),
        "workers": cfg.resolved_num_workers(),
    }


def timed(run: Callable[[list[np.ndarray]], None], group: list[np.ndarray]) -> float:
    t = time.perf_counter()
    run(group)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 images at 512 px: about a minute")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--skip-official", action="store_true", help="reuse no baseline: for profiling only"
    )
    ap.add_argument(
        "--skip-cli", action="store_true", help="no CLI extraction run: for profiling only"
    )
    args = ap.parse_args()
    size = args.size or (512 if args.quick else 1024)
    n = args.images or (2 if args.quick else 4)
    images = real_images(n)
    torch.manual_seed(0)
    from samprobe.device import cpu_probe, resolve_precision

    precision = resolve_precision(torch.device("cpu"), "auto")
    probe = cpu_probe()
    print(
        f"vit_b at {size} px, {n} images, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{precision} ({probe.summary()})",
        flush=True,
    )
    # The 2-core machine is shared: the load average says how far from quiet these numbers are.
    load_start = os.getloadavg()[0]

    from helpers.sam_factory import build_official_sam

    sam = build_official_sam("vit_b", img_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam_vit_b_random.pth"
        torch.save(sam.state_dict(), ckpt)
        bb = samprobe_backbone(ckpt, size, precision)
        runners = {
            "samprobe": make_samprobe(bb, precision),
            "timm": make_timm(sam.state_dict(), size, precision),
        }
        if not args.skip_official:
            runners["official"] = make_official(sam)
        flops = count_flops(runners["samprobe"], images[0])
        for run in runners.values():
            run(images[: args.batch])  # warm-up at the timed shape: oneDNN picks kernels per shape
        # Round robin, one batch of each per round, so load from other processes on this
        # machine hits every contender alike; the matmul peak is re-measured every round.
        totals = dict.fromkeys(runners, 0.0)
        peaks = []
        tokens = args.batch * (size // 16) ** 2
        for group in batches(images, args.batch):
            peaks.append(matmul_peak_gflops(precision, tokens))
            for name, run in runners.items():
                el = timed(run, group)
                totals[name] += el
                print(f"  {name:9s} {el / len(group):6.2f} s/image", flush=True)
        by_op = op_breakdown(bb, runners["samprobe"], images[: args.batch])
        print(f"samprobe per image by op (profiled forward): {by_op}", flush=True)
        del runners, bb
        cli = None if args.skip_cli else cli_vs_encoder(ckpt, size, args.batch, Path(tmp))
    s_per = {k: v / len(images) for k, v in totals.items()}
    s_per.setdefault("official", float("nan"))
    official, timm_s, ours = s_per["official"], s_per["timm"], s_per["samprobe"]
    peak = max(peaks)
    print(
        f"{precision} matmul peak (4096^3 and the MLP GEMM), best of rounds: {peak:.0f} GFLOP/s (rounds: "
        f"{', '.join(f'{p:.0f}' for p in peaks)})"
    )
    print(f"official SamPredictor fp32:           {official:.2f} s/image")
    print(f"timm samvit {precision} batch {args.batch}:            {timm_s:.2f} s/image")
    print(
        f"samprobe {precision} batch {args.batch}:               {ours:.2f} s/image, "
        f"{flops / 1e12:.3f} TFLOP/image"
    )
    share = flops / ours / (peak * 1e9)
    print(f"samprobe reaches {share:.0%} of the {precision} matmul peak", flush=True)
    ratios = {"vs_official": official / ours, "vs_timm": timm_s / ours}
    if cli is not None:
        ratios["cli_vs_encoder"] = cli["cli_img_per_s"] / cli["encoder_img_per_s"]
        print(
            f"samprobe extract (CLI stage, {cli['workers']} workers): {cli['cli_img_per_s']:.2f} "
            f"img/s vs encoder only {cli['encoder_img_per_s']:.2f} img/s"
        )
    achieved = {**ratios, "peak_share": share}
    passed = all(achieved.get(k, 0.0) >= v for k, v in TARGETS.items())
    print(
        json.dumps(
            {
                "bench": "encoder",
                "img_size": size,
                "images": n,
                "precision": precision,
                "compute": "bf16 weights, autocast off"
                if precision == "bf16"
                else f"{precision} weights",
                "cpu_probe_gflops": {"fp32": probe.fp32_gflops, "bf16": probe.bf16_gflops},
                "s_per_img": {
                    "official": round(official, 3),
                    "timm": round(timm_s, 3),
                    "samprobe": round(ours, 3),
                },
                "ratios": {k: round(v, 2) for k, v in ratios.items()},
                "targets": TARGETS,
                "tflop_per_img": round(flops / 1e12, 3),
                "peak_gflops": round(peak, 1),
                "peak_share": round(share, 3),
                "seconds_by_op": by_op,
                "cli": cli,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
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
